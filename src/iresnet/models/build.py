"""The model a run trains, from its data set and model options."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from ..data.images import IMAGE_DATASETS, ImageSpec, image_spec
from ..flows.density import DensityModel
from .classifier import Classifier, iresnet_classifier
from .hybrid import HybridModel, hybrid_model
from .image import image_flow
from .options import BranchOptions, ClassifierOptions, HybridOptions, ImageFlowOptions, ToyFlowOptions
from .toy import toy_flow

__all__ = ["build_classifier", "build_density_model", "build_hybrid_model", "build_model", "model_options"]

_FROM_THE_DATA = ("dim", "shape", "levels", "classes")  # what the data set decides, not model.KEY

_Model = TypeVar("_Model", bound=nn.Module)


def build_density_model(data: str, options: dict[str, Any]) -> DensityModel:
    """:func:`toy_flow` for a toy 2-D data set, :func:`image_flow` (with the data set's shape and
    levels) for an image data set; ``options`` are the builder's keyword arguments."""
    spec = image_spec(data)
    if spec is None:
        return _call(toy_flow, options, 2)
    return _call(image_flow, options, spec.shape, spec.levels)


def build_classifier(data: str, options: dict[str, Any]) -> Classifier:
    """:func:`iresnet_classifier` with the image data set's shape, classes and levels."""
    spec = _labelled_images(data, iresnet_classifier)
    return _call(iresnet_classifier, options, spec.shape, spec.classes, levels=spec.levels)


_OPTIONS: dict[Callable[..., nn.Module], type[BranchOptions]] = {
    toy_flow: ToyFlowOptions,
    image_flow: ImageFlowOptions,
    hybrid_model: HybridOptions,
    iresnet_classifier: ClassifierOptions,
}


def build_hybrid_model(data: str, options: dict[str, Any]) -> HybridModel:
    """:func:`hybrid_model` with the image data set's shape, levels and classes."""
    spec = _labelled_images(data, hybrid_model)
    return _call(hybrid_model, options, spec.shape, spec.levels, spec.classes)


def build_model(task: str, data: str, options: dict[str, Any]) -> DensityModel | Classifier | HybridModel:
    """The model of a run of ``task`` on ``data``: the task's builder (see :mod:`iresnet.tasks`)."""
    from ..tasks import get_task  # the tasks build on this module

    return get_task(task).build_model(data, options)


def _labelled_images(data: str, builder: Callable[..., nn.Module]) -> ImageSpec:
    spec = image_spec(data)
    if spec is None:
        raise ValueError(
            f"{builder.__name__} needs a labelled image data set ({', '.join(IMAGE_DATASETS)}), got {data!r}"
        )
    return spec


def model_options(builder: Callable[..., nn.Module]) -> dict[str, Any]:
    """The options ``model.KEY`` of ``builder`` with their defaults: the fields of its options
    class (:mod:`iresnet.models.options`), the builder's own first."""
    return _OPTIONS[builder]().to_dict()


def _call(builder: Callable[..., _Model], options: dict[str, Any], *args: Any, **from_data: Any) -> _Model:
    """``builder(*args, **from_data)`` with ``options`` read into the builder's options class,
    which refuses an unknown option or a bad value; errors the builder raises pass through as they are."""
    fixed = [key for key in options if key in _FROM_THE_DATA]
    if fixed:
        raise ValueError(f"model option {fixed[0]!r} is set by the data set, not by model.{fixed[0]}=...")
    return builder(*args, **from_data, options=_OPTIONS[builder].from_dict(options))
