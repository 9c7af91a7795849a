r"""The Fréchet Inception distance (FID) of a trained image run: samples of its flow against its
training images (or reference statistics), ``iresnet fid``.

Each image set is summarised by the mean :math:`\mu` and covariance :math:`\Sigma` of its
features (Inception-v3's 2048 pooled features), and

.. math::
    \mathrm{FID} = \lVert \mu_1 - \mu_2 \rVert^2 + \operatorname{tr}\big(\Sigma_1 + \Sigma_2
    - 2 (\Sigma_1 \Sigma_2)^{1/2}\big),

the squared 2-Wasserstein distance between the Gaussians :math:`N(\mu_i, \Sigma_i)` (Heusel et
al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", NeurIPS
2017, https://arxiv.org/abs/1706.08500). :func:`frechet_distance` is this module's own.

The Inception network comes from the optional extra ``fid`` (``pip install 'iresnet[fid]'``),
torch-fidelity. Of the three packages in use (torch-fidelity, pytorch-fid, clean-fid), it is the
one with a release of the last years (0.4.0; pytorch-fid's last is 0.3.0 of 2023, clean-fid's
0.1.35 of 2023) that installs beside this torch without pins, and the only one whose feature
extractor takes a local weights file in its public constructor
(``FeatureExtractorInceptionV3(..., feature_extractor_weights_path=PATH)``): pytorch-fid's
``fid_inception_v3`` always fetches its weights from a URL, clean-fid loads a TorchScript file.
Its extractor reproduces the TensorFlow FID network (its resize and normalisation included) and
takes uint8 RGB images of any size. Nothing is downloaded here: ``--weights`` names the file
(torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``, :data:`WEIGHTS_URL`), fetched
beforehand on a machine with internet access. The file is read with ``torch.load`` (a pickle):
pass only a file you trust.

The feature extractor is any callable from uint8 images (N, 3, H, W) to features (N, F)
(``features=`` of :func:`fid_run`), so that tests use a small random network instead.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..core.lipschitz import converge_spectral_norms
from ..tasks import get_task
from ..train.checkpoint import load_config, load_run
from ..train.distributed import resolve_device
from ..train.sources import run_source

__all__ = [
    "FIDResult",
    "Statistics",
    "WEIGHTS_URL",
    "feature_statistics",
    "fid_run",
    "frechet_distance",
    "image_statistics",
    "inception_features",
    "load_statistics",
    "to_rgb_uint8",
]

WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
"""Where torch-fidelity's Inception-v3 weights (the TensorFlow FID network, converted) can be had."""

FeatureExtractor = Callable[[Tensor], Tensor]
"""uint8 RGB images (N, 3, H, W) -> features (N, F)."""


@dataclass
class Statistics:
    """The mean ``mu`` (F,) and covariance ``sigma`` (F, F) of ``n`` feature vectors (float64)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None = None


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    r""":math:`S^{1/2} = V \operatorname{diag}(\sqrt{\max(\lambda, 0)}) V^\top` of a symmetric
    positive semi-definite :math:`S = V \operatorname{diag}(\lambda) V^\top` (rounding's small
    negative eigenvalues taken as 0)."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    r""":math:`\lVert \mu_1 - \mu_2 \rVert^2 + \operatorname{tr}(\Sigma_1 + \Sigma_2 - 2 (\Sigma_1 \Sigma_2)^{1/2})`,
    in float64.

    :math:`\Sigma_1 \Sigma_2` is not symmetric, but it is similar to the symmetric positive
    semi-definite :math:`M = \Sigma_1^{1/2} \Sigma_2 \Sigma_1^{1/2}`
    (:math:`\Sigma_1^{-1/2} (\Sigma_1 \Sigma_2) \Sigma_1^{1/2} = M` where :math:`\Sigma_1` is
    invertible, and by continuity otherwise), so
    :math:`\operatorname{tr}(\Sigma_1 \Sigma_2)^{1/2} = \sum_i \sqrt{\lambda_i(M)}`: two
    symmetric eigen-decompositions, no complex parts to discard, and singular covariances (fewer
    samples than features) are fine. The result is clipped at 0 against rounding.

    Example:
        >>> frechet_distance(np.zeros(2), np.diag([1.0, 4.0]), np.ones(2), np.diag([4.0, 9.0]))
        4.0
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    dim = mu1.shape[0]
    if mu1.shape != (dim,) or mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        shapes = [a.shape for a in (mu1, sigma1, mu2, sigma2)]
        raise ValueError(f"the statistics must be means (F,) and covariances (F, F) of one F, got shapes {shapes}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("the statistics hold NaN or inf")
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return max(float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root), 0.0)


