"""The model builders: the toy flow and the multi-scale image flow are flows whose log-density
is right (against brute-force Jacobians), whose inverse is exact, and whose samples are data."""

from __future__ import annotations

import math

import pytest
import torch

import iresnet
from helpers import jacobian_logdet
from iresnet.models import image_flow, toy_flow
from iresnet.models.build import build_density_model, build_model
from iresnet.train.presets import PRESETS


def test_toy_flow_log_prob_is_prior_plus_exact_logdet(device: torch.device) -> None:
    model = toy_flow(2, blocks=3, hidden=16, logdet="exact", learned_prior=True).double().to(device)
    with torch.no_grad():
        model.prior_loc.normal_()
        model.prior_log_scale.normal_(0, 0.3)
    x = torch.randn(6, 2, dtype=torch.float64, device=device)
    model(x)  # ActNorm's data-dependent initialisation
    model.eval()  # a fixed function: no power-iteration step per call
    z, _ = model.transform(x)
    expected = model.prior().log_prob(z) + jacobian_logdet(model.transform, x)
    torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("squeeze_first", "factor_out"), [(False, True), (True, True), (False, False)])
@pytest.mark.parametrize("logit_alpha", [None, 0.05])
def test_image_flow_continuous_part_log_prob(squeeze_first: bool, factor_out: bool, logit_alpha: float | None) -> None:
    """After dequantisation, log p = log N(z) + log|det J| of pre-processing and multi-scale map."""
    model = image_flow(
        (2, 4, 4),
        17,
        scales=2,
        blocks=1,
        hidden=8,
        logdet="exact",
        logit_alpha=logit_alpha,
        squeeze_first=squeeze_first,
        factor_out=factor_out,
        fc_blocks=1,
        fc_hidden=8,
    ).double()
    x = torch.randint(0, 17, (3, 2, 4, 4)).double()
    model(x)
    model.eval()
    continuous = iresnet.Sequential(*list(model.transform)[1:])
    u = (x + torch.rand_like(x)) / 17
    z, logdet = continuous(u)
    assert z.shape == (3, 32)
    brute = jacobian_logdet(continuous, u)
    torch.testing.assert_close(logdet, brute, rtol=1e-9, atol=1e-9)
    # the full model adds the dequantisation's -D log L
    torch.manual_seed(5)
    full = model(x)
    torch.manual_seed(5)
    u = (x + torch.rand_like(x)) / 17
    z, logdet = continuous(u)
    torch.testing.assert_close(full, model.prior().log_prob(z) + logdet - 32 * math.log(17))


@pytest.mark.parametrize("factor_out", [True, False])
@pytest.mark.parametrize("squeeze_first", [False, True])
def test_multiscale_inverse(squeeze_first: bool, factor_out: bool, device: torch.device) -> None:
    model = image_flow(
        (1, 8, 8), 256, scales=3 - squeeze_first, blocks=2, hidden=8, squeeze_first=squeeze_first, factor_out=factor_out
    )
    model = model.double().to(device)
    multiscale = model.transform[-1]
    y = torch.randn(5, 1, 8, 8, dtype=torch.float64, device=device)
    multiscale(y)
    model.eval()
    iresnet.converge_spectral_norms(model)
    z, _ = multiscale(y)
    assert z.shape == (5, 64)
    torch.testing.assert_close(multiscale.inverse(z), y, rtol=0, atol=1e-8)


def test_image_flow_samples_are_images_in_range() -> None:
    model = image_flow((1, 8, 8), 17, scales=2, blocks=1, hidden=8)
    model(torch.randint(0, 17, (16, 1, 8, 8)))
    model.eval()
    iresnet.converge_spectral_norms(model)
    samples = model.sample(10)
    assert samples.shape == (10, 1, 8, 8)
    assert samples.min() >= 0 and samples.max() <= 16 and (samples == samples.round()).all()


def test_every_block_certified_below_one() -> None:
    """The branches the builders make are ones lipschitz_bound certifies, below the coefficient."""
    model = image_flow((1, 8, 8), 17, scales=2, blocks=2, hidden=8, coeff=0.9, fc_blocks=1, fc_hidden=16)
    model(torch.randint(0, 17, (4, 1, 8, 8)))
    model.eval()
    iresnet.converge_spectral_norms(model)
    blocks = [m for m in model.modules() if isinstance(m, iresnet.ResidualBlock)]
    assert len(blocks) == 5
    for block in blocks:
        assert iresnet.lipschitz_bound(block.g, block.event_shape) <= 0.9**3 * (1 + 1e-4)


def test_image_too_small_for_its_scales_raises() -> None:
    with pytest.raises(ValueError, match="squeezed"):
        image_flow((1, 8, 8), 17, scales=4, squeeze_first=True)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build(name: str) -> None:
    preset = PRESETS[name]
    model = build_model(preset.get("task", "density"), preset["data"], preset["model"])
    assert sum(p.numel() for p in model.parameters()) > 0


