r"""Certificates: guaranteed upper bounds on the Lipschitz constant of a residual branch.

Power iteration (:mod:`iresnet.core.lipschitz`) approaches a layer's spectral norm from below;
the bounds here come from above. Dense layers get their exact singular values by SVD, 1 x 1
convolutions those of their kernel, and other convolutions the exact norm from the eigenvalues
of the Gram matrix of their operator on its smaller side (input or output) where that has at
most 4096 entries. Larger convolutions get the exact norm of the circular convolution on the
padded grid from the per-frequency matrices of the kernel's DFT, which bounds the zero-padded,
strided operator. A chain of layers is bounded by the product

.. math:: \mathrm{Lip}(g) \le \prod_i \|W_i\|_2 \prod_j \mathrm{Lip}(\phi_j).

A dense layer :math:`x \mapsto [\eta_1 x, \eta_2 f(x)]` (:class:`~iresnet.core.dense.DenseLayer`)
counts :math:`\sqrt{\eta_1^2 + \eta_2^2 \mathrm{Lip}(f)^2}`, with :math:`f` bounded the same way.

References:
    Behrmann et al., "Invertible Residual Networks", ICML 2019, https://arxiv.org/abs/1811.00995

    Sedghi, Gupta, Long, "The Singular Values of Convolutional Layers", ICLR 2019,
    https://arxiv.org/abs/1805.10408

    Perugachi-Diaz, Tomczak, Bhulai, "Invertible DenseNets with Concatenated LipSwish",
    NeurIPS 2021, https://arxiv.org/abs/2102.02694
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .activations import CLipSwish, LipSwish
from .aol import AOL
from .dense import DenseLayer
from .lipschitz import SpectralNorm, parametrizations_of, records_input_shape

__all__ = ["lipschitz_bound", "operator_norm_bound", "conv_gram_norm", "circular_conv_bound", "design_bound"]


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.train(mode)


_EXACT_CONV_MAX_DIM = 2048
_EXACT_GRAM_MAX_DIM = 4096
_GRAM_CHUNK_BYTES = 2**27  # the most memory one chunk of the Gram matrix's columns may take


def operator_norm_bound(layer: nn.Module, input_shape: tuple[int, ...]) -> float:
    """A guaranteed upper bound on the operator norm of a linear layer's linear part at
    ``input_shape`` (one input, no batch), computed in float64.

    Exact (up to float64 rounding, about :math:`10^{-12}` relative) for ``nn.Linear``, and for an
    ``nn.Conv2d`` that is 1 x 1 (stride 1, no padding: the kernel matrix's norm), whose input and
    output have at most 2048 entries (the SVD of the operator's matrix, its padding mode
    included), or, with zero padding the same on both sides of each axis, whose input or output
    has at most 4096 entries (the top eigenvalue of the Gram matrix on that side,
    :func:`conv_gram_norm`). Other convolutions get the exact norm of the circular convolution
    on a grid large enough that the padded, strided convolution is one of its restrictions: an
    upper bound that is loose by about ``k / H`` on ``H x H`` maps. A padding mode other than
    zeros (reflect, replicate, circular) copies input entries: its norm, the square root of the
    most copies of one entry, multiplies that bound.
    """
    if isinstance(layer, nn.Linear):
        return _largest_singular_value(layer.weight.detach().double())
    if isinstance(layer, nn.Conv2d):
        weight = layer.weight.detach().double()
        if layer.groups != 1:
            raise ValueError("operator_norm_bound supports Conv2d with groups=1 only")
        pads = _padding_amounts(layer)
        if weight.shape[2:] == (1, 1) and _pair(layer.stride) == (1, 1) and pads == ((0, 0), (0, 0)):
            return _largest_singular_value(weight.flatten(1))  # the kernel on every pixel alone
        n_in = torch.Size(input_shape).numel()
        n_out = layer.out_channels * torch.Size(_conv_output_size(layer, input_shape)).numel()
        if max(n_in, n_out) <= _EXACT_CONV_MAX_DIM:
            basis = torch.eye(n_in, dtype=weight.dtype, device=weight.device).view(n_in, *input_shape)
            columns = F.conv2d(_pad(basis, pads, layer.padding_mode), weight, None, layer.stride, 0, layer.dilation)
            return _largest_singular_value(columns.reshape(n_in, -1))
        if layer.padding_mode == "zeros":
            if min(n_in, n_out) <= _EXACT_GRAM_MAX_DIM and _symmetric_padding(layer) is not None:
                return conv_gram_norm(layer, input_shape)
            return circular_conv_bound(layer, input_shape)
        copies = _most_copies(input_shape[1:], pads, layer.padding_mode)
        _, height, width = input_shape
        padded = (input_shape[0], height + sum(pads[0]), width + sum(pads[1]))
        kernel_size, stride, dilation = _pair(layer.kernel_size), _pair(layer.stride), _pair(layer.dilation)
        unpadded = nn.Conv2d(layer.in_channels, layer.out_channels, kernel_size, stride, 0, dilation)
        unpadded.weight = nn.Parameter(weight, requires_grad=False)
        return copies**0.5 * circular_conv_bound(unpadded, padded)
    raise TypeError(f"no operator norm for {type(layer).__name__}")


def _largest_singular_value(matrix: Tensor) -> float:
    """The largest singular value of a float64 matrix; where LAPACK's SVD fails to converge (it
    does on some operators whose singular values repeat), the square root of the largest
    eigenvalue of the smaller Gram matrix."""
    try:
        return torch.linalg.matrix_norm(matrix, ord=2).item()
    except torch.linalg.LinAlgError:
        gram = matrix.T @ matrix if matrix.shape[1] <= matrix.shape[0] else matrix @ matrix.T
        return torch.linalg.eigvalsh(gram)[-1].clamp_min(0.0).sqrt().item()


def conv_gram_norm(layer: nn.Conv2d, input_shape: tuple[int, ...]) -> float:
    r"""The exact operator norm of ``layer`` at ``input_shape`` (zero padding, the same on both
    sides of each axis), in float64: :math:`\sqrt{\lambda_{\max}}` of the Gram matrix
    :math:`W^\top W` (or :math:`W W^\top`, whichever side is smaller), built column by column
    from the convolution and its adjoint, a chunk of unit vectors at a time (at most 128 MiB of
    outputs); its eigenvalues come from ``torch.linalg.eigvalsh``, exact up to float64 rounding.
    The cost is that of the smaller side's many inputs through the layer and an eigensolve of
    that size."""
    weight = layer.weight.detach().double()
    input_shape = tuple(input_shape)
    output_shape = (layer.out_channels, *_conv_output_size(layer, input_shape))
    padding = _symmetric_padding(layer)
    if layer.padding_mode != "zeros" or padding is None:
        raise ValueError(
            f"conv_gram_norm needs zero padding, the same on both sides, got {layer.padding!r} ({layer.padding_mode})"
        )
    stride, dilation = layer.stride, layer.dilation

    def forward(x: Tensor) -> Tensor:
        return F.conv2d(x, weight, None, stride, padding, dilation)

    def adjoint(x: Tensor) -> Tensor:
        return torch.nn.grad.conv2d_input((x.shape[0], *input_shape), weight, x, stride, padding, dilation)

    side, there, back = (input_shape, forward, adjoint)
    if torch.Size(output_shape).numel() < torch.Size(input_shape).numel():
        side, there, back = (output_shape, adjoint, forward)
    n = torch.Size(side).numel()
    largest = max(n, torch.Size(input_shape).numel(), torch.Size(output_shape).numel())
    chunk = max(1, _GRAM_CHUNK_BYTES // (8 * largest))
    gram = weight.new_empty(n, n)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        units = weight.new_zeros(stop - start, n)
        units[:, start:stop].fill_diagonal_(1.0)
        gram[start:stop] = back(there(units.view(stop - start, *side))).reshape(stop - start, n)
    return torch.linalg.eigvalsh(gram)[-1].clamp_min(0.0).sqrt().item()


def _pair(values: tuple[int, ...]) -> tuple[int, int]:
    """A 2-D convolution's kernel size, stride or dilation (always two numbers) as a pair."""
    first, second = values
    return first, second