def feature_statistics(features: Tensor | np.ndarray) -> Statistics:
    r"""The mean and the unbiased covariance :math:`\frac{1}{n-1} \sum_i (f_i - \mu)(f_i - \mu)^\top`
    of ``features`` (n, F), n >= 2, in float64."""
    values = features.detach().cpu().double().numpy() if isinstance(features, Tensor) else np.asarray(features)
    values = values.astype(np.float64)
    if values.ndim != 2 or values.shape[0] < 2:
        raise ValueError(f"features must have shape (n, F) with n >= 2, got {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("the features hold NaN or inf")
    return Statistics(
        values.mean(0), np.cov(values, rowvar=False).reshape(values.shape[1], values.shape[1]), len(values)
    )


def load_statistics(path: str | os.PathLike) -> Statistics:
    """Reference statistics from an ``.npz`` holding ``mu`` (F,) and ``sigma`` (F, F), as
    pytorch-fid and torch-fidelity write them."""
    with np.load(path) as stored:
        missing = {"mu", "sigma"} - set(stored.files)
        if missing:
            raise ValueError(f"{path} must hold arrays 'mu' and 'sigma' (missing: {', '.join(sorted(missing))})")
        mu, sigma = stored["mu"].astype(np.float64), stored["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu must be (F,) and sigma (F, F), got {mu.shape} and {sigma.shape}")
    return Statistics(mu, sigma)


def to_rgb_uint8(images: Tensor, levels: int) -> Tensor:
    """Images of integer ``levels`` (N, C, H, W), C in {1, 3} (samples: rounded and clipped to
    [0, levels - 1] first), as uint8 RGB in [0, 255]: :math:`\\mathrm{round}(255 k / (L - 1))`,
    grey repeated in each channel."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, C, H, W) with C in {{1, 3}}, got {tuple(images.shape)}")
    values = images.detach().double()
    if not bool(torch.isfinite(values).all()):
        raise ValueError("the images hold NaN or inf (a diverged model?)")
    scaled = (values.round().clamp(0, levels - 1) * (255 / (levels - 1))).round().to(torch.uint8)
    return scaled.expand(-1, 3, -1, -1).contiguous()


def image_statistics(images: Tensor, levels: int, features: FeatureExtractor, batch_size: int = 100) -> Statistics:
    """:func:`feature_statistics` of ``features`` of ``images`` (integer levels, see
    :func:`to_rgb_uint8`), ``batch_size`` images at a time."""
    with torch.no_grad():
        parts = [features(to_rgb_uint8(batch, levels)).detach().cpu().double() for batch in images.split(batch_size)]
    return feature_statistics(torch.cat(parts))


def inception_features(weights: str | os.PathLike, device: str | torch.device = "cpu") -> FeatureExtractor:
    """torch-fidelity's Inception-v3 (the TensorFlow FID network) from the local file ``weights``:
    uint8 RGB images of any size (resized inside to 299 x 299) to their 2048 pooled features.
    ``FileNotFoundError`` where the file is not there, ``ImportError`` without the ``fid`` extra,
    ``ValueError`` for a file that does not hold those weights."""
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"no Inception weights file at {path}: iresnet fid downloads nothing; fetch {WEIGHTS_URL} "
            "where there is internet access and pass its path to --weights"
        )
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as error:
        raise ImportError(
            f"iresnet fid needs the fid extra (torch-fidelity): pip install 'iresnet[fid]' ({error})"
        ) from error
    try:
        network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    except Exception as error:  # an unpickling or state-dict error, whichever the file gives
        raise ValueError(f"{path} does not hold torch-fidelity's Inception-v3 weights: {error}") from error
    network = network.to(device)

    def extract(images: Tensor) -> Tensor:
        with torch.no_grad():
            return network(images.to(device))[0]

    return extract


@dataclass
class FIDResult:
    """The FID between ``n`` samples of ``run`` (drawn with ``seed`` at ``temperature``) and
    ``reference`` (what the statistics it was compared with are), over ``dims`` features."""

    fid: float
    n: int
    run: str
    reference: str
    dims: int
    seed: int = 0
    temperature: float = 1.0

    def __str__(self) -> str:
        at = f" at temperature {self.temperature:g}" if self.temperature != 1 else ""
        return (
            f"FID {self.fid:.4g}: {self.n} samples of {self.run}{at} (seed {self.seed}) against {self.reference}, "
            f"{self.dims} features"
        )


def fid_run(
    run: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    *,
    reference_stats: str | os.PathLike | None = None,
    n: int = 1000,
    seed: int = 0,
    temperature: float = 1.0,
    batch_size: int = 100,
    device: str = "auto",
    features: FeatureExtractor | None = None,
) -> FIDResult:
    r"""``iresnet fid``: the FID between ``n`` samples of an image run's flow (eval mode, spectral
    norms converged, drawn with ``seed`` at ``temperature``, ``batch_size`` at a time, rounded
    to the data's levels) and the first ``n`` of its training images, or the statistics in the
    ``.npz`` ``reference_stats``. ``features`` replaces the Inception network of ``weights``
    (:func:`inception_features`, built first, before any sampling). FID from few samples is
    biased upwards: compare runs at one ``n``.

    ``ValueError`` for a run without a flow, a run of 2-D data, or ``n < 2``."""
    if n < 2:
        raise ValueError(f"n must be at least 2 (a covariance), got {n}")
    config = load_config(run)  # the run first: it decides whether the weights are needed at all
    if not get_task(config.task).generative:
        raise ValueError(f"{run} holds a {config.task!r} run: only runs with a flow can be sampled")
    source = run_source(config)
    if not source.is_image:
        raise ValueError(f"{run} was trained on {config.data!r}: the FID compares images")
    if features is None:
        if weights is None:
            raise ValueError("either the Inception weights or a feature extractor is needed")
        features = inception_features(weights, resolve_device(device))
    reference = load_statistics(reference_stats) if reference_stats is not None else None
    model, config = load_run(run, resolve_device(device))
    flow = get_task(config.task).flow(model)
    if flow is None:
        raise ValueError(f"{run} holds a {config.task!r} run: only runs with a flow can be sampled")
    data = source.image_data()
    converge_spectral_norms(flow)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        batches = [flow.sample(len(part), temperature=temperature).cpu() for part in torch.arange(n).split(batch_size)]
    samples = image_statistics(torch.cat(batches), data.levels, features, batch_size)
    if reference is None:
        train = data.train[:n]
        reference = image_statistics(train, data.levels, features, batch_size)
        against = f"{len(train)} training images"
    else:
        against = f"the statistics in {reference_stats}"
    if reference.mu.shape != samples.mu.shape:
        raise ValueError(
            f"the reference statistics have {reference.mu.shape[0]} features, the samples' {len(samples.mu)}"
        )
    fid = frechet_distance(samples.mu, samples.sigma, reference.mu, reference.sigma)
    if not math.isfinite(fid):
        raise FloatingPointError(f"the FID of {run} is not finite")
    return FIDResult(fid, n, str(run), against, len(samples.mu), seed, temperature)
