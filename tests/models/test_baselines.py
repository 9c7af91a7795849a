"""The baseline density models: independent categorical pixels and a full-covariance Gaussian,
scored as log-densities of dequantised images on the integer scale."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from iresnet.data import bits_per_dim
from iresnet.models.baselines import FullCovarianceGaussian, IndependentPixels


def random_images(n: int, levels: int, shape=(1, 3, 3), seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(levels, (n, *shape), generator=generator, dtype=torch.uint8)


def noise_moments(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fit FullCovarianceGaussian documents: the moments of x plus those of u ~ U[0, 1)^D."""
    points = images.double().flatten(1)
    size = points.shape[1]
    return points.mean(0) + 0.5, torch.cov(points.T, correction=0) + torch.eye(size, dtype=torch.float64) / 12


def dequantise_in_chunks(images: torch.Tensor, batch_size: int, seed: int) -> torch.Tensor:
    """x + u with u drawn as FullCovarianceGaussian.log_prob documents: one torch.rand per chunk."""
    generator = torch.Generator().manual_seed(seed)
    return torch.cat(
        [
            chunk.double() + torch.rand(chunk.shape, generator=generator, dtype=torch.float64)
            for chunk in images.split(batch_size)
        ]
    )


# ---------------------------------------------------------------------------------------------
# IndependentPixels


@pytest.mark.parametrize("levels, pseudocount", [(17, 1.0), (256, 1.0), (5, 0.5)])
def test_pixel_probabilities_sum_to_one(levels, pseudocount):
    model = IndependentPixels(levels, pseudocount=pseudocount).fit(random_images(40, min(levels, 7)))
    probs = model.probs
    assert probs.shape == (1, 3, 3, levels) and probs.dtype == torch.float64
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 3, 3, dtype=torch.float64))
    assert (probs > 0).all()  # smoothing leaves no level impossible, unseen ones included


def test_pixel_log_prob_matches_hand_computation():
    # Three images of 1 x 1 x 2 pixels, 4 levels; N + L = 7 after add-one smoothing.
    train = torch.tensor([[0, 3], [0, 1], [2, 1]], dtype=torch.uint8).view(3, 1, 1, 2)
    model = IndependentPixels(levels=4).fit(train)
    # pixel 0 counts (2, 0, 1, 0) -> (3, 1, 2, 1) / 7; pixel 1 counts (0, 2, 0, 1) -> (1, 3, 1, 2) / 7
    expected_probs = torch.tensor([[3, 1, 2, 1], [1, 3, 1, 2]], dtype=torch.float64) / 7
    torch.testing.assert_close(model.probs.view(2, 4), expected_probs)
    test = torch.tensor([[0, 1], [3, 0], [2, 3]]).view(3, 1, 1, 2)  # int64 input is fine too
    expected = torch.tensor([math.log(3 / 7 * 3 / 7), math.log(1 / 7 * 1 / 7), math.log(2 / 7 * 2 / 7)])
    torch.testing.assert_close(model.log_prob(test), expected.double())


def test_pixel_batching_does_not_change_the_result():
    images = random_images(50, 17)
    whole = IndependentPixels(17).fit(images)
    batched = IndependentPixels(17, batch_size=7).fit(images)
    torch.testing.assert_close(batched.log_probs, whole.log_probs)
    torch.testing.assert_close(batched.log_prob(images), whole.log_prob(images))


