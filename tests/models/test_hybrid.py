"""The hybrid model: one pass gives the logits and log p(x); log p(x) is the flow's, with the
standard prior or the class-conditional mixture; the mixture's classifier is Bayes' rule on it."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import jacobian_logdet
from iresnet import Sequential
from iresnet.models import DensityModel, HybridModel, hybrid_model

OPTIONS = {"scales": 2, "blocks": 1, "hidden": 8, "logdet": "exact", "squeeze_first": True, "fc_blocks": 0}


def ready(model: HybridModel, x: torch.Tensor) -> HybridModel:
    """The model after its first call, in eval mode."""
    model(x)  # ActNorm's data-dependent initialisation
    return model.eval()  # a fixed function: no power-iteration step per call


@pytest.mark.parametrize("classifier", ["linear", "gaussians"])
def test_log_prob_is_the_flows_and_matches_the_density_model(classifier: str) -> None:
    model = hybrid_model((1, 8, 8), 17, 10, classifier=classifier, factor_out=False, **OPTIONS).double()
    x = torch.randint(0, 17, (5, 1, 8, 8)).double()
    ready(model, x)
    torch.manual_seed(3)
    logits, log_prob = model(x)
    torch.manual_seed(3)
    torch.testing.assert_close(log_prob, model.density(x))  # the same dequantisation noise
    assert logits.shape == (5, 10)
    # against the brute-force Jacobian of the continuous part, in float64
    continuous = Sequential(*list(model.density.transform)[1:])
    torch.manual_seed(3)
    u = (x + torch.rand_like(x)) / 17
    z, _ = continuous(u)
    expected = model.density.prior().log_prob(z) + jacobian_logdet(continuous, u) - 64 * math.log(17)
    torch.testing.assert_close(log_prob, expected, rtol=1e-9, atol=1e-9)


def test_gaussian_classifier_is_bayes_rule_on_the_mixture_prior() -> None:
    model = hybrid_model((1, 8, 8), 17, 4, classifier="gaussians", factor_out=False, **OPTIONS).double()
    ready(model, torch.randint(0, 17, (6, 1, 8, 8)).double())
    means = model.density.class_means
    assert means.shape == (4, 64) and not means.requires_grad
    z = torch.randn(6, 64, dtype=torch.float64)
    by_class = model.density.class_log_probs(z)
    manual = -0.5 * ((z[:, None] - means) ** 2).sum(-1) - 32 * math.log(2 * math.pi)
    torch.testing.assert_close(by_class, manual)
    mixture = model.density.prior().log_prob(z)
    torch.testing.assert_close(mixture, torch.logsumexp(manual, 1) - math.log(4))
    x = torch.randint(0, 17, (6, 1, 8, 8)).double()
    torch.manual_seed(1)
    logits, log_prob = model(x)
    torch.manual_seed(1)
    z, logdet = model.density.transform(x)
    squared = -0.5 * ((z[:, None] - means) ** 2).sum(-1)
    torch.testing.assert_close(logits.log_softmax(1), squared.log_softmax(1))
    torch.testing.assert_close(log_prob, model.density.prior().log_prob(z) + logdet)


def test_samples_of_the_mixture_sit_at_the_class_means() -> None:
    model = hybrid_model((1, 8, 8), 17, 3, classifier="gaussians", factor_out=False, **OPTIONS)
    ready(model, torch.randint(0, 17, (6, 1, 8, 8)))
    z = model.density.prior().sample((3000,))
    nearest = model.density.class_log_probs(z).argmax(1)
    assert torch.bincount(nearest, minlength=3).min() > 800  # a uniform mixture
    assert model.density.sample(4).shape == (4, 1, 8, 8)


def test_linear_head_reads_the_last_scale() -> None:
    model = hybrid_model((1, 8, 8), 17, 10, **OPTIONS)  # factor-out: the last scale holds 8 x 2 x 2
    assert model.features == 32 and model.head.in_features == 32


def test_bad_hybrids() -> None:
    with pytest.raises(ValueError, match="classifier must be"):
        hybrid_model((1, 8, 8), 17, 10, classifier="svm", **OPTIONS)
    flow = hybrid_model((1, 8, 8), 17, 10, **OPTIONS).density
    with pytest.raises(ValueError, match="features must lie"):
        HybridModel(flow, 10, features=65)
    with pytest.raises(ValueError, match="class means for 5 classes"):
        HybridModel(DensityModel(flow.transform, (1, 8, 8), class_means=torch.zeros(10, 64)), 5)
    with pytest.raises(ValueError, match="class_means must have shape"):
        DensityModel(flow.transform, (1, 8, 8), class_means=torch.zeros(10, 3))
    with pytest.raises(ValueError, match="learned_prior must be False"):
        DensityModel(flow.transform, (1, 8, 8), class_means=torch.zeros(10, 64), learned_prior=True)


def test_class_conditional_samples_invert_draws_of_their_class_gaussian() -> None:
    model = hybrid_model((1, 8, 8), 17, 3, classifier="gaussians", factor_out=False, **OPTIONS)
    ready(model, torch.randint(0, 17, (6, 1, 8, 8)))
    labels = torch.tensor([2, 0, 2, 1])
    torch.manual_seed(4)
    samples = model.density.sample(4, labels)
    torch.manual_seed(4)
    z = model.density.class_means[labels] + torch.randn(4, 64)
    torch.testing.assert_close(samples, model.density.transform.inverse(z))
    assert samples.shape == (4, 1, 8, 8) and torch.equal(samples, samples.round())
    with pytest.raises(ValueError, match="one class per sample"):
        model.density.sample(3, labels)
    with pytest.raises(ValueError, match="needs a class-conditional prior"):
        hybrid_model((1, 8, 8), 17, 3, **OPTIONS).density.sample(4, labels)
