"""The model a run trains, from its data set and model options."""

from __future__ import annotations

from typing import Any

from ..data.toy import TOY_DATASETS
from .classifier import Classifier, iresnet_classifier
from .density import DensityModel
from .hybrid import HybridModel, hybrid_model
from .image import image_flow
from .toy import toy_flow

__all__ = ["build_density_model", "build_model"]


def build_density_model(data: str, options: dict[str, Any]) -> DensityModel:
    """:func:`toy_flow` for a toy 2-D data set, :func:`image_flow` (with the data set's shape and
    levels) for an image data set; ``options`` are the builder's keyword arguments."""
    if data in TOY_DATASETS:
        return _call(toy_flow, options, 2)
    from ..data.images import IMAGE_DATASETS

    if data not in IMAGE_DATASETS:
        raise ValueError(f"unknown data set {data!r}")
    spec = IMAGE_DATASETS[data]
    return _call(image_flow, options, spec.shape, spec.levels)


def build_model(task: str, data: str, options: dict[str, Any]) -> DensityModel | Classifier | HybridModel:
    """The model of a run: a density model (``task="density"``), the i-ResNet classifier
    (``task="classify"``) or the hybrid model (``task="hybrid"``), the last two for image data
    only, with the data set's shape, classes and levels."""
    if task == "density":
        return build_density_model(data, options)
    from ..data.images import IMAGE_DATASETS

    if data not in IMAGE_DATASETS:
        raise ValueError(f"task {task!r} needs a labelled image data set ({', '.join(IMAGE_DATASETS)}), got {data!r}")
    spec = IMAGE_DATASETS[data]
    if task == "hybrid":
        return _call(hybrid_model, options, spec.shape, spec.levels, spec.classes)
    return _call(iresnet_classifier, {"levels": spec.levels, **options}, spec.shape, spec.classes)


def _call(builder, options: dict[str, Any], *args: Any) -> DensityModel:
    try:
        return builder(*args, **options)
    except TypeError as error:
        import inspect

        known = [p for p in inspect.signature(builder).parameters if p not in ("dim", "shape", "levels", "classes")]
        if builder is hybrid_model:  # its other options are the image flow's
            known = [
                "classifier",
                *(p for p in inspect.signature(image_flow).parameters if p not in ("shape", "levels")),
            ]
        raise ValueError(f"bad model options {options} for {builder.__name__} ({error}); known: {known}") from None
