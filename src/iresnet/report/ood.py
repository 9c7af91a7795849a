r"""Out-of-distribution use of the likelihood: the bits/dim of another data set under a density
model trained on images, and how well the log-likelihood tells the two apart (the AUROC).

A flow need not give out-of-distribution data a lower likelihood: Nalisnick et al. found that
flows trained on CIFAR-10 give SVHN higher likelihood, so an AUROC below 1/2 is a finding to
report, never a sign to flip.

References:
    Nalisnick, Matsukawa, Teh, Gorur, Lakshminarayanan, "Do Deep Generative Models Know What
    They Don't Know?", ICLR 2019, https://arxiv.org/abs/1810.09136

    Mann, Whitney, "On a Test of Whether one of Two Random Variables is Stochastically Larger
    than the Other", Ann. Math. Statist. 18(1), 1947
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from ..core.lipschitz import converge_spectral_norms
from ..core.logdet import LogDetEstimator
from ..data.images import IMAGE_DATASETS, load_images
from ..data.preprocess import bits_per_dim
from ..flows.density import DensityModel
from ..tasks import EVAL_SEED, Evaluation, accurate_estimator, estimators_set_to, summarize

__all__ = ["OOD_CHOICES", "OODReport", "auroc", "compare_likelihoods", "ood_inputs"]

OOD_CHOICES = ("noise", "inverted", *IMAGE_DATASETS)
"""What :func:`ood_inputs` makes: uniform noise, the inverted test images, or an image data set."""


def auroc(in_scores: Tensor, out_scores: Tensor) -> float:
    r"""The area under the ROC curve of a score that is higher in distribution: the Mann-Whitney
    statistic :math:`P(s_{in} > s_{out}) + \frac12 P(s_{in} = s_{out})` over all pairs, counted
    from the sorted distinct values in :math:`O((n + m) \log(n + m))`.

    1 separates perfectly, 1/2 is chance, 0 ranks every out-of-distribution example higher.

    >>> auroc(torch.tensor([2.0, 3.0]), torch.tensor([1.0, 2.0]))  # 3 pairs won, 1 tied
    0.875
    """
    scores_in = torch.as_tensor(in_scores, dtype=torch.float64).flatten()
    scores_out = torch.as_tensor(out_scores, dtype=torch.float64).flatten()
    if len(scores_in) == 0 or len(scores_out) == 0:
        raise ValueError(f"auroc needs scores of both sets, got {len(scores_in)} and {len(scores_out)}")
    if torch.isnan(scores_in).any() or torch.isnan(scores_out).any():
        raise ValueError("auroc: the scores hold NaN")
    values, index = torch.unique(torch.cat([scores_in, scores_out]), return_inverse=True)  # sorted
    in_at = torch.bincount(index[: len(scores_in)], minlength=len(values)).double()
    out_at = torch.bincount(index[len(scores_in) :], minlength=len(values)).double()
    out_below = out_at.cumsum(0) - out_at
    wins = (in_at * (out_below + out_at / 2)).sum()
    return (wins / (len(scores_in) * len(scores_out))).item()


def ood_inputs(
    name: str,
    test_images: Tensor,
    levels: int,
    generator: torch.Generator,
    root: str | os.PathLike | None = None,
    download: bool = False,
) -> Tensor:
    """Integer images to set against ``test_images`` (N, C, H, W) of ``levels`` intensity levels,
    in their dtype and shape:

    - ``"noise"``: N images of independent uniform levels in ``[0, levels)``, drawn from ``generator``;
    - ``"inverted"``: ``levels - 1 - test_images``;
    - an image data set of :data:`~iresnet.data.IMAGE_DATASETS` with the same shape and levels:
      the first N of its test images (fewer if it has fewer), loaded from ``root``.

    Raises ``ValueError`` for another name, or a data set whose shape or levels differ (before
    reading any file)."""
    if name == "noise":
        return torch.randint(0, levels, test_images.shape, generator=generator, dtype=test_images.dtype)
    if name == "inverted":
        return (levels - 1 - test_images.long()).to(test_images.dtype)
    if name not in IMAGE_DATASETS:
        raise ValueError(f"unknown out-of-distribution data {name!r}; choose one of {', '.join(OOD_CHOICES)}")
    spec, shape = IMAGE_DATASETS[name], tuple(test_images.shape[1:])
    if spec.shape != shape or spec.levels != levels:
        raise ValueError(
            f"{name} images have shape {spec.shape} and {spec.levels} levels, "
            f"the run's have shape {shape} and {levels} levels"
        )
    images, _ = load_images(name, root, train=False, download=download)
    return images[: len(test_images)].to(test_images.dtype)


@dataclass
class OODReport:
    """The test set's and the out-of-distribution set's likelihoods under one model, and the
    AUROC of the log-likelihood as a score for being in distribution. ``in_bits_per_dim`` and
    ``out_bits_per_dim`` hold the bits/dim of every example."""

    in_distribution: Evaluation
    out_of_distribution: Evaluation
    auroc: float
    in_bits_per_dim: Tensor = field(repr=False)
    out_bits_per_dim: Tensor = field(repr=False)


@torch.no_grad()
def _log_likelihoods(model: DensityModel, images: Tensor, batch_size: int, progress: bool, desc: str) -> Tensor:
    device = next(model.parameters()).device
    batches = images.split(batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=desc, unit="batch", leave=False)
    return torch.cat([model(x.to(device)).double().cpu() for x in batches])


def compare_likelihoods(
    model: DensityModel,
    in_images: Tensor,
    out_images: Tensor,
    estimator: LogDetEstimator | Literal["auto"] | None = "auto",
    batch_size: int = 500,
    *,
    seed: int = EVAL_SEED,
    progress: bool = False,
) -> OODReport:
    r"""Bits/dim of integer images ``in_images`` (the test set) and ``out_images`` under
    ``model``, as :func:`~iresnet.tasks.evaluate` computes them: eval mode, spectral norms
    converged, ``estimator`` in every block (``"auto"``: :func:`~iresnet.tasks.accurate_estimator`;
    ``None``: the blocks' own),
    the dequantisation noise and probes drawn after ``torch.manual_seed(seed)`` (the global
    generators are restored afterwards). The AUROC scores each example by :math:`\log p(x)`,
    higher meaning in distribution, and is reported as it is, below 1/2 too (Nalisnick et al.,
    ICLR 2019: flows may give other data a higher likelihood)."""
    model.eval()
    converge_spectral_norms(model)
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with estimators_set_to(model, accurate_estimator() if estimator == "auto" else estimator):
            in_log_p = _log_likelihoods(model, in_images, batch_size, progress, "in distribution")
            out_log_p = _log_likelihoods(model, out_images, batch_size, progress, "out of distribution")
    size = model.event_size
    return OODReport(
        in_distribution=summarize(in_log_p, size, discrete=True),
        out_of_distribution=summarize(out_log_p, size, discrete=True),
        auroc=auroc(in_log_p, out_log_p),
        in_bits_per_dim=bits_per_dim(in_log_p, size),
        out_bits_per_dim=bits_per_dim(out_log_p, size),
    )
