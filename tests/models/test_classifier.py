"""The i-ResNet classifier: its trunk inverts from the features back to the input; the same
network with coeff=None is an unconstrained ResNet whose inversion can fail, and says so."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import iresnet
from iresnet.models import InjectivePad, iresnet_classifier


def small(coeff: float | None, **options) -> iresnet.models.Classifier:
    settings = {"pad_channels": 3, "blocks": (2, 2), "hidden": (8, 16), "coeff": coeff, **options}
    return iresnet_classifier((1, 8, 8), 10, **settings).double()


def test_logits_and_gradients_reach_every_parameter(device: torch.device) -> None:
    model = small(0.9).to(device)
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64, device=device)
    logits = model(x)
    assert logits.shape == (6, 10)
    nn.functional.cross_entropy(logits, torch.arange(6, device=device) % 10).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_trunk_inverts_from_features_to_input(device: torch.device) -> None:
    model = small(0.9).to(device)
    x = torch.randn(8, 1, 8, 8, dtype=torch.float64, device=device)
    model(x)  # ActNorm's initialisation
    model.eval()
    iresnet.converge_spectral_norms(model)
    features = model.features(x)
    assert features.shape == (8, 16, 4, 4)  # 1 + 3 padded channels, squeezed once
    torch.testing.assert_close(model.reconstruct(features), x, rtol=0, atol=1e-8)


def test_every_block_is_certified_invertible() -> None:
    """Certified Lip(g) < 1; near c^3, as power iteration approaches each norm from below."""
    model = small(0.9)
    model(torch.randn(4, 1, 8, 8, dtype=torch.float64))
    model.eval()
    iresnet.converge_spectral_norms(model)
    blocks = [m for m in model.trunk if isinstance(m, iresnet.ResidualBlock)]
    assert len(blocks) == 4
    for block in blocks:
        assert iresnet.lipschitz_bound(block.g, block.event_shape) <= 0.9**3 * 1.01 < 1


def test_plain_resnet_is_unconstrained_and_its_inversion_can_fail() -> None:
    model = small(None)
    assert not any(nn.utils.parametrize.is_parametrized(m) for m in model.modules())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(10)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    model(x)
    model.eval()
    block = next(m for m in model.trunk if isinstance(m, iresnet.ResidualBlock))
    assert iresnet.lipschitz_bound(block.g, block.event_shape) > 1
    with pytest.raises(iresnet.InversionError):
        model.reconstruct(model.features(x))


def test_injective_pad() -> None:
    pad = InjectivePad(2)
    x = torch.randn(3, 1, 4, 4)
    y, logdet = pad(x)
    assert logdet is None and y.shape == (3, 3, 4, 4) and (y[:, 1:] == 0).all()
    assert torch.equal(pad.inverse(y), x)
    with pytest.raises(ValueError, match="expected"):
        pad(torch.randn(3, 4))
    with pytest.raises(ValueError, match="extra must be an integer of at least 0"):
        InjectivePad(-1)


def test_bad_architecture_raises() -> None:
    with pytest.raises(ValueError, match="one entry per stage"):
        iresnet_classifier((1, 8, 8), blocks=(1, 1), hidden=(8,))
    with pytest.raises(ValueError, match="cannot be squeezed"):
        iresnet_classifier((1, 6, 6), blocks=(1, 1, 1), hidden=(8, 8, 8))


def test_recalibrated_batch_norm_statistics_are_those_of_the_images() -> None:
    from iresnet.tasks.classify import recalibrate_batch_norms

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    model[1].running_mean.fill_(50.0)  # stale statistics, as a lagging running average leaves them
    images = torch.randn(300, 3) * 2 + 1
    recalibrate_batch_norms(model, images, batch_size=100, limit=200)
    features = model[0](images[:200]).detach()
    torch.testing.assert_close(model[1].running_mean, features.mean(0))
    halves = features.split(100)
    torch.testing.assert_close(model[1].running_var, sum(h.var(0) for h in halves) / 2)
    assert not model.training and model[1].momentum == 0.1


def test_evaluation_recalibrates_a_classifier_with_stale_statistics() -> None:
    """The test error with recalibrated BatchNorm statistics is that of batch statistics, however
    far the stored running averages are off."""
    from iresnet.tasks.classify import evaluate_classifier

    model = iresnet_classifier((1, 8, 8), 10, levels=17, pad_channels=3, blocks=(1, 1), hidden=(8, 8))
    images, labels = torch.randint(0, 17, (64, 1, 8, 8)), torch.randint(0, 10, (64,))
    model(images)  # ActNorm's initialisation, the operators' shapes
    head = model.head[0]
    head.running_mean.fill_(1e3)
    stale = evaluate_classifier(model, images, labels)
    calibrated = evaluate_classifier(model, images, labels, calibration=images)
    with torch.no_grad():
        head.train()
        batch_logits = model(images)
    expected = 100 * (batch_logits.argmax(1) != labels).double().mean().item()
    assert calibrated.error_percent == pytest.approx(expected)
    assert head.running_mean.abs().max() < 1e2 and stale.nll != calibrated.nll
