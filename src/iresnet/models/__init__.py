"""Model builders: the toy flow, the multi-scale image flow, the i-ResNet classifier, and the presets."""

from .classifier import Classifier, InjectivePad, iresnet_classifier
from .density import DensityModel
from .image import MultiScale, image_flow
from .toy import toy_flow

__all__ = ["Classifier", "DensityModel", "InjectivePad", "MultiScale", "image_flow", "iresnet_classifier", "toy_flow"]