def _padding_amounts(layer: nn.Conv2d) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((top, bottom), (left, right))``: the padding the layer adds, ``"same"`` and
    ``"valid"`` included."""
    padding = layer.padding
    if padding == "valid":
        return (0, 0), (0, 0)
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
        vertical, horizontal = ((t // 2, t - t // 2) for t in totals)
    elif isinstance(padding, str):
        raise ValueError(f"{layer} has padding {padding!r}: Conv2d knows 'valid' and 'same' only")
    else:
        vertical, horizontal = ((p, p) for p in padding)
    return vertical, horizontal


def _symmetric_padding(layer: nn.Conv2d) -> tuple[int, int] | None:
    """The padding as ``(vertical, horizontal)`` when each is the same on both sides, else ``None``."""
    (top, bottom), (left, right) = _padding_amounts(layer)
    return (top, left) if (top, left) == (bottom, right) else None


def _pad(x: Tensor, pads: tuple[tuple[int, int], tuple[int, int]], mode: str) -> Tensor:
    (top, bottom), (left, right) = pads
    return F.pad(x, (left, right, top, bottom), mode="constant" if mode == "zeros" else mode)


def _most_copies(size: tuple[int, ...], pads: tuple[tuple[int, int], tuple[int, int]], mode: str) -> int:
    """How often the padding copies its most copied input entry (the padding map's rows are
    unit vectors, so its norm is the square root of this)."""
    index = torch.arange(size[0] * size[1], dtype=torch.float64).view(1, 1, *size)
    return int(torch.bincount(_pad(index, pads, mode).flatten().long()).max())


def circular_conv_bound(layer: nn.Conv2d, input_shape: tuple[int, ...]) -> float:
    """The norm of the circular convolution with ``layer``'s kernel on the smallest grid of
    which the zero-padded, strided convolution at ``input_shape`` is a restriction: the largest
    singular value of the per-frequency ``c_out x c_in`` matrices of the kernel's 2-D DFT
    (Sedghi et al. 2019). An upper bound on the layer's operator norm with zero padding."""
    weight = layer.weight.detach().double()
    _, height, width = input_shape
    grid = [
        max(size + before + after, size + dil * (k - 1))
        for size, (before, after), dil, k in zip(
            (height, width), _padding_amounts(layer), layer.dilation, weight.shape[2:]
        )
    ]
    c_out, c_in, kh, kw = weight.shape
    dh, dw = layer.dilation
    kernel = weight.new_zeros(c_out, c_in, *grid)
    kernel[:, :, : dh * (kh - 1) + 1 : dh, : dw * (kw - 1) + 1 : dw] = weight
    spectrum = torch.fft.fft2(kernel).permute(2, 3, 0, 1)  # (H, W, c_out, c_in)
    norm = 0.0
    for row in spectrum:  # one frequency row at a time bounds the memory of the SVDs
        norm = max(norm, torch.linalg.matrix_norm(row, ord=2).max().item())
    return norm


