"""The builders' options: one typed, checked dataclass per builder. Every option refuses a bad
value naming the option and the value, an unknown option lists the builder's options, each
concept has one default, the keyword arguments and the dataclass are one path, only the
classifier takes coeff=None, and the inverse's settings reach every residual block."""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest
import torch

import iresnet
from iresnet.core.inverse import MAX_ITER, InversionError
from iresnet.core.lipschitz import DEFAULT_COEFF, DEFAULT_POWER_ITERATIONS, SpectralNorm
from iresnet.models import hybrid_model, image_flow, iresnet_classifier, toy_flow
from iresnet.models.build import build_model, model_options
from iresnet.models.options import (
    BranchOptions,
    ClassifierOptions,
    FlowOptions,
    HybridOptions,
    ImageFlowOptions,
    ToyFlowOptions,
    merge_options,
)

CLASSES = [ToyFlowOptions, ImageFlowOptions, HybridOptions, ClassifierOptions]

# option: (a value of the wrong type, a value out of range or not among the choices, the message's start)
SHARED = {
    "coeff": ("high", 1.0, r"coeff must be a number in \(0, 1\)"),
    "lipschitz": (0.9, "orthogonal", "lipschitz must be one of 'spectral', 'aol'"),
    "activation": (3, "tanh", "activation must be one of 'lipswish', 'elu', 'relu'"),
    "power_iterations": (1.5, 0, "power_iterations must be an integer of at least 1"),
    "inverse_method": (None, "newton", "inverse_method must be one of 'fixed_point', 'anderson'"),
    "atol": ("small", 0, r"atol must be a number in \(0, inf\), or null"),
    "rtol": (True, -1e-5, r"rtol must be a number in \(0, inf\), or null"),
    "max_iter": (10.0, 0, "max_iter must be an integer of at least 1"),
}
FLOW = {
    "logdet": (3, "hutchinson", "logdet must be one of 'exact', 'series', 'roulette'"),
    "learned_prior": ("yes", 1, "learned_prior must be true or false"),
    "block": (1, "dense", "block must be one of 'resflow', 'densenet', 'monotone', 'implicit'"),
}
BAD = {
    ToyFlowOptions: {
        **SHARED,
        **FLOW,
        "blocks": ("8", 0, "blocks must be an integer of at least 1"),
        "hidden": (2.5, -3, "hidden must be an integer of at least 1"),
        "depth": (True, 0, "depth must be an integer of at least 1"),
        "actnorm": ("true", 0, "actnorm must be true or false"),
    },
    ImageFlowOptions: {
        **SHARED,
        **FLOW,
        "scales": ("3", 0, "scales must be an integer of at least 1"),
        "blocks": (4.0, 0, "blocks must be an integer of at least 1"),
        "hidden": ("wide", 0, "hidden must be an integer of at least 1"),
        "logit_alpha": ("0.05", 0.5, r"logit_alpha must be a number in \(0, 0.5\), or null"),
        "squeeze_first": (1, "no", "squeeze_first must be true or false"),
        "factor_out": (None, 0, "factor_out must be true or false"),
        "fc_blocks": (1.0, -1, "fc_blocks must be an integer of at least 0"),
        "fc_hidden": ([128], 0, "fc_hidden must be an integer of at least 1"),
        "dequantization": (1, "learned", "dequantization must be one of 'uniform', 'variational'"),
    },
    ClassifierOptions: {
        **SHARED,
        "coeff": ("high", 1.5, r"coeff must be a number in \(0, 1\), or null"),
        "pad_channels": (1.0, -1, "pad_channels must be an integer of at least 0"),
        "blocks": (4, [4, 0], "blocks must be a list of integers of at least 1, one per stage"),
        "hidden": ("32", [], "hidden must be a list of integers of at least 1, one per stage"),
    },
}
BAD[HybridOptions] = {
    **BAD[ImageFlowOptions],
    "classifier": (None, "svm", "classifier must be one of 'linear', 'gaussians'"),
}
CASES = [
    (cls, name, value, message)
    for cls, table in BAD.items()
    for name, (wrong_type, out_of_range, message) in table.items()
    for value in (wrong_type, out_of_range)
]


def test_every_option_has_its_bad_values() -> None:
    """The table above covers every option of every builder: none is left unchecked."""
    for cls in CLASSES:
        assert sorted(BAD[cls]) == sorted(cls.names()), cls.__name__


@pytest.mark.parametrize("cls, name, value, message", CASES, ids=[f"{c.__name__}-{n}-{v!r}" for c, n, v, _ in CASES])
def test_a_bad_value_names_the_option_and_the_value(cls, name: str, value, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}.*, got {re.escape(repr(value))}"):
        cls.from_dict({name: value})