def test_pixel_log_prob_is_a_normalised_density_of_the_dequantised_image():
    # Summing P(x) over all L^D images of a 2-pixel model gives 1: the density of x + u, equal
    # to P(x) on each unit cell, integrates to 1 over [0, L)^2.
    model = IndependentPixels(5).fit(random_images(30, 5, shape=(1, 1, 2)))
    grid = torch.cartesian_prod(torch.arange(5), torch.arange(5)).view(25, 1, 1, 2)
    torch.testing.assert_close(model.log_prob(grid).exp().sum(), torch.tensor(1.0, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# FullCovarianceGaussian


def test_gaussian_log_prob_equals_multivariate_normal_on_the_same_points():
    train, test = random_images(300, 256, seed=1), random_images(20, 256, seed=2)
    model = FullCovarianceGaussian(shrinkage=False).fit(train)
    reference = MultivariateNormal(model.mean, covariance_matrix=model.covariance)
    # The documented draw: one torch.rand of the images' shape, float64, when N <= batch_size.
    noise = torch.rand(test.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    points = test.double() + noise
    expected = reference.log_prob(points.flatten(1))
    torch.testing.assert_close(model.log_prob(test, generator=torch.Generator().manual_seed(4)), expected)
    torch.testing.assert_close(model.log_density(points), expected)
    # and the fit itself is the moments of x plus those of the noise
    mean, covariance = noise_moments(train)
    torch.testing.assert_close(model.mean, mean)
    torch.testing.assert_close(model.covariance, covariance)


def test_gaussian_fit_recovers_a_known_mean_and_covariance():
    # x = M b + c with b ~ Bernoulli(p)^4 i.i.d. is integer-valued, with E[x] = c + p M 1 and
    # Cov[x] = p (1 - p) M M^T; adding independent u ~ U[0, 1)^3 adds 1/2 to the mean and
    # I / 12 to the covariance.
    n, p = 200_000, 0.3
    mixing = torch.tensor([[1, 0, 2, 0], [0, 1, 1, 0], [3, 0, 0, 1]], dtype=torch.float64)
    offset = torch.tensor([5.0, 0.0, 2.0], dtype=torch.float64)
    generator = torch.Generator().manual_seed(5)
    bits = (torch.rand(n, 4, generator=generator, dtype=torch.float64) < p).double()
    images = (bits @ mixing.T + offset).to(torch.uint8).view(n, 3, 1, 1)
    model = FullCovarianceGaussian(batch_size=50_000).fit(images)

    true_mean = offset + p * mixing.sum(1) + 0.5
    true_cov = p * (1 - p) * mixing @ mixing.T + torch.eye(3, dtype=torch.float64) / 12
    # Tolerances from the sample size: 6 standard errors. The standard error of a covariance
    # entry is std[(y_i - mu_i)(y_j - mu_j)] / sqrt(n), estimated on an independent sample.
    check = torch.rand(n, 4, generator=generator, dtype=torch.float64) < p
    y = check.double() @ mixing.T + offset + torch.rand(n, 3, generator=generator, dtype=torch.float64)
    products = (y - true_mean)[:, :, None] * (y - true_mean)[:, None, :]
    mean_tolerance = 6 * true_cov.diagonal().sqrt() / math.sqrt(n)
    cov_tolerance = 6 * products.std(0) / math.sqrt(n)
    assert ((model.mean - true_mean).abs() <= mean_tolerance).all()
    assert ((model.covariance - true_cov).abs() <= cov_tolerance).all()
    assert cov_tolerance.max() < 0.05  # the test has teeth: the entries range up to 2.2


def test_gaussian_in_chunks_matches_the_documented_moments_and_draws():
    # batch_size=13 on 100 images: 8 chunks. The chunked, shifted accumulation of the moments
    # must give exactly the moments of x plus the noise's; log_prob dequantises each chunk by
    # its own torch.rand draw.
    images = random_images(100, 256)
    model = FullCovarianceGaussian(shrinkage=False, batch_size=13).fit(images)
    mean, covariance = noise_moments(images)
    torch.testing.assert_close(model.mean, mean)
    torch.testing.assert_close(model.covariance, covariance)
    whole = FullCovarianceGaussian(shrinkage=False).fit(images)
    torch.testing.assert_close(model.mean, whole.mean)
    torch.testing.assert_close(model.covariance, whole.covariance)
    # the shrunk fit's second pass (sum of |x_n - mean|^4) in chunks, too
    shrunk, shrunk_whole = FullCovarianceGaussian(batch_size=13).fit(images), FullCovarianceGaussian().fit(images)
    assert shrunk_whole.delta is not None and 0 < shrunk_whole.delta <= 1
    assert shrunk.delta == pytest.approx(shrunk_whole.delta, rel=1e-12)
    torch.testing.assert_close(shrunk.covariance, shrunk_whole.covariance)
    points = dequantise_in_chunks(images, 13, seed=7)
    expected = MultivariateNormal(model.mean, covariance_matrix=model.covariance).log_prob(points.flatten(1))
    torch.testing.assert_close(model.log_prob(images, generator=torch.Generator().manual_seed(7)), expected)


def test_gaussian_noise_keeps_a_degenerate_fit_finite():
    # Two images in 9 dimensions: the scatter matrix of x has rank 1; the noise's I / 12 makes
    # the covariance positive definite, every eigenvalue at least 1/12, with no ridge.
    images = random_images(2, 256)
    model = FullCovarianceGaussian().fit(images)
    assert torch.linalg.eigvalsh(model.covariance).min() >= 1 / 12 - 1e-9
    assert torch.isfinite(model.log_prob(images)).all()
    # a single image: Cov(x) = 0, so the covariance is exactly I / 12
    one = FullCovarianceGaussian().fit(images[:1])
    torch.testing.assert_close(one.covariance, torch.eye(9, dtype=torch.float64) / 12)
    torch.testing.assert_close(one.mean, images[0].double().flatten() + 0.5)


def test_gaussian_with_fewer_images_than_dimensions_stays_sane():
    # The shape of the bug on patches32 and faces: N = 20 images of 1 x 8 x 8 (D = 64) of a
    # low-rank integer signal plus independent integer pixel noise, x = 40 + W P + e with 3
    # integer patterns P, integer weights W and e_d uniform on {0, ..., 8} (variance 20/3).
    # A Gaussian fitted to one draw of x + u has a covariance of rank <= 19: the 45 missing
    # directions, where x + u still varies by e and u, get only the ridge of 1e-3, and fresh
    # test images score absurdly. The noise's exact moments give them 1/12: finite, but still
    # far below the variance of e; Ledoit-Wolf shrinkage toward m I gives them a share of the
    # average variance and scores better still.
    levels, n, size = 256, 20, 64
    generator = torch.Generator().manual_seed(8)
    patterns = torch.randint(0, 6, (3, size), generator=generator).double()

    def sample(count: int) -> torch.Tensor:
        weights = torch.randint(0, 11, (count, 3), generator=generator).double()
        noise = torch.randint(0, 9, (count, size), generator=generator).double()
        return (40 + weights @ patterns + noise).to(torch.uint8).view(count, 1, 8, 8)  # <= 40 + 150 + 8

    train, test = sample(n), sample(200)
    uniform_bpd = math.log2(levels)
    pixels_bpd = bits_per_dim(IndependentPixels(levels).fit(train).log_prob(test), size).mean().item()

    # the old estimate: moments of one draw of x + u, plus a ridge of 1e-3
    points = dequantise_in_chunks(train, n, seed=9).flatten(1)
    ridge = 1e-3 * torch.eye(size, dtype=torch.float64)
    old = MultivariateNormal(points.mean(0), covariance_matrix=torch.cov(points.T, correction=0) + ridge)
    old_bpd = bits_per_dim(old.log_prob(dequantise_in_chunks(test, 200, seed=10).flatten(1)), size).mean().item()
    assert old_bpd > 4 * uniform_bpd and old_bpd > 4 * pixels_bpd, old_bpd  # the bug, reproduced

    def score(model: FullCovarianceGaussian) -> float:
        scores = model.log_prob(test, generator=torch.Generator().manual_seed(10))
        assert torch.isfinite(scores).all()
        return bits_per_dim(scores, size).mean().item()

    plain = FullCovarianceGaussian(shrinkage=False).fit(train)
    assert torch.linalg.eigvalsh(plain.covariance).min() >= 1 / 12 - 1e-9
    plain_bpd = score(plain)
    assert plain_bpd < old_bpd, (plain_bpd, old_bpd)

    model = FullCovarianceGaussian().fit(train)
    assert model.delta is not None and 0 < model.delta < 1, model.delta
    assert torch.linalg.eigvalsh(model.covariance).min() > 1 / 12  # shrinkage lifts every direction
    new_bpd = score(model)
    assert 0 < new_bpd < min(uniform_bpd, pixels_bpd, plain_bpd - 1), (new_bpd, pixels_bpd, plain_bpd, old_bpd)


# ---------------------------------------------------------------------------------------------
# Ledoit-Wolf shrinkage


def previous_fit(images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fit before shrinkage, step for step: moments about the first chunk's mean, then
    symmetrised, plus I / 12."""
    points = [chunk.double().flatten(1) for chunk in images.split(batch_size)]
    shift = points[0].mean(0)
    size = len(shift)
    total = torch.zeros(size, dtype=torch.float64)
    scatter = torch.zeros(size, size, dtype=torch.float64)
    for chunk in points:
        centred = chunk - shift
        total += centred.sum(0)
        scatter += centred.T @ centred
    offset = total / len(images)
    covariance = scatter / len(images) - torch.outer(offset, offset)
    covariance = (covariance + covariance.T) / 2 + torch.eye(size, dtype=torch.float64) / 12
    return shift + offset + 0.5, covariance


def test_fourth_moment_identity_matches_the_direct_sum():
    # sum_n |x_n x_n^T - S|_F^2 = sum_n |x_n|^4 - N |S|_F^2 for centred x_n and S = X^T X / N,
    # the identity fit uses instead of forming N matrices of D x D.
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(7, 5, generator=generator, dtype=torch.float64) @ torch.randn(5, 5, generator=generator).double()
    x = x - x.mean(0)
    n = len(x)
    sample = x.T @ x / n
    direct = sum((torch.outer(row, row) - sample).square().sum() for row in x)
    identity = x.square().sum(1).square().sum() - n * sample.square().sum()
    torch.testing.assert_close(identity, direct, rtol=1e-12, atol=0)


@pytest.mark.parametrize("n, shape, batch_size", [(30, (1, 5, 10), 4096), (40, (1, 3, 3), 7), (300, (1, 4, 4), 64)])
def test_shrinkage_matches_scikit_learn(n, shape, batch_size):
    # sklearn.covariance.ledoit_wolf(X, assume_centered=False) centres X, takes S = X^T X / N and
    # the same m = tr(S) / D; it divides both b^2 and d^2 by D (the paper's normalised Frobenius
    # norm, ||A||^2 = tr(A A^T) / D), which cancels in delta = b^2 / d^2. So delta and
    # Sigma_x = delta m I + (1 - delta) S agree, and the fit adds I / 12 to the latter.
    covariance_module = pytest.importorskip("sklearn.covariance")
    generator = torch.Generator().manual_seed(n)
    size = math.prod(shape)
    mixing = torch.randint(0, 3, (size, size), generator=generator).double()  # correlated pixels
    latent = torch.randint(0, 4, (n, size), generator=generator).double()
    images = (latent @ mixing.T).view(n, *shape).to(torch.int64)
    model = FullCovarianceGaussian(batch_size=batch_size).fit(images)
    expected_cov, expected_delta = covariance_module.ledoit_wolf(
        images.double().flatten(1).numpy(), assume_centered=False
    )
    assert model.delta is not None and 0 < model.delta < 1, model.delta
    assert abs(model.delta - expected_delta) < 1e-10
    fitted = model.covariance - torch.eye(size, dtype=torch.float64) / 12
    torch.testing.assert_close(fitted, torch.from_numpy(expected_cov), rtol=1e-10, atol=1e-10)


def test_shrinkage_is_small_with_many_more_images_than_dimensions():
    # N = 20,000 images of D = 6 pixels from a rounded, well-conditioned Gaussian (eigenvalues of
    # its covariance in [~9, ~100]): delta is O(D / N) and the fit is close to Cov(x) + I / 12.
    n, size = 20_000, 6
    generator = torch.Generator().manual_seed(12)
    factor = torch.eye(size, dtype=torch.float64) * 3 + torch.rand(size, size, generator=generator).double() * 3
    gauss = torch.randn(n, size, generator=generator, dtype=torch.float64) @ factor.T
    images = (100 + gauss).round().clamp(0, 255).to(torch.uint8).view(n, 1, 2, 3)
    model = FullCovarianceGaussian().fit(images)
    assert model.delta is not None and 0 <= model.delta < 0.05, model.delta
    _, sample = noise_moments(images)
    relative = (model.covariance - sample).norm() / sample.norm()
    assert relative < 0.01, relative
    torch.testing.assert_close(model.mean, images.double().flatten(1).mean(0) + 0.5)


@pytest.mark.parametrize("n, batch_size", [(100, 4096), (100, 13), (5, 2), (1, 4096)])
def test_no_shrinkage_reproduces_the_previous_fit_exactly(n, batch_size):
    images = random_images(n, 256, shape=(1, 4, 4), seed=n)
    model = FullCovarianceGaussian(shrinkage=False, batch_size=batch_size).fit(images)
    mean, covariance = previous_fit(images, batch_size)
    assert torch.equal(model.mean, mean) and torch.equal(model.covariance, covariance)
    assert model.delta == 0.0


# ---------------------------------------------------------------------------------------------
# both against the uniform density on [0, L)^D, on the digits


def test_both_beat_the_uniform_density_on_digits():
    pytest.importorskip("sklearn")
    from iresnet.data import load_images

    train, _ = load_images("digits", train=True)
    test, _ = load_images("digits", train=False)
    levels, size = 17, 64
    uniform_bpd = math.log2(levels)  # -(-D log L) / (D ln 2)
    generator = torch.Generator().manual_seed(0)
    pixels = IndependentPixels(levels).fit(train)
    gaussian = FullCovarianceGaussian().fit(train)
    pixels_bpd = bits_per_dim(pixels.log_prob(test), size).mean().item()
    gaussian_bpd = bits_per_dim(gaussian.log_prob(test, generator=generator), size).mean().item()
    assert pixels.log_prob(test).mean() > -size * math.log(levels)
    assert gaussian.log_prob(test, generator=generator).mean() > -size * math.log(levels)
    assert pixels_bpd < uniform_bpd - 1 and gaussian_bpd < uniform_bpd - 1, (pixels_bpd, gaussian_bpd)


# ---------------------------------------------------------------------------------------------
# errors


def test_not_fitted_raises():
    with pytest.raises(RuntimeError, match="not fitted"):
        IndependentPixels(17).log_prob(random_images(2, 17))
    with pytest.raises(RuntimeError, match="not fitted"):
        IndependentPixels(17).probs
    with pytest.raises(RuntimeError, match="not fitted"):
        FullCovarianceGaussian().log_prob(random_images(2, 17))
    with pytest.raises(RuntimeError, match="not fitted"):
        FullCovarianceGaussian().log_density(torch.zeros(2, 1, 3, 3))


@pytest.mark.parametrize(
    "bad, message, gaussian_message",
    [
        (torch.full((2, 1, 3, 3), 17), r"integers in \[0, 16\]", None),  # the Gaussian knows no top level
        (torch.full((2, 1, 3, 3), -1), r"integers in \[0, 16\]", r"integers in \[0\]"),
        (torch.full((2, 1, 3, 3), 0.5), "non-integers", "non-integers"),
        (torch.full((2, 1, 3, 3), float("nan")), "non-integers", "non-integers"),
        (torch.zeros(2, 1, 3, 3, dtype=torch.bool), "integer pixel values", "integer pixel values"),
        (torch.zeros(9, dtype=torch.uint8), "non-empty batch", "non-empty batch"),
        (torch.zeros(0, 1, 3, 3, dtype=torch.uint8), "non-empty batch", "non-empty batch"),
        (torch.zeros(2, 1, 4, 4, dtype=torch.uint8), r"shape \(N, 1, 3, 3\) as in fit", r"shape \(N, 1, 3, 3\)"),
    ],
)
def test_bad_images_raise(bad, message, gaussian_message):
    pixels = IndependentPixels(17).fit(random_images(5, 17))
    gaussian = FullCovarianceGaussian().fit(random_images(5, 17))
    with pytest.raises(ValueError, match=message):
        pixels.log_prob(bad)
    if gaussian_message is None:
        assert gaussian.log_prob(bad).shape == (2,)
    else:
        with pytest.raises(ValueError, match=gaussian_message):
            gaussian.log_prob(bad)


def test_bad_training_data_and_arguments_raise():
    with pytest.raises(ValueError, match=r"integers in \[0, 3\]"):
        IndependentPixels(4).fit(torch.full((3, 1, 2, 2), 4))
    with pytest.raises(ValueError, match="non-integers"):
        FullCovarianceGaussian().fit(torch.full((3, 1, 2, 2), 1.5))
    with pytest.raises(ValueError, match="levels"):
        IndependentPixels(1)
    with pytest.raises(ValueError, match="pseudocount"):
        IndependentPixels(4, pseudocount=0)
    with pytest.raises(ValueError, match="batch_size"):
        FullCovarianceGaussian(batch_size=0)
    with pytest.raises(TypeError):
        FullCovarianceGaussian(ridge=1e-3)  # type: ignore[call-arg]  # no ridge: I / 12 suffices
    gaussian = FullCovarianceGaussian().fit(random_images(5, 17))
    with pytest.raises(ValueError, match=r"shape \(N, 1, 3, 3\)"):
        gaussian.log_density(torch.zeros(5, 9))
    with pytest.raises(ValueError, match="NaN or inf"):
        gaussian.log_density(torch.full((5, 1, 3, 3), float("inf")))
