"""The contract of every invertible layer (:mod:`iresnet.core.invertible`), in float64, for each
layer in a small configuration: the log-det against the brute-force Jacobian (``None`` exactly
where the contract says), ``inverse(forward(x)) == x``, the shapes against ``forward_shape`` /
``inverse_shape``, dtype and device kept. A variational dequantiser's log-det also carries
``-log q(u | x)`` of its drawn noise: the Jacobian's part is checked at that noise. A layer class
without a case here fails ``test_every_invertible_layer_has_a_case``: a new layer joins the table
below."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

import iresnet
from helpers import conv_branch, dense_branch, jacobian_logdet
from iresnet.core.invertible import InvertibleLayer
from iresnet.data import Logit, Rescale, Shift, UniformDequantize, VariationalDequantize

DTYPE = torch.float64
BATCH = 5


@dataclass(frozen=True)
class Case:
    build: Callable[[], InvertibleLayer]
    inputs: Callable[[torch.device], Tensor]  # a batch in the layer's domain, float64
    has_logdet: bool = True  # False: the contract's None (no log-det, or built without one)
    dequantizer: bool = False  # y = (x + u) / L, the log-det less log q(u | x) (layer.log_q): checked at u


def normal(*shape: int) -> Callable[[torch.device], Tensor]:
    return lambda device: torch.randn(BATCH, *shape, dtype=DTYPE, device=device) * 2 + 1


def integers(levels: int, *shape: int) -> Callable[[torch.device], Tensor]:
    return lambda device: torch.randint(0, levels, (BATCH, *shape), device=device).to(DTYPE)


def stage(channels: int) -> iresnet.Sequential:
    return iresnet.Sequential(iresnet.ActNorm(channels), iresnet.ResidualBlock(conv_branch(channels, 4, 0.9), "exact"))


def multiscale(event_shape: tuple[int, int, int], channels: list[int], **options: bool) -> iresnet.MultiScale:
    return iresnet.MultiScale([stage(c) for c in channels], event_shape, **options)


def random_last_layer(layer: VariationalDequantize) -> VariationalDequantize:
    """The layer with its zero-initialised last convolution made random: q depends on x."""
    with torch.no_grad():
        for parameter in layer.net[-1].parameters():
            parameter.normal_(0, 0.3)
    return layer


CASES = {
    "ResidualBlock": Case(lambda: iresnet.ResidualBlock(dense_branch(3, 16, 0.9), "exact"), normal(3)),
    "ResidualBlock-conv": Case(lambda: iresnet.ResidualBlock(conv_branch(2, 4, 0.9), "exact"), normal(2, 4, 4)),
    "ResidualBlock-without-logdet": Case(
        lambda: iresnet.ResidualBlock(dense_branch(3, 16, 0.9), None), normal(3), has_logdet=False
    ),
    "MonotoneBlock": Case(lambda: iresnet.MonotoneBlock(dense_branch(3, 16, 0.9), "exact"), normal(3)),
    "MonotoneBlock-conv": Case(lambda: iresnet.MonotoneBlock(conv_branch(2, 4, 0.9), "exact"), normal(2, 4, 4)),
    "ImplicitBlock": Case(
        lambda: iresnet.ImplicitBlock(dense_branch(3, 16, 0.9), dense_branch(3, 16, 0.9), "exact"), normal(3)
    ),
    "ImplicitBlock-conv": Case(
        lambda: iresnet.ImplicitBlock(conv_branch(2, 4, 0.9), conv_branch(2, 4, 0.9), "exact"), normal(2, 4, 4)
    ),
    "ImplicitBlock-without-logdet": Case(
        lambda: iresnet.ImplicitBlock(dense_branch(3, 16, 0.9), dense_branch(3, 16, 0.9), None),
        normal(3),
        has_logdet=False,
    ),
    "ActNorm": Case(lambda: iresnet.ActNorm(2), normal(2, 3, 3)),
    "Squeeze": Case(iresnet.Squeeze, normal(2, 4, 4)),
    "InjectivePad": Case(lambda: iresnet.InjectivePad(2), normal(1, 4, 4), has_logdet=False),
    "Sequential": Case(
        lambda: iresnet.Sequential(
            iresnet.ActNorm(3), iresnet.ResidualBlock(dense_branch(3, 16, 0.9), "exact"), iresnet.ActNorm(3)
        ),
        normal(3),
    ),
    "Sequential-images": Case(
        lambda: iresnet.Sequential(stage(2), iresnet.Squeeze(), iresnet.ActNorm(8)), normal(2, 4, 4)
    ),
    "Sequential-empty": Case(iresnet.Sequential, normal(3)),
    "MultiScale": Case(lambda: multiscale((2, 4, 4), [2, 4], squeeze_first=False, factor_out=True), normal(2, 4, 4)),
    "MultiScale-squeeze-first": Case(
        lambda: multiscale((1, 4, 4), [4, 16], squeeze_first=True, factor_out=False), normal(1, 4, 4)
    ),
    "Shift": Case(Shift, normal(3)),
    "Rescale": Case(lambda: Rescale(17), integers(17, 1, 3, 3)),
    "Logit": Case(lambda: Logit(0.05), lambda device: torch.rand(BATCH, 2, 3, dtype=DTYPE, device=device)),
    "UniformDequantize": Case(lambda: UniformDequantize(17), integers(17, 6)),
    "VariationalDequantize": Case(
        lambda: random_last_layer(VariationalDequantize(17, (2, 3, 3), hidden=4)),
        integers(17, 2, 3, 3),
        dequantizer=True,
    ),
}


def prepared(case: Case, device: torch.device) -> tuple[InvertibleLayer, Tensor]:
    """The layer in eval mode, its ActNorms initialised from the inputs and its spectral norms
    converged, so that every call computes one fixed function; and the inputs."""
    x = case.inputs(device)
    layer = case.build().to(device=device, dtype=DTYPE)
    iresnet.initialize_from_data(layer, x)
    layer.eval()
    iresnet.converge_spectral_norms(layer)
    return layer, x


@pytest.mark.parametrize("name", CASES)
def test_logdet_is_that_of_the_jacobian(name: str, device: torch.device) -> None:
    layer, x = prepared(CASES[name], device)
    y, logdet = layer(x)
    if not CASES[name].has_logdet:
        assert logdet is None
        return
    if CASES[name].dequantizer:  # the noise is drawn anew per call: the Jacobian of x -> (x + u) / L at this u
        u = y * layer.levels - x
        at_u = [jacobian_logdet(lambda z, i=i: ((z + u[i]) / layer.levels, None), x[i : i + 1]) for i in range(len(x))]
        torch.testing.assert_close(logdet + layer.log_q(u, x), torch.cat(at_u), rtol=1e-8, atol=1e-8)
        return
    torch.testing.assert_close(logdet, jacobian_logdet(layer, x), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name", CASES)
def test_inverse_undoes_forward(name: str, device: torch.device) -> None:
    layer, x = prepared(CASES[name], device)
    y, _ = layer(x)
    torch.testing.assert_close(layer.inverse(y), x, rtol=1e-8, atol=1e-8)
    if not layer.bijective:  # a left inverse: forward undoes it on the image only
        torch.testing.assert_close(layer(layer.inverse(y))[0], y, rtol=0, atol=0)


@pytest.mark.parametrize("name", CASES)
def test_shapes_are_those_declared(name: str, device: torch.device) -> None:
    layer, x = prepared(CASES[name], device)
    y, logdet = layer(x)
    event = tuple(x.shape[1:])
    assert tuple(y.shape) == (BATCH, *layer.forward_shape(event))
    assert layer.inverse_shape(tuple(y.shape[1:])) == event
    assert layer.inverse(y).shape == x.shape
    assert logdet is None or logdet.shape == (BATCH,)


@pytest.mark.parametrize("name", CASES)
def test_dtype_and_device_are_kept(name: str, device: torch.device) -> None:
    layer, x = prepared(CASES[name], device)
    y, logdet = layer(x)
    for tensor in (y, layer.inverse(y)) if logdet is None else (y, logdet, layer.inverse(y)):
        assert tensor.dtype == DTYPE and tensor.device == x.device


@pytest.mark.parametrize("name", CASES)
def test_logdet_is_missing_only_where_the_contract_allows(name: str) -> None:
    """``None`` for a layer that is not bijective, or was built without a log-det."""
    layer = CASES[name].build()
    assert CASES[name].has_logdet or not layer.bijective or getattr(layer, "logdet", None) is None


def _subclasses(cls: type) -> Iterator[type]:
    for subclass in cls.__subclasses__():
        yield subclass
        yield from _subclasses(subclass)


def test_every_invertible_layer_has_a_case() -> None:
    for module in pkgutil.walk_packages(iresnet.__path__, "iresnet."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    layers = {cls for cls in _subclasses(InvertibleLayer) if cls.__module__.startswith("iresnet.")}
    covered = {type(case.build()) for case in CASES.values()}
    missing = sorted(f"{cls.__module__}.{cls.__qualname__}" for cls in layers - covered)
    assert not missing, f"invertible layers without a contract case in {__name__}: {missing}"


# Compositions: every one sums log-dets the same way -------------------------------------------


class Constant(InvertibleLayer):
    """The identity with a given log-det per sample (or ``None``)."""

    def __init__(self, logdet: float | None) -> None:
        super().__init__()
        self.value = logdet

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        return x, None if self.value is None else x.new_full((x.shape[0],), self.value)

    def inverse(self, y: Tensor) -> Tensor:
        return y


COMPOSITIONS = {
    "Sequential": lambda layers: iresnet.Sequential(*layers),
    "MultiScale": lambda layers: iresnet.MultiScale(layers, (1, 4, 4), squeeze_first=False, factor_out=True),
}


@pytest.mark.parametrize("compose", COMPOSITIONS)
@pytest.mark.parametrize(
    "logdets, total",
    [((1.0, 2.0, 4.0), 7.0), ((None, 2.0, 4.0), None), ((1.0, None, 4.0), None), ((1.0, 2.0, None), None)],
)
def test_compositions_sum_logdets_and_a_missing_one_leaves_none(compose: str, logdets: tuple, total: float | None):
    """A layer without a log-det anywhere (first, in the middle, last) leaves the composition
    without one: no stage before it is dropped, as MultiScale once restarted the sum after it."""
    layer = COMPOSITIONS[compose]([Constant(value) for value in logdets])
    _, logdet = layer(torch.randn(3, 1, 4, 4, dtype=DTYPE))
    if total is None:
        assert logdet is None
    else:
        torch.testing.assert_close(logdet, torch.full((3,), total, dtype=DTYPE))
