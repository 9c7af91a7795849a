"""A run's settings: model options merged key by key (a log-det estimator's options while its
name stays), dotted overrides, the evaluation estimator as a setting used by training's and
``iresnet eval``'s evaluations, and run configs written before a rename."""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import pytest
import torch

import iresnet
from iresnet.cli import main
from iresnet.core.logdet import make_estimator
from iresnet.data import IMAGE_DATASETS
from iresnet.tasks import eval_estimator
from iresnet.train import TrainConfig, parse_override, resolve_config, train
from iresnet.train.checkpoint import load_config
from iresnet.train.presets import PRESETS

TINY = {"model": {"blocks": 2, "hidden": 16}, "batch_size": 64, "eval_size": 200, "log_every": 1}
PAPER = PRESETS["cifar10-paper"]["model"]


@pytest.mark.parametrize(
    "override",
    [
        "model.logdet.n_exact_terms=5",
        'model.logdet={"n_exact_terms": 5}',
        'model.logdet={"name": "roulette", "n_exact_terms": 5}',
    ],
)
def test_one_estimator_option_of_cifar10_paper_keeps_the_others(override: str) -> None:
    """The issue: overriding one key of model.logdet on cifar10-paper dropped memory_efficient and
    the Poisson tail."""
    resolved = resolve_config("cifar10-paper", None, [parse_override(override)])
    assert resolved.model["logdet"] == {**PAPER["logdet"], "n_exact_terms": 5}
    assert {k: v for k, v in resolved.model.items() if k != "logdet"} == {
        k: v for k, v in PAPER.items() if k != "logdet"
    }
    estimator = make_estimator(resolved.model["logdet"])
    assert (estimator.n_exact_terms, estimator.distribution, estimator.rate) == (5, "poisson", 2.0)
    assert estimator.memory_efficient


def test_estimator_options_merge_across_file_and_overrides(tmp_path: Path) -> None:
    file = tmp_path / "settings.json"
    file.write_text(json.dumps({"model": {"logdet": {"rate": 3.0}, "hidden": 64}}))
    resolved = resolve_config("cifar10-paper", file, [parse_override("model.logdet.n_probes=2")])
    assert resolved.model["logdet"] == {**PAPER["logdet"], "rate": 3.0, "n_probes": 2}
    assert resolved.model["hidden"] == 64 and resolved.model["blocks"] == PAPER["blocks"]


def test_another_estimator_name_replaces_the_estimator() -> None:
    """A different estimator's options do not apply: naming another estimator drops them."""
    series = resolve_config("cifar10-paper", None, [parse_override("model.logdet=series")])
    assert series.model["logdet"] == "series"
    mapping = resolve_config("cifar10-paper", None, [parse_override('model.logdet={"name": "series", "n_terms": 3}')])
    assert mapping.model["logdet"] == {"name": "series", "n_terms": 3}
    same = resolve_config("cifar10-paper", None, [parse_override("model.logdet=roulette")])
    assert same.model["logdet"] == PAPER["logdet"]  # the same estimator: its options stay


def test_dotted_overrides_nest() -> None:
    assert parse_override("model.logdet.n_exact_terms=5") == {"model": {"logdet": {"n_exact_terms": 5}}}
    assert parse_override("eval_logdet.n_probes=8") == {"eval_logdet": {"n_probes": 8}}
    assert parse_override('model.logdet={"name": "series"}') == {"model": {"logdet": {"name": "series"}}}
    for text in ("model.=3", "model..logdet=3", ".lr=1", "=3"):
        with pytest.raises(ValueError, match="an override must look like key=value or model.key=value"):
            parse_override(text)


def test_preset_as_a_setting_chooses_the_preset() -> None:
    """``preset=digits`` once gave the toy preset's data and model under the name digits."""
    config = resolve_config(None, None, [parse_override("preset=digits")])
    assert (config.preset, config.data, config.model) == ("digits", "digits", resolve_config("digits").model)
    with pytest.raises(ValueError, match="--preset toy and preset=digits disagree: give the preset once"):
        resolve_config("toy", None, [parse_override("preset=digits")])
    saved = dataclasses.replace(resolve_config("toy"), out="runs/toy")
    with pytest.raises(ValueError, match="runs/toy is a run of the 'toy' preset, not 'digits'"):
        resolve_config(None, None, [parse_override("preset=digits")], saved=saved)
    assert resolve_config(None, None, [parse_override("preset=toy")], saved=saved).preset == "toy"


def test_eval_logdet_is_checked() -> None:
    assert TrainConfig().eval_logdet == "auto"
    for value, message in [
        ("hutchinson", "eval_logdet must be auto, one of exact, series, roulette, a mapping"),
        (3, "eval_logdet must be auto, an estimator's name, a mapping of its name and options, or null, got 3"),
        ({"name": "roulette", "rat": 3}, "eval_logdet: unknown option 'rat' of the 'roulette' estimator; its options"),
        ({"name": "series", "n_probes": 0}, "eval_logdet: n_probes must be an integer of at least 1, got 0"),
        ({"n_probes": 2}, "eval_logdet must be one of 'exact', 'series', 'roulette'.*a mapping needs its 'name'"),
    ]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(eval_logdet=value)


