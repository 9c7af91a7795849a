"""Builders and references shared by the tests."""

from __future__ import annotations

import signal

import pytest
import torch
from torch import nn

import iresnet


def dense_branch(dim: int, hidden: int, coeff: float, depth: int = 2, activation=iresnet.LipSwish) -> nn.Sequential:
    """``depth`` spectral-normalised linear layers ``dim -> hidden -> ... -> dim``."""
    sizes = [dim] + [hidden] * (depth - 1) + [dim]
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [iresnet.spectral_norm(nn.Linear(n_in, n_out), coeff), activation()]
    return nn.Sequential(*layers[:-1])


def conv_branch(channels: int, hidden: int, coeff: float, activation=iresnet.LipSwish) -> nn.Sequential:
    """The i-ResNet branch: 3x3, 1x1, 3x3 convolutions, spectral-normalised."""
    return nn.Sequential(
        iresnet.spectral_norm(nn.Conv2d(channels, hidden, 3, padding=1), coeff),
        activation(),
        iresnet.spectral_norm(nn.Conv2d(hidden, hidden, 1), coeff),
        activation(),
        iresnet.spectral_norm(nn.Conv2d(hidden, channels, 3, padding=1), coeff),
    )


def binding(g: nn.Sequential, factor: float = 10.0) -> nn.Sequential:
    """Scale every spectral-normalised weight of ``g`` up so that its normalisation binds."""
    with torch.no_grad():
        for layer in g.modules():
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                layer.parametrizations.weight.original.mul_(factor)
    return g


def mlp_branch(dim: int, coeff: float, hidden: int = 32) -> nn.Sequential:
    """A dense branch of three layers whose spectral normalisation binds, converged."""
    g = binding(dense_branch(dim, hidden, coeff, depth=3))
    iresnet.converge_spectral_norms(g)
    return g


def block_of(g: nn.Module, device, dtype=torch.float64, **options) -> iresnet.ResidualBlock:
    """An exact-log-det residual block of ``g`` on ``device`` in ``dtype``."""
    return iresnet.ResidualBlock(g.to(device=device, dtype=dtype), "exact", **options)


def jacobian_logdet(f, x: torch.Tensor) -> torch.Tensor:
    """log|det| of the Jacobian of one sample's map ``z -> f(z[None])[0][0]``, for each sample of
    ``x``, by torch.autograd.functional.jacobian: the brute-force reference."""
    values = []
    for sample in x:
        jacobian = torch.autograd.functional.jacobian(lambda z: f(z[None])[0][0], sample)
        d = sample.numel()
        values.append(torch.linalg.slogdet(jacobian.reshape(d, d)).logabsdet)
    return torch.stack(values)


def stop_after(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Press Ctrl-C (a real SIGINT to this process) as step ``step`` ends."""
    from iresnet.train.engine import _Trainer

    original = _Trainer.train_step

    def stepping(self, model):
        logged = original(self, model)
        if self.step == step:
            signal.raise_signal(signal.SIGINT)
        return logged

    monkeypatch.setattr(_Trainer, "train_step", stepping)
