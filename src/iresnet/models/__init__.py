"""Model builders: the toy flow, the multi-scale image flow, and the presets."""

from .density import DensityModel
from .image import MultiScale, image_flow
from .toy import toy_flow

__all__ = ["DensityModel", "MultiScale", "image_flow", "toy_flow"]