def test_bad_model_option_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown model option 'hiden' for toy_flow; its options: blocks, hidden"):
        build_density_model("8gaussians", {"hiden": 3})


@pytest.mark.parametrize(
    "name", [n for n in sorted(PRESETS) if PRESETS[n]["data"] in ("mnist", "mnist3x32", "cifar10")]
)
def test_paper_presets_count_epochs_one_way(name: str) -> None:
    """The audit: steps per epoch were 390 in one preset and 391 in another for the same data and
    batch. Every schedule is now whole epochs of ceil(N / B) steps."""
    from iresnet.train.presets import steps_per_epoch

    preset = PRESETS[name]
    epoch = steps_per_epoch(preset["data"], preset["batch_size"])
    assert epoch == -(
        -{"mnist": 60_000, "mnist3x32": 60_000, "cifar10": 50_000}[preset["data"]] // preset["batch_size"]
    )
    for key in ("steps", "eval_every", "checkpoint_every"):  # Residual Flows warms up for 1,000 steps, not epochs
        assert preset[key] % epoch == 0, key
    assert all(m % epoch == 0 for m in preset.get("lr_milestones", []))


def test_squeeze_then_split_keeps_what_split_then_squeeze_keeps() -> None:
    """The audit: ours squeezes then splits, the i-ResNet code splits then squeezes. Both keep the
    squeeze of the first C/2 channels and factor out the other half's values, permuted."""
    from iresnet.core.layers import Squeeze

    squeeze = Squeeze()
    x = torch.randn(3, 6, 4, 4)
    squeezed, _ = squeeze(x)
    kept_ours, out_ours = squeezed[:, :12], squeezed[:, 12:]
    kept_theirs, _ = squeeze(x[:, :3])
    torch.testing.assert_close(kept_ours, kept_theirs, rtol=0, atol=0)
    out_theirs = x[:, 3:].flatten(1)
    torch.testing.assert_close(out_ours.flatten(1).sort(1).values, out_theirs.sort(1).values, rtol=0, atol=0)

    with pytest.raises(ValueError, match="unknown model option 'hiden' for hybrid_model; its options: classifier"):
        build_model("hybrid", "digits", {"hiden": 3})
    with pytest.raises(ValueError, match="model option 'levels' is set by the data set"):
        build_model("classify", "digits", {"levels": 5})


BAD_OPTIONS = [
    ("8gaussians", {"hidden": -3}, "hidden must be an integer of at least 1, got -3"),
    ("8gaussians", {"hidden": 2.5}, "hidden must be an integer of at least 1, got 2.5"),
    ("8gaussians", {"depth": 0}, "depth must be an integer of at least 1, got 0"),
    ("8gaussians", {"blocks": True}, "blocks must be an integer of at least 1, got True"),
    ("8gaussians", {"coeff": 1.5}, r"coeff must be a number in \(0, 1\) .*, got 1.5"),
    ("8gaussians", {"coeff": None}, r"coeff must be a number in \(0, 1\) .*, got None"),
    ("8gaussians", {"actnorm": 3}, "actnorm must be true or false, got 3"),
    ("digits", {"scales": 0}, "scales must be an integer of at least 1, got 0"),
    ("digits", {"fc_blocks": -1}, "fc_blocks must be an integer of at least 0, got -1"),
    ("digits", {"hidden": "wide"}, "hidden must be an integer of at least 1, got 'wide'"),
    ("digits", {"logit_alpha": 0.5}, r"logit_alpha must be a number in \(0, 0.5\), or null"),
]


@pytest.mark.parametrize("data, options, message", BAD_OPTIONS)
def test_bad_model_option_values_name_the_option_and_the_value(data: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_density_model(data, options)


def test_bad_classifier_options_name_the_option_and_the_value() -> None:
    with pytest.raises(ValueError, match=r"blocks must be a list of integers of at least 1, one per stage, got 4"):
        build_model("classify", "digits", {"blocks": 4})
    with pytest.raises(ValueError, match=r"hidden must be a list .*, got \[8, 0\]"):
        build_model("classify", "digits", {"blocks": [1, 1], "hidden": [8, 0]})
    with pytest.raises(ValueError, match=r"coeff must be a number in \(0, 1\), or null .*, got 1.0"):
        build_model("classify", "digits", {"blocks": [1, 1], "hidden": [8, 8], "coeff": 1.0})
    assert build_model("classify", "digits", {"blocks": [1, 1], "hidden": [8, 8], "coeff": None}) is not None


def test_an_error_inside_a_builder_is_not_relabelled(monkeypatch: pytest.MonkeyPatch) -> None:
    import iresnet.models.toy

    def broken(*args, **kwargs):
        raise TypeError("a bug in the branch")

    monkeypatch.setattr(iresnet.models.toy, "mlp_branch", broken)
    with pytest.raises(TypeError, match="^a bug in the branch$"):
        build_density_model("8gaussians", {"hidden": 8})
