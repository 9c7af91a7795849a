"""Model builders: the toy flow, the multi-scale image flow, the i-ResNet classifier, the hybrid model, and the
presets."""

from ..core.layers import InjectivePad
from ..flows.density import DensityModel
from ..flows.multiscale import MultiScale
from .classifier import Classifier, iresnet_classifier
from .hybrid import HybridModel, hybrid_model
from .image import image_flow
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
