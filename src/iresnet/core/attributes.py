"""Setting an attribute on many objects for the length of a ``with`` block."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["attribute_set"]


@contextlib.contextmanager
def attribute_set(objects: Iterable[Any], name: str, value: Any) -> Iterator[None]:
    """Within the context every object's ``name`` is ``value``; after it, what it was before."""
    objects = list(objects)
    saved = [getattr(obj, name) for obj in objects]
    for obj in objects:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, previous in zip(objects, saved):
            setattr(obj, name, previous)
