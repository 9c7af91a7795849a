"""Data: toy 2-D densities."""

from .toy import TOY_DATASETS, eight_gaussians_log_prob, sample_toy, toy_entropy

__all__ = ["TOY_DATASETS", "eight_gaussians_log_prob", "sample_toy", "toy_entropy"]
