"""Checks on the tensors users hand to the layers, and on the options of the model builders:
clear errors instead of wrong answers (or of an error deep in torch)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "NonFiniteInputError",
    "check_choice",
    "check_coeff",
    "check_count",
    "check_flag",
    "check_input",
    "check_interval",
    "check_stages",
    "reports_non_finite_input",
]


class NonFiniteInputError(ValueError):
    """A layer's input holds NaN or inf: upstream values have overflowed (in training, a sign
    that the weights diverged)."""


def reports_non_finite_input(error: BaseException) -> bool:
    """Whether ``error`` is :func:`check_input`'s report of NaN or inf among a layer's inputs: its
    :class:`NonFiniteInputError` eagerly, its device assertion's message when compiled."""
    return isinstance(error, NonFiniteInputError) or (isinstance(error, RuntimeError) and "NaN or inf" in str(error))


def check_input(
    x: Tensor,
    name: str,
    event_shape: tuple[int, ...] | None,
    dtype: torch.dtype | None,
    finite: bool = True,
) -> None:
    """Raise ``ValueError`` unless ``x`` is a floating tensor of shape ``(batch, *event_shape)``
    and dtype ``dtype`` (where given) holding only finite numbers (unless ``finite`` is off: for a
    container whose layers check the values, the pass over them and the wait for it once)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise ValueError(
            f"{name}: expected dtype {dtype} (the dtype of the parameters), got {x.dtype}; "
            f"convert the input or the module with .to({dtype})"
        )
    if x.dim() < 2:
        raise ValueError(f"{name}: expected a batch of shape (batch, ...), got shape {tuple(x.shape)}")
    if event_shape is not None and tuple(x.shape[1:]) != tuple(event_shape):
        raise ValueError(f"{name}: expected shape (batch, {', '.join(map(str, event_shape))}), got {tuple(x.shape)}")
    if not finite:
        return
    if torch.compiler.is_compiling():  # checked on the device: no graph break, no wait for the host
        torch._assert_async(torch.isfinite(x).all(), f"{name}: the input holds NaN or inf")
        return
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
        raise NonFiniteInputError(f"{name}: {bad} of {x.shape[0]} samples hold NaN or inf")


def check_count(name: str, value: object, minimum: int = 1) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer (not a bool) of at least ``minimum``.

    >>> check_count("hidden", -3)
    Traceback (most recent call last):
        ...
    ValueError: hidden must be an integer of at least 1, got -3
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer of at least {minimum}, got {value!r}")


def _positive_integers(value: object) -> bool:
    """Whether ``value`` is a non-empty list or tuple of integers (not bools) of at least 1."""
    return (
        isinstance(value, (list, tuple))
        and bool(value)
        and all(not isinstance(v, bool) and isinstance(v, int) and v >= 1 for v in value)
    )


def check_stages(name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is a list or tuple of integers of at least 1, one per stage."""
    if not _positive_integers(value):
        raise ValueError(f"{name} must be a list of integers of at least 1, one per stage, got {value!r}")


def check_shape(name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is the shape of one input without batch: a tuple (or
    list) of integers of at least 1."""
    if not _positive_integers(value):
        raise ValueError(
            f"{name} must be a tuple of integers of at least 1, the shape of one input without batch "
            f"(such as (3,) for 3 features), got {value!r}"
        )


def check_flag(name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of the strings ``choices``.

    >>> check_choice("activation", "tanh", ("elu", "lipswish", "relu"))
    Traceback (most recent call last):
        ...
    ValueError: activation must be one of 'elu', 'lipswish', 'relu', got 'tanh'
    """
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_interval(
    name: str, value: object, low: float, high: float = math.inf, *, closed: bool = False, optional: bool = False
) -> None:
    """Raise ``ValueError`` unless ``value`` is a number (not a bool) in the open interval
    ``(low, high)`` (``closed``: ``[low, high]``), or ``None`` where ``optional``.

    >>> check_interval("atol", -1.0, 0, optional=True)
    Traceback (most recent call last):
        ...
    ValueError: atol must be a number in (0, inf), or null, got -1.0
    """
    if value is None and optional:
        return
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)  # NumPy's scalars too
    number = float(value) if real else math.nan  # type: ignore[arg-type]  # a Real there; NaN lies in no interval
    inside = low <= number <= high if closed else low < number < high
    if not inside:
        interval = f"[{low:g}, {high:g}]" if closed else f"({low:g}, {high:g})"
        null = ", or null" if optional else ""
        raise ValueError(f"{name} must be a number in {interval}{null}, got {value!r}")


def check_coeff(value: object, *, optional: bool = False) -> None:
    """Raise ``ValueError`` unless ``value``, the Lipschitz bound of every residual branch, lies in
    ``(0, 1)``, where the blocks are invertible and the log-det series converge (``optional``:
    ``None`` too, a plain ResNet)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        allowed = "a number in (0, 1), or null for unconstrained branches" if optional else "a number in (0, 1)"
        baseline = (
            "; null (unnormalised branches) is only for the classifier's ResNet baseline: nothing certifies a flow "
            "whose branches are not contractive"
            if value is None
            else ""
        )
        raise ValueError(
            f"coeff must be {allowed} (each residual branch's Lipschitz bound, below 1 for the block to be "
            f"invertible), got {value!r}{baseline}"
        )