def test_an_unknown_option_lists_the_builders_options() -> None:
    names = ", ".join(ToyFlowOptions.names())
    expected = f"unknown model option 'hiden' for toy_flow; its options: {names}; did you mean 'hidden'?"
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        ToyFlowOptions.from_dict({"hiden": 3})
    with pytest.raises(ValueError, match="^unknown model options 'x', 'y' for iresnet_classifier; its options: pad"):
        ClassifierOptions.from_dict({"x": 1, "y": 2})
    with pytest.raises(ValueError, match="unknown model option 'hiden' for toy_flow"):
        toy_flow(2, hiden=3)  # the keyword arguments take the same path
    with pytest.raises(ValueError, match="unknown model option 'pad_channels' for hybrid_model"):
        hybrid_model((1, 8, 8), 17, 10, pad_channels=3)


def test_a_bad_estimator_option_names_it_and_the_estimators_options() -> None:
    with pytest.raises(ValueError, match="^logdet: unknown option 'rat' of the 'roulette' estimator; its options: n_"):
        ImageFlowOptions.from_dict({"logdet": {"name": "roulette", "rat": 3.0}})
    with pytest.raises(ValueError, match="^logdet: n_probes must be an integer of at least 1, got 0$"):
        ImageFlowOptions.from_dict({"logdet": {"n_probes": 0}})  # without a name: the default estimator's
    with pytest.raises(ValueError, match="^logdet: unknown option 'n_terms' of the 'exact' estimator; it takes none$"):
        ToyFlowOptions.from_dict({"logdet": {"n_terms": 3}})
    with pytest.raises(ValueError, match="^logdet must name an estimator, not null"):
        ToyFlowOptions.from_dict({"logdet": None})


def test_a_partial_estimator_mapping_takes_the_builders_default_estimator() -> None:
    options = ImageFlowOptions.from_dict({"logdet": {"n_exact_terms": 5}})
    assert options.logdet == {"name": "roulette", "n_exact_terms": 5}
    block = next(
        m
        for m in image_flow((1, 8, 8), 17, scales=1, blocks=1, hidden=4, logdet={"n_probes": 2}).modules()
        if isinstance(m, iresnet.ResidualBlock)
    )
    assert isinstance(block.logdet, iresnet.Roulette) and block.logdet.n_probes == 2


BUILDERS = {
    ToyFlowOptions: toy_flow,
    ImageFlowOptions: image_flow,
    HybridOptions: hybrid_model,
    ClassifierOptions: iresnet_classifier,
}


def test_one_default_per_concept() -> None:
    """coeff, power_iterations and max_iter have one default each, which every builder, layer and
    solver takes; the option classes' defaults are what the builders list."""
    for cls, builder in BUILDERS.items():
        defaults = model_options(builder)
        assert defaults == cls().to_dict()
        assert (defaults["coeff"], defaults["power_iterations"]) == (DEFAULT_COEFF, DEFAULT_POWER_ITERATIONS)
        assert defaults["max_iter"] == MAX_ITER
    expected = {"coeff": DEFAULT_COEFF, "power_iterations": DEFAULT_POWER_ITERATIONS, "max_iter": MAX_ITER}
    for function, names in [
        (iresnet.spectral_norm, ("coeff", "power_iterations")),
        (SpectralNorm, ("coeff", "power_iterations")),
        (iresnet.ResidualBlock, ("max_iter",)),
        (iresnet.solve_fixed_point, ("max_iter",)),
    ]:
        for name in names:
            assert inspect.signature(function).parameters[name].default == expected[name], (function, name)


def test_the_options_order_puts_each_builders_own_first() -> None:
    assert ToyFlowOptions.names()[:4] == ["blocks", "hidden", "depth", "actnorm"]
    assert HybridOptions.names()[:2] == ["classifier", "scales"]
    assert ClassifierOptions.names()[:5] == ["pad_channels", "blocks", "hidden", "coeff", "activation"]
    shared = BranchOptions.names()
    for cls in CLASSES:
        assert sorted(cls.names()) == sorted(f.name for f in dataclasses.fields(cls))
        inherited = (
            [name for name in shared if name not in ("coeff", "activation")] if cls is ClassifierOptions else shared
        )
        assert cls.names()[-len(inherited) :] == inherited  # the shared options last


def test_keyword_arguments_and_the_dataclass_build_the_same_model() -> None:
    torch.manual_seed(0)
    by_keywords = toy_flow(2, blocks=2, hidden=16, coeff=0.8)
    torch.manual_seed(0)
    by_options = toy_flow(2, options=ToyFlowOptions(blocks=2, hidden=16, coeff=0.8))
    torch.manual_seed(0)
    both = toy_flow(2, options=ToyFlowOptions(blocks=2, hidden=99, coeff=0.8), hidden=16)  # the keywords win
    x = torch.randn(5, 2)
    for model in (by_options, both):
        assert str(model) == str(by_keywords)
        torch.testing.assert_close(model(x), by_keywords(x))
    with pytest.raises(TypeError, match="toy_flow takes options of type ToyFlowOptions, got ImageFlowOptions"):
        toy_flow(2, options=ImageFlowOptions())


