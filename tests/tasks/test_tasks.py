"""The tasks behind one interface: the registry and its refusal of an unknown name; each task's
batch, objective on a tiny batch, test record and eval report, flow and data checks; and no
task name compared outside the registry."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import iresnet
from iresnet.tasks import TASKS, evaluation_randomness, get_task
from iresnet.train import TrainConfig, make_source
from iresnet.train.sources import DataSource

TINY = {  # a data set and the model options of a small model for each task
    "density": ("8gaussians", {"blocks": 1, "hidden": 8}),
    "classify": ("digits", {"blocks": [1, 1], "hidden": [8, 8]}),
    "hybrid": ("digits", {"scales": 2, "blocks": 1, "hidden": 8, "fc_blocks": 0}),
}
LOGGED = {"density": {"nll"}, "classify": {"cross_entropy", "accuracy"}, "hybrid": {"cross_entropy", "accuracy", "nll"}}
DENSITY = {"nll", "nll_se"}
BITS = {"bits_per_dim", "bits_per_dim_se"}
CLASSIFIER = {"cross_entropy", "accuracy", "error_percent", "error_percent_se"}


class FakeDigits(DataSource):
    """Random images in the digits' shape and levels, labelled 0..9 in turn: an image source
    without scikit-learn. ``labelled``: how many training images keep their labels."""

    is_image = True

    def __init__(self, labelled: int = 64) -> None:
        generator = torch.Generator().manual_seed(0)
        self.name, self.event_shape, self.levels = "digits", (1, 8, 8), 17
        self.train = torch.randint(0, 17, (64, 1, 8, 8), generator=generator, dtype=torch.uint8)
        self.train_labels = torch.arange(64) % 10
        self.test, self.test_labels = self.train[:24], self.train_labels[:24]
        self.labelled = torch.arange(labelled)

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        return self.train[-batch_size:][rank::world]

    def labelled_batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1):
        rows = self.labelled[:batch_size]
        return self.train[rows][rank::world], self.train_labels[rows][rank::world]


def source_of(data: str) -> DataSource:
    return make_source(data, 0, 24) if data == "8gaussians" else FakeDigits()


def tiny(name: str) -> tuple[torch.nn.Module, DataSource, TrainConfig]:
    """A small model of task ``name``, its data, and a config with batches of 16."""
    data, options = TINY[name]
    config = TrainConfig(task=name, data=data, model=options, batch_size=16)
    return get_task(name).build_model(data, options), source_of(data), config


def test_the_registry_holds_each_task_under_its_name() -> None:
    assert list(TASKS) == ["density", "classify", "hybrid"]
    assert all(get_task(name) is task and task.name == name for name, task in TASKS.items())
    assert repr(get_task("hybrid")) == "<task 'hybrid'>"


@pytest.mark.parametrize("name", ["regress", "Density", "", 3, ["density"]])
def test_an_unknown_task_is_refused_with_the_choices(name: object) -> None:
    expected = re.escape(f"task must be 'density', 'classify' or 'hybrid', got {name!r}")
    with pytest.raises(ValueError, match=f"^{expected}$"):
        get_task(name)
    if isinstance(name, str):
        with pytest.raises(ValueError, match=f"^{expected}$"):
            TrainConfig(task=name)


@pytest.mark.parametrize("name", TASKS)
def test_the_objective_of_a_tiny_batch(name: str) -> None:
    task = get_task(name)
    model, source, config = tiny(name)
    x, y = task.batch(source, 0, config)
    assert len(x) == 16 and (y is None) == (not task.labelled)
    loss, logged = task.objective(model, x, y, config)
    assert loss.shape == () and torch.isfinite(loss) and set(logged) == LOGGED[name]
    expected = {
        "density": lambda: logged["nll"],
        "classify": lambda: logged["cross_entropy"],
        "hybrid": lambda: logged["cross_entropy"] + config.hybrid_lambda * logged["nll"] / 64,
    }[name]()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(
    "name, data, keys",
    [
        ("density", "8gaussians", DENSITY),
        ("density", "digits", DENSITY | BITS),
        ("classify", "digits", CLASSIFIER),
        ("hybrid", "digits", CLASSIFIER | DENSITY | BITS),
    ],
)
def test_the_test_record_and_the_eval_report(name: str, data: str, keys: set[str]) -> None:
    """The keys of the test record are those the README lists for metrics.jsonl; the eval
    report is JSON with the example count, and text."""
    task, source = get_task(name), source_of(data)
    model = task.build_model(data, TINY[name][1] if data == TINY[name][0] else {"scales": 2, "blocks": 1, "hidden": 8})
    model(source.test[:16])  # ActNorm's initialisation from data
    with evaluation_randomness():
        evaluation = task.evaluate(model, source, size=16, batch_size=7)
    assert set(evaluation.metrics()) == keys and all(isinstance(v, float) for v in evaluation.metrics().values())
    figures, text = task.report(evaluation)
    assert json.loads(json.dumps(figures))["n"] == 16 and text.endswith("(16 examples)")
    with evaluation_randomness():  # the same noise and probes: the same figures
        assert task.evaluate(model, source, size=16, batch_size=7).metrics() == evaluation.metrics()


def test_a_given_density_evaluation_takes_the_flows_place() -> None:
    from iresnet.tasks import Evaluation

    given = Evaluation(24, 1.0, 0.1, 2.0, 0.2)
    assert get_task("density").evaluate(None, FakeDigits(), density=given) is given
    model, source, _ = tiny("hybrid")
    model(source.test)
    assert get_task("hybrid").evaluate(model, source, density=given).density is given


def test_the_flow_of_each_task() -> None:
    for name, kind in [("density", iresnet.models.DensityModel), ("hybrid", iresnet.models.DensityModel)]:
        model, _, _ = tiny(name)
        flow = get_task(name).flow(model)
        assert isinstance(flow, kind) and get_task(name).generative
        assert flow is (model if name == "density" else model.density)
    assert get_task("classify").flow(tiny("classify")[0]) is None and not get_task("classify").generative


def test_labelled_tasks_refuse_data_without_enough_labels() -> None:
    toy = make_source("8gaussians", 0, 24)
    for name, task in TASKS.items():
        config = TrainConfig(task=name, data="8gaussians", batch_size=16)
        if task.labelled:
            with pytest.raises(ValueError, match=f"task '{name}' needs labelled image data, and '8gaussians' has no"):
                task.check(toy, config)
            with pytest.raises(ValueError, match="keeps 8 labelled images, fewer than a batch of 16"):
                task.check(FakeDigits(labelled=8), config)
        else:
            task.check(toy, config)


def test_a_tasks_own_settings_are_refused_for_the_others() -> None:
    with pytest.raises(ValueError, match="^hybrid_lambda is for the task hybrid, not classify$"):
        TrainConfig(task="classify", hybrid_lambda=0.5)
    with pytest.raises(ValueError, match="^labelled_fraction is for the tasks classify and hybrid; a density model"):
        TrainConfig(labelled_fraction=0.5)
    assert TrainConfig(task="hybrid", hybrid_lambda=0.5, labelled_fraction=0.5).hybrid_lambda == 0.5


def test_each_task_builds_on_its_builder() -> None:
    """The builder a task names is the one whose options model.KEY sets (resolve_config reads it)."""
    from iresnet.models import hybrid_model, image_flow, iresnet_classifier, toy_flow

    builders = {name: [task.builder(data) for data in ("moons", "digits")] for name, task in TASKS.items()}
    assert builders == {
        "density": [toy_flow, image_flow],
        "classify": [iresnet_classifier, iresnet_classifier],
        "hybrid": [hybrid_model, hybrid_model],
    }


def test_task_names_are_compared_in_the_registry_alone() -> None:
    """Adding a task means adding its file: no module outside iresnet/tasks asks which task it runs."""
    package = Path(iresnet.__file__).parent
    names = "|".join(TASKS)
    compared = [r"\btask\s*(==|!=)", r"(==|!=)\s*[\w.]*\btask\b", r"\.task\s+(not\s+)?in\b"]
    compared += [rf'(==|!=)\s*"({names})"', rf'"({names})"\s*(==|!=|in\b)']
    comparison = re.compile("|".join(compared))
    found = [
        f"{path.relative_to(package)}:{number}: {line.strip()}"
        for path in package.rglob("*.py")
        if "tasks" not in path.relative_to(package).parts
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if comparison.search(line)
    ]
    assert found == []