def test_eval_logdet_merges_like_the_models_estimator() -> None:
    base = parse_override('eval_logdet={"name": "roulette", "n_exact_terms": 20}')
    resolved = resolve_config("toy", None, [base, parse_override("eval_logdet.n_probes=8")])
    assert resolved.eval_logdet == {"name": "roulette", "n_exact_terms": 20, "n_probes": 8}
    with pytest.raises(ValueError, match="eval_logdet is 'auto', whose estimator has no options to change"):
        resolve_config("toy", None, [parse_override("eval_logdet.n_probes=8")])


def test_eval_estimator_reads_the_setting() -> None:
    """auto: the roulette with 20 exact terms and 4 probes for images, the model's own for 2-D data."""
    accurate = eval_estimator("auto", discrete=True)
    assert isinstance(accurate, iresnet.Roulette) and (accurate.n_exact_terms, accurate.n_probes) == (20, 4)
    assert eval_estimator("auto", discrete=False) is None
    assert eval_estimator(None, discrete=True) is None
    series = eval_estimator({"name": "series", "n_terms": 3}, discrete=False)
    assert isinstance(series, iresnet.PowerSeries) and series.n_terms == 3


def test_trainings_and_iresnet_evals_evaluations_use_eval_logdet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    evaluation = importlib.import_module("iresnet.tasks.density")  # where the density evaluation sets the estimator
    used = []
    original = evaluation.estimators_set_to

    def spy(model, estimator):
        used.append(estimator)
        return original(model, estimator)

    monkeypatch.setattr(evaluation, "estimators_set_to", spy)
    run = tmp_path / "run"
    setting = {"name": "series", "n_terms": 3, "n_probes": 2}
    train(resolve_config("toy", None, [TINY, {"out": str(run), "steps": 2, "eval_logdet": setting}]), progress=False)
    assert used and all(repr(e) == repr(make_estimator(setting)) for e in used)
    used.clear()
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(run), "--json"])
    assert exit_info.value.code == 0
    assert len(used) == 3 and all(repr(e) == repr(make_estimator(setting)) for e in used)  # one per card seed


def _save_with_the_old_name(run: Path) -> None:
    """Write the run's config.json and checkpoint as before the probes' rename: n_samples."""
    settings = json.loads((run / "config.json").read_text())
    settings["model"]["logdet"] = {"name": "roulette", "n_samples": 2}
    del settings["eval_logdet"]  # a setting that came later
    (run / "config.json").write_text(json.dumps(settings, indent=2))
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["config"]["model"]["logdet"] = {"name": "roulette", "n_samples": 2}
    del state["config"]["eval_logdet"]
    torch.save(state, run / "checkpoint.pt")


def test_a_run_saved_before_the_probes_rename_loads_and_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model = {"logdet": {"name": "roulette", "n_probes": 2}}
    train(resolve_config("toy", None, [TINY, {"out": str(run), "steps": 2, "model": model}]), progress=False)
    _save_with_the_old_name(run)
    with pytest.warns(UserWarning, match=r"config.json: read model.logdet.n_samples as n_probes \(renamed\)"):
        saved = load_config(run)
    assert saved.model["logdet"] == {"name": "roulette", "n_probes": 2} and saved.eval_logdet == "auto"
    changes = [{"steps": 3}, parse_override("eval_logdet=exact")]  # how it evaluates may change on resume
    resumed = resolve_config(None, None, changes, saved=dataclasses.replace(saved, out=str(run)))
    assert train(resumed, resume=True, progress=False).step == 3


@pytest.mark.parametrize("name", ["mnist-paper", "cifar10-paper"])
def test_residual_flows_presets_evaluate_as_the_paper(name: str) -> None:
    """Residual Flows evaluates with 20 exact terms and the training's Poisson(2) tail, one probe."""
    estimator = eval_estimator(resolve_config(name, None, []).eval_logdet, discrete=True)
    assert isinstance(estimator, iresnet.Roulette)
    settings = (estimator.n_exact_terms, estimator.distribution, estimator.rate, estimator.n_probes)
    assert settings == (20, "poisson", 2.0, 1)


@pytest.mark.parametrize(
    "name, n_terms", [("cifar10-iresnet-paper", 5), ("mnist-iresnet-paper", 10), ("mnist3x32-iresnet-paper", 10)]
)
def test_iresnet_presets_evaluate_as_the_released_code(name: str, n_terms: int) -> None:
    """The i-ResNet code evaluates with its training's truncated series and one probe; the
    MNIST presets differ in the layout alone (1 x 28 x 28, or the code's 3 x 32 x 32)."""
    config = resolve_config(name, None, [])
    estimator = eval_estimator(config.eval_logdet, discrete=True)
    assert isinstance(estimator, iresnet.PowerSeries)
    assert (estimator.n_terms, estimator.n_probes) == (n_terms, 1) == (config.model["logdet"]["n_terms"], 1)
    if name.startswith("mnist"):
        others = resolve_config("mnist-iresnet-paper", None, [])
        assert {**config.model, "squeeze_first": None} == {**others.model, "squeeze_first": None}
        assert IMAGE_DATASETS[config.data].shape == ((3, 32, 32) if "3x32" in name else (1, 28, 28))
