"""Model builders: the toy flow, the multi-scale image flow, the i-ResNet classifier, the hybrid model, and the
presets."""

from ..flows.density import DensityModel
from .classifier import Classifier, InjectivePad, iresnet_classifier
from .hybrid import HybridModel, hybrid_model
from .image import MultiScale, image_flow
from .toy import toy_flow

__all__ = [
    "Classifier",
    "DensityModel",
    "HybridModel",
    "InjectivePad",
    "MultiScale",
    "hybrid_model",
    "image_flow",
    "iresnet_classifier",
    "toy_flow",
]
