"""Data: toy 2-D densities and the pre-processing of discrete images."""

from .images import IMAGE_DATASETS, PHOTOGRAPHS, TEST_PHOTOGRAPHS, ImageSpec, image_spec, load_images, patch_sources
from .preprocess import Logit, Rescale, Shift, UniformDequantize, VariationalDequantize, bits_per_dim
from .toy import TOY_DATASETS, eight_gaussians_log_prob, sample_toy, toy_entropy

__all__ = [
    "IMAGE_DATASETS",
    "PHOTOGRAPHS",
    "TEST_PHOTOGRAPHS",
    "TOY_DATASETS",
    "ImageSpec",
    "Logit",
    "Rescale",
    "Shift",
    "UniformDequantize",
    "VariationalDequantize",
    "bits_per_dim",
    "eight_gaussians_log_prob",
    "image_spec",
    "load_images",
    "patch_sources",
    "sample_toy",
    "toy_entropy",
]
