"""The model a run trains, from its data set and model options."""

from __future__ import annotations

from typing import Any

from ..data.toy import TOY_DATASETS
from ..flows.density import DensityModel
from .classifier import Classifier, iresnet_classifier
from .hybrid import HybridModel, hybrid_model
from .image import image_flow
from .options import ClassifierOptions, HybridOptions, ImageFlowOptions, ToyFlowOptions
from .toy import toy_flow

__all__ = ["build_density_model", "build_model", "model_options"]

_FROM_THE_DATA = ("dim", "shape", "levels", "classes")  # what the data set decides, not model.KEY


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
    return _call(iresnet_classifier, options, spec.shape, spec.classes, levels=spec.levels)


_OPTIONS = {
    toy_flow: ToyFlowOptions,
    image_flow: ImageFlowOptions,
    hybrid_model: HybridOptions,
    iresnet_classifier: ClassifierOptions,
}


def model_options(builder) -> dict[str, Any]:
    """The options ``model.KEY`` of ``builder`` with their defaults: the fields of its options
    class (:mod:`iresnet.models.options`), the builder's own first."""
    return _OPTIONS[builder]().to_dict()


def _call(builder, options: dict[str, Any], *args: Any, **from_data: Any) -> DensityModel:
    """``builder(*args, **from_data)`` with ``options`` read into the builder's options class,
    which refuses an unknown option or a bad value; errors the builder raises pass through as they are."""
    fixed = [key for key in options if key in _FROM_THE_DATA]
    if fixed:
        raise ValueError(f"model option {fixed[0]!r} is set by the data set, not by model.{fixed[0]}=...")
    return builder(*args, **from_data, options=_OPTIONS[builder].from_dict(options))