def _conv_output_size(layer: nn.Conv2d, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(
        (size + before + after - dil * (k - 1) - 1) // stride + 1
        for size, (before, after), dil, k, stride in zip(
            input_shape[1:], _padding_amounts(layer), layer.dilation, layer.kernel_size, layer.stride
        )
    )


_ONE_LIPSCHITZ = (nn.ReLU, nn.Tanh, nn.Identity, nn.Dropout, nn.Flatten, nn.Unflatten, LipSwish, CLipSwish)


def _activation_lipschitz(module: nn.Module) -> float | None:
    if isinstance(module, _ONE_LIPSCHITZ):
        return 1.0
    if isinstance(module, nn.ELU):
        return max(1.0, module.alpha)
    if isinstance(module, nn.LeakyReLU):
        return max(1.0, abs(module.negative_slope))
    if isinstance(module, nn.Sigmoid):
        return 0.25
    return None


def _chain(g: nn.Module) -> Iterator[nn.Module]:
    """The layers of ``g`` in the order a plain (nested) ``nn.Sequential`` runs them; raises
    ``TypeError`` for what changes that order or the layers' outputs: a ``Sequential`` subclass
    with its own ``forward``, or a module with hooks other than :func:`spectral_norm`'s."""
    hooks = [h for h in (*g._forward_hooks.values(), *g._forward_pre_hooks.values()) if not records_input_shape(h)]
    if hooks:
        raise TypeError(f"cannot certify {type(g).__name__}: it has forward hooks, which may change what it computes")
    if isinstance(g, nn.Sequential):
        if type(g).forward is not nn.Sequential.forward:
            raise TypeError(
                f"cannot certify {type(g).__name__}: a Sequential subclass with its own forward may not run its "
                "layers as a chain"
            )
        for child in g:
            yield from _chain(child)
    else:
        yield g


def _promised_norm(layer: nn.Linear | nn.Conv2d) -> float | None:
    """The norm a layer's parametrizations promise, applied in order: an AOL rescaling sets it
    to its coefficient (it may scale up), a spectral norm caps it at its own (it only scales down)."""
    promised = None
    if parametrize.is_parametrized(layer, "weight"):
        for p in parametrizations_of(layer):
            if isinstance(p, AOL):
                promised = p.coeff
            elif isinstance(p, SpectralNorm):
                promised = p.coeff if promised is None else min(promised, p.coeff)
    return promised


def design_bound(g: nn.Module) -> float | None:
    r"""The bound on :math:`\mathrm{Lip}(g)` that ``g``'s construction promises: the product of its
    spectral norms' and AOL layers' coefficients and its activations' constants, for a chain (see
    :func:`lipschitz_bound`) whose every linear layer is spectral-normalised
    (:func:`~iresnet.spectral_norm`) or AOL-rescaled (:func:`~iresnet.aol`); ``None`` where the
    construction promises nothing. A dense layer whose network promises :math:`L` promises
    :math:`c \max(1, L)`, its weights' norm :math:`c` times the most :math:`\sqrt{\eta_1^2 +
    \eta_2^2 L^2}` can reach for any weights of that norm."""
    bound = 1.0
    try:
        layers = list(_chain(g))
    except TypeError:
        return None
    if not any(isinstance(layer, (nn.Linear, nn.Conv2d, DenseLayer)) for layer in layers):
        return None  # no weight, no coefficient: nothing was promised
    for layer in layers:
        if isinstance(layer, DenseLayer):
            inner = design_bound(layer.network)
            if inner is None:
                return None
            bound *= layer.coeff * max(1.0, inner)
            continue
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            coeff = _promised_norm(layer)
            if coeff is None:
                return None
            bound *= coeff
        else:
            constant = _activation_lipschitz(layer)
            if constant is None:
                return None
            bound *= constant
    return bound


@torch.no_grad()
def lipschitz_bound(g: nn.Module, input_shape: tuple[int, ...]) -> float:
    r"""A certified upper bound on :math:`\mathrm{Lip}(g)` in the Euclidean norm for a chain
    ``g`` (a layer or nested ``nn.Sequential``) of ``nn.Linear`` / ``nn.Conv2d`` layers, spectral
    normalised or not, and activations with known Lipschitz constants:
    :math:`\mathrm{Lip}(g) \le \prod_i \|W_i\|_2 \prod_j \mathrm{Lip}(\phi_j)`.

    The weights are read as the layers use them in eval mode; nothing is updated.
    ``input_shape`` is the shape of one input, without batch; one that a ``Linear`` or
    ``Conv2d`` of the chain cannot take raises ``ValueError``.

    Example:
        One dense layer's bound is its largest singular value; a chain's is at most the product
        of its coefficients, and bounds the Jacobian's norm at every point,
        :math:`\|J_g(x)\|_2 \le \mathrm{Lip}(g)`:

        >>> layer = nn.Linear(3, 3)
        >>> sigma = torch.linalg.matrix_norm(layer.weight.double(), 2).item()
        >>> abs(lipschitz_bound(layer, (3,)) - sigma) < 1e-12
        True
        >>> g = nn.Sequential(spectral_norm(nn.Linear(2, 8), 0.9), LipSwish(),
        ...                   spectral_norm(nn.Linear(8, 2), 0.9)).eval()
        >>> bound = lipschitz_bound(g, (2,))
        >>> bound <= 0.9 * 0.9
        True
        >>> jacobian = torch.autograd.functional.jacobian(g, torch.randn(2))
        >>> torch.linalg.matrix_norm(jacobian, 2).item() <= bound
        True
    """
    shape = tuple(input_shape)
    bound = 1.0
    with _eval_mode(g):
        for layer in _chain(g):
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                _check_fits(layer, shape, input_shape)
                bound *= operator_norm_bound(layer, shape)
            elif isinstance(layer, DenseLayer):
                eta = layer.eta.detach().double()
                inner = lipschitz_bound(layer.network, shape)
                bound *= torch.sqrt(eta[0] ** 2 + (eta[1] * inner) ** 2).item()
            else:
                constant = _activation_lipschitz(layer)
                if constant is None:
                    raise TypeError(
                        f"cannot certify the Lipschitz constant of {type(layer).__name__}; "
                        "lipschitz_bound knows Linear, Conv2d, DenseLayer, LipSwish, CLipSwish, ReLU, ELU, "
                        "LeakyReLU, Tanh, Sigmoid, Identity, Dropout, Flatten and Unflatten"
                    )
                bound *= constant
            probe = torch.zeros((1, *shape), dtype=_dtype_of(layer, g))
            shape = tuple(layer(probe).shape[1:])
    return bound


def _check_fits(layer: nn.Linear | nn.Conv2d, shape: tuple[int, ...], input_shape: tuple[int, ...]) -> None:
    """Raise ``ValueError`` unless one input of ``shape``, which ``input_shape`` becomes on its way
    through the branch, can enter ``layer``."""
    if isinstance(layer, nn.Linear):
        fits, takes = len(shape) > 0 and shape[-1] == layer.in_features, f"Linear takes {layer.in_features} features"
    else:
        fits, takes = len(shape) == 3 and shape[0] == layer.in_channels, f"Conv2d takes ({layer.in_channels}, H, W)"
    if not fits:  # named by kind: a spectral-normalised layer's class is ParametrizedLinear
        raise ValueError(
            f"input_shape {tuple(input_shape)} does not fit the branch: its {takes}, "
            f"one input reaches it as {shape}; pass the shape of one input of the branch, without batch"
        )


def _dtype_of(layer: nn.Module, model: nn.Module) -> torch.dtype:
    for tensor in (*layer.parameters(), *model.parameters()):
        return tensor.dtype
    return torch.get_default_dtype()