def test_options_are_frozen_and_lists_become_tuples() -> None:
    options = ClassifierOptions.from_dict({"blocks": [1, 2], "hidden": [8, 16]})
    assert options.blocks == (1, 2) and options.hidden == (8, 16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.coeff = 0.5
    assert ClassifierOptions.from_dict(options.to_dict()) == options


@pytest.mark.parametrize(
    "build",
    [
        lambda: toy_flow(2, coeff=None),
        lambda: image_flow((1, 8, 8), 17, scales=1, blocks=1, hidden=4, coeff=None),
        lambda: hybrid_model((1, 8, 8), 17, 10, scales=1, blocks=1, hidden=4, coeff=None),
        lambda: build_model("density", "digits", {"coeff": None}),
        lambda: FlowOptions(coeff=None),
    ],
)
def test_a_flow_refuses_coeff_none(build) -> None:
    with pytest.raises(ValueError, match=r"coeff must be a number in \(0, 1\) .*got None; null .* ResNet baseline"):
        build()


def test_the_classifier_takes_coeff_none_as_its_resnet_baseline() -> None:
    baseline = iresnet_classifier((1, 8, 8), 10, blocks=(1, 1), hidden=(4, 4), coeff=None)
    constrained = iresnet_classifier((1, 8, 8), 10, blocks=(1, 1), hidden=(4, 4))
    assert not any(isinstance(m, SpectralNorm) for m in baseline.modules())
    assert sum(isinstance(m, SpectralNorm) for m in constrained.modules()) == 2 * 3


INVERSE = {"inverse_method": "anderson", "atol": 1e-7, "rtol": 1e-6, "max_iter": 37}


@pytest.mark.parametrize(
    "build",
    [
        lambda: toy_flow(2, blocks=2, hidden=8, **INVERSE),
        lambda: image_flow((1, 8, 8), 17, scales=2, blocks=1, hidden=4, fc_blocks=1, fc_hidden=8, **INVERSE),
        lambda: hybrid_model((1, 8, 8), 17, 10, scales=2, blocks=1, hidden=4, squeeze_first=True, **INVERSE),
        lambda: iresnet_classifier((1, 8, 8), 10, blocks=(1, 1), hidden=(4, 4), **INVERSE),
        lambda: build_model("classify", "digits", {"blocks": [1], "hidden": [4], **INVERSE}),
    ],
)
def test_the_inverse_options_reach_every_block(build) -> None:
    blocks = [m for m in build().modules() if isinstance(m, iresnet.ResidualBlock)]
    assert blocks
    for block in blocks:
        assert {name: getattr(block, name) for name in INVERSE} == INVERSE


def test_max_iter_caps_the_inversion() -> None:
    model = toy_flow(2, blocks=1, hidden=8, coeff=0.95, max_iter=1, learned_prior=False).double()
    model.eval()
    iresnet.converge_spectral_norms(model)
    with pytest.raises(InversionError, match="after 1 iterations"):
        model.transform.inverse(torch.randn(4, 2, dtype=torch.float64) * 3)


def test_merge_options_merges_the_estimators_options_while_its_name_stays() -> None:
    base = {"hidden": 512, "logdet": {"name": "roulette", "distribution": "poisson", "memory_efficient": True}}
    assert merge_options(base, {"logdet": {"n_exact_terms": 5}})["logdet"] == {**base["logdet"], "n_exact_terms": 5}
    assert merge_options(base, {"logdet": {"name": "roulette", "rate": 3}})["logdet"] == {**base["logdet"], "rate": 3}
    assert merge_options(base, {"logdet": "roulette"})["logdet"] == base["logdet"]
    assert merge_options(base, {"logdet": "series"})["logdet"] == "series"  # another estimator: its own defaults
    assert merge_options(base, {"logdet": {"name": "series", "n_terms": 3}})["logdet"] == {
        "name": "series",
        "n_terms": 3,
    }
    assert merge_options({"logdet": "roulette"}, {"logdet": {"p": 0.3}})["logdet"] == {"name": "roulette", "p": 0.3}
    assert merge_options(base, {"hidden": 64}) == {**base, "hidden": 64}
    assert base["logdet"] == {"name": "roulette", "distribution": "poisson", "memory_efficient": True}  # untouched


def test_dense_branches_refuse_the_aol_constraint_they_would_ignore() -> None:
    from iresnet.models.options import ToyFlowOptions

    with pytest.raises(ValueError, match="block 'densenet' holds its layers' norms by spectral normalisation"):
        ToyFlowOptions(block="densenet", lipschitz="aol")
    ToyFlowOptions(block="densenet", lipschitz="spectral")
