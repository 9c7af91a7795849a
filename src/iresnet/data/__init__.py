"""Data: toy 2-D densities and the pre-processing of discrete images."""

from .preprocess import Logit, UniformDequantize, bits_per_dim
from .toy import TOY_DATASETS, eight_gaussians_log_prob, sample_toy, toy_entropy

__all__ = [
    "TOY_DATASETS",
    "Logit",
    "UniformDequantize",
    "bits_per_dim",
    "eight_gaussians_log_prob",
    "sample_toy",
    "toy_entropy",
]
