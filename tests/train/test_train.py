"""The training engine: configuration precedence, exact resumption, atomic checkpoints, the stop
on a non-finite loss, warm-up, EMA weights, and the run directory's files."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import stop_after
from iresnet.flows.density import DensityModel
from iresnet.report.pictures import write_final_files
from iresnet.train import TrainingError, evaluate, load_run, make_source, parse_override, resolve_config, train
from iresnet.train.presets import PRESETS

TINY = {"model": {"blocks": 2, "hidden": 16}, "batch_size": 64, "eval_size": 500, "log_every": 1}


def config(out: Path, **settings):
    return resolve_config("toy", None, [TINY, {"out": str(out)}, settings])


def records(run: Path, split: str = "train") -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


# -- configuration ---------------------------------------------------------------------------


def test_precedence_preset_then_file_then_flags(tmp_path: Path) -> None:
    file = tmp_path / "settings.json"
    file.write_text(json.dumps({"lr": 0.5, "steps": 7, "model": {"hidden": 5}}))
    resolved = resolve_config("toy", file, [{"steps": 9}, parse_override("model.blocks=3")])
    assert resolved.lr == 0.5  # the file over the preset
    assert resolved.steps == 9  # the flag over the file
    assert resolved.model["hidden"] == 5 and resolved.model["blocks"] == 3
    assert resolved.model["coeff"] == PRESETS["toy"]["model"]["coeff"]  # the rest of the preset stays


def test_parse_override_types() -> None:
    assert parse_override("lr=0.01") == {"lr": 0.01}
    assert parse_override("grad_clip=null") == {"grad_clip": None}
    assert parse_override("data=moons") == {"data": "moons"}
    assert parse_override("model.activation=elu") == {"model": {"activation": "elu"}}
    with pytest.raises(ValueError, match="key=value"):
        parse_override("lr")


def test_unknown_settings_and_presets_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown setting 'lrate'"):
        resolve_config("toy", None, [{"lrate": 1}])
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_config("nope")
    with pytest.raises(ValueError, match="steps must be at least 1"):
        resolve_config("toy", None, [{"steps": 0}])


# -- the run ---------------------------------------------------------------------------------


def test_run_directory_and_saved_config(tmp_path: Path) -> None:
    cfg = config(tmp_path / "run", steps=4, eval_every=2)
    result = train(cfg, progress=False)
    run = tmp_path / "run"
    for name in ("config.json", "checkpoint.pt", "model.safetensors", "metrics.jsonl"):
        assert (run / name).exists(), name
    assert not list(run.glob("*.png"))  # the pictures are the caller's final step
    train(config(run, steps=4, eval_every=2), resume=True, progress=False, finish=write_final_files)
    for name in ("curves.png", "density.png", "samples.png"):
        assert (run / name).exists(), name
    assert json.loads((run / "config.json").read_text()) == cfg.to_dict()
    assert [r["step"] for r in records(run)] == [1, 2, 3, 4]
    assert [r["step"] for r in records(run, "test")] == [2, 4]
    assert result.step == 4 and not result.interrupted


def test_resume_matches_an_uninterrupted_run_step_for_step(tmp_path: Path) -> None:
    straight = config(tmp_path / "straight", steps=8, ema_decay=0.9, warmup_steps=3)
    train(straight, progress=False)
    split = config(tmp_path / "split", steps=4, ema_decay=0.9, warmup_steps=3)
    train(split, progress=False)
    train(config(tmp_path / "split", steps=8, ema_decay=0.9, warmup_steps=3), resume=True, progress=False)
    a, b = records(tmp_path / "straight"), records(tmp_path / "split")
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [r["nll"] for r in a] == [r["nll"] for r in b]  # bit for bit
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    wa, wb = (
        load_file(str(tmp_path / "straight/model.safetensors")),
        load_file(str(tmp_path / "split/model.safetensors")),
    )
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_of_a_randomised_image_model_is_exact(tmp_path: Path) -> None:
    """Dequantisation noise and roulette draws come from the saved random state."""
    pytest.importorskip("sklearn")
    image = {"data": "digits", "model": {"scales": 2, "blocks": 1, "hidden": 8, "squeeze_first": True}}
    settings = {**image, "batch_size": 32, "eval_size": 64, "log_every": 1, "eval_every": 100, "ema_decay": None}
    run = lambda out, steps: resolve_config("digits", None, [settings, {"out": str(out), "steps": steps}])  # noqa: E731
    train(run(tmp_path / "straight", 6), progress=False)
    train(run(tmp_path / "split", 3), progress=False)
    train(run(tmp_path / "split", 6), resume=True, progress=False)
    a, b = records(tmp_path / "straight"), records(tmp_path / "split")
    assert [r["nll"] for r in a] == [r["nll"] for r in b]
    assert "bits_per_dim" in a[0]


def test_existing_run_is_not_overwritten(tmp_path: Path) -> None:
    train(config(tmp_path / "run", steps=2), progress=False)
    before = (tmp_path / "run/checkpoint.pt").read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        train(config(tmp_path / "run", steps=2), progress=False)
    assert (tmp_path / "run/checkpoint.pt").read_bytes() == before
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(config(tmp_path / "other", steps=2), resume=True, progress=False)
    with pytest.raises(ValueError, match=r"cannot resume with different settings for seed \(0 -> 1\)"):
        train(config(tmp_path / "run", steps=4, seed=1), resume=True, progress=False)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path: Path, monkeypatch) -> None:
    train(config(tmp_path / "run", steps=3, checkpoint_every=3), progress=False)
    before = (tmp_path / "run/checkpoint.pt").read_bytes()
    calls = {"n": 0}
    original = DensityModel.forward

    def poisoned(self, x=None):
        calls["n"] += 1
        out = original(self, x)
        return out * float("nan") if calls["n"] == 2 and self.training else out

    monkeypatch.setattr(DensityModel, "forward", poisoned)
    with pytest.raises(TrainingError, match=r"step 5: the loss is nan.*checkpoint.pt, is intact"):
        train(config(tmp_path / "run", steps=6, checkpoint_every=3), resume=True, progress=False)
    assert (tmp_path / "run/checkpoint.pt").read_bytes() == before
    assert max(r["step"] for r in records(tmp_path / "run")) == 4


def test_an_evaluation_that_raises_saves_the_training_first(tmp_path: Path, monkeypatch, capsys) -> None:
    """A patches32 run lost its last 33 steps when LAPACK failed inside its final evaluation: the
    steps before a failing evaluation are now checkpointed, the error says where and how to go on,
    and the resumed run evaluates that step before anything else (here the last: no step is left)."""
    from iresnet.tasks.density import DensityTask

    def failing(*args, **kwargs):
        raise RuntimeError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(DensityTask, "evaluate", failing)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="failed to converge") as caught:
        train(config(run, steps=5, checkpoint_every=100, eval_every=5), progress=False)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 5
    notes = [*getattr(caught.value, "__notes__", []), capsys.readouterr().err]  # Python 3.10: on stderr
    assert any("the evaluation at step 5 failed" in note and "--resume evaluates that step" in note for note in notes)
    assert records(run, "test") == []
    monkeypatch.undo()
    resumed = train(config(run, steps=5, checkpoint_every=100, eval_every=5), resume=True, progress=False)
    assert resumed.step == 5 and resumed.evaluation is not None
    assert [r["step"] for r in records(run, "test")] == [5]
    again = train(config(run, steps=6, checkpoint_every=100, eval_every=5), resume=True, progress=False)
    assert [r["step"] for r in records(run, "test")] == [5, 6] and again.step == 6  # evaluated once, not again


def test_steps_per_second_leave_out_evaluations_and_checkpoints(tmp_path: Path, monkeypatch) -> None:
    """The card's time per train step comes from these: an evaluation's time once landed in the
    record after it (175 ms a step where training took 22 ms)."""
    from iresnet.train.engine import _Trainer

    run_evaluation, save_checkpoint = _Trainer.run_evaluation, _Trainer.save_checkpoint

    def slow(original):
        def slowly(self, *args):
            time.sleep(0.5)
            return original(self, *args)

        return slowly

    monkeypatch.setattr(_Trainer, "run_evaluation", slow(run_evaluation))
    monkeypatch.setattr(_Trainer, "save_checkpoint", slow(save_checkpoint))
    train(config(tmp_path / "run", steps=6, eval_every=2, checkpoint_every=3, log_every=1), progress=False)
    seconds = [1 / r["steps_per_s"] for r in records(tmp_path / "run")]
    assert len(seconds) == 6 and max(seconds) < 0.25, seconds  # a tiny model's step: milliseconds


def test_warmup_schedule(tmp_path: Path) -> None:
    train(config(tmp_path / "run", steps=6, lr=0.01, warmup_steps=4), progress=False)
    lrs = [r["lr"] for r in records(tmp_path / "run")]
    # the lr logged after step k is the one the next step uses: min(1, (k + 1) / 4) * lr
    assert lrs == pytest.approx([0.005, 0.0075, 0.01, 0.01, 0.01, 0.01])


def test_saved_weights_are_the_ema_and_load_alone(tmp_path: Path) -> None:
    result = train(config(tmp_path / "run", steps=5, ema_decay=0.5, eval_every=5), progress=False)
    checkpoint = torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)
    weights = load_file(str(tmp_path / "run/model.safetensors"))
    for name, value in checkpoint["ema"]["shadow"].items():
        assert torch.equal(weights[name], value), name
        assert not torch.equal(checkpoint["model"][name], value) or "prior" in name
    model, _ = load_run(tmp_path / "run")
    again = evaluate(model, make_source("8gaussians", 0, 500).test, discrete=False)
    assert again.nll == pytest.approx(result.evaluation.nll, abs=1e-6)


def test_default_run_directories_never_overwrite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = [TINY, {"steps": 2}]
    first = train(resolve_config("toy", None, settings), progress=False)
    second = train(resolve_config("toy", None, settings), progress=False)
    assert (first.run_dir, second.run_dir) == (Path("runs/toy"), Path("runs/toy-2"))
    resumed = train(resolve_config("toy", None, [TINY, {"steps": 3}]), resume=True, progress=False)
    assert resumed.run_dir == Path("runs/toy-2") and resumed.step == 3
    assert json.loads((tmp_path / "runs/toy-2/config.json").read_text())["out"] == "runs/toy-2"


def test_tensorboard_writer(tmp_path: Path) -> None:
    """With tensorboard installed the run writes event files; without it, a message says what to install."""
    import importlib.util

    cfg = config(tmp_path / "run", steps=2, tensorboard=True)
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ImportError, match="pip install tensorboard"):
            train(cfg, progress=False)
    else:
        train(cfg, progress=False)
        assert list((tmp_path / "run/tensorboard").glob("events.out.tfevents.*"))


def test_gradient_clipping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The optimiser sees gradients clipped to grad_clip; the log keeps the norm before clipping."""
    seen: list[float] = []
    original = torch.optim.Adam.step

    def spying_step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spying_step)
    train(config(tmp_path / "run", steps=3, grad_clip=1e-3), progress=False)
    logged = [r["grad_norm"] for r in records(tmp_path / "run")]
    assert len(seen) == 3 and max(seen) <= 1e-3 * (1 + 1e-5)
    assert min(logged) > 1e-3  # the norms before clipping, well above the threshold


def test_resume_with_another_number_of_processes_warns(tmp_path: Path) -> None:
    train(config(tmp_path / "run", steps=2), progress=False)
    path = tmp_path / "run/checkpoint.pt"
    state = torch.load(path, weights_only=True)
    state["rng"] = state["rng"] * 2  # as if two processes had written it
    torch.save(state, path)
    with pytest.warns(UserWarning, match="2 processes and 1 resume it"):
        train(config(tmp_path / "run", steps=3), resume=True, progress=False)


def test_classify_needs_labelled_images(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs labelled image data"):
        train(config(tmp_path / "run", task="classify", model={}), progress=False)
    with pytest.raises(ValueError, match="task must be"):
        config(tmp_path / "run", task="regress")


def test_sgd_with_milestones(tmp_path: Path) -> None:
    run = tmp_path / "run"
    settings = {"lr": 0.01, "warmup_steps": 0, "optimizer": "sgd", "lr_milestones": [2, 4], "lr_gamma": 0.5}
    train(config(run, steps=6, **settings), progress=False)
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    assert checkpoint["optimizer"]["param_groups"][0]["momentum"] == 0.9
    # the lr logged after step k is the next step's: halved from step 2 on, and again from step 4 on
    assert [r["lr"] for r in records(run)] == pytest.approx([0.01, 0.005, 0.005, 0.0025, 0.0025, 0.0025])
    with pytest.raises(ValueError, match="lr_milestones must be strictly increasing"):
        config(run, lr_milestones=[2, 2])
    with pytest.raises(ValueError, match="lr_milestones must be a list of integers, got 5000"):
        config(run, lr_milestones=5000)
    with pytest.raises(ValueError, match="optimizer must be"):
        config(run, optimizer="rmsprop")


HYBRID = {
    "model": {"scales": 2, "blocks": 1, "hidden": 8, "fc_blocks": 0},
    "batch_size": 32,
    "eval_size": 64,
    "log_every": 1,
}


def hybrid_config(out: Path, **settings):
    pytest.importorskip("sklearn")
    return resolve_config("digits-hybrid", None, [HYBRID, {"out": str(out)}, settings])


def test_hybrid_run_logs_accuracy_and_bits_per_dim(tmp_path: Path) -> None:
    result = train(hybrid_config(tmp_path / "run", steps=3, eval_every=3), progress=False, finish=write_final_files)
    entry = records(tmp_path / "run")[-1]
    assert {"cross_entropy", "accuracy", "nll", "bits_per_dim"} <= entry.keys()
    test = records(tmp_path / "run", "test")[-1]
    assert test["error_percent"] == pytest.approx(result.evaluation.classifier.error_percent)
    assert test["bits_per_dim"] == pytest.approx(result.evaluation.density.bits_per_dim)
    assert (tmp_path / "run/samples.png").exists()  # the hybrid's flow samples like a density model
    model, _ = load_run(tmp_path / "run")
    logits, log_prob = model(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    assert logits.shape == (2, 10) and log_prob.shape == (2,)


@pytest.mark.parametrize("hybrid_lambda, rows", [(1.0, 64), (0.0, 32)])
def test_semi_supervised_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hybrid_lambda, rows) -> None:
    """With labels for a fraction only, unlabelled images join each batch when they count (lambda > 0);
    the cross-entropy sees the labelled ones alone."""
    from iresnet.models import HybridModel

    seen = []
    original = HybridModel.forward

    def spying(self, x):
        if self.training:
            seen.append(len(x))
        return original(self, x)

    monkeypatch.setattr(HybridModel, "forward", spying)
    cfg = hybrid_config(tmp_path / "run", steps=2, labelled_fraction=0.1, hybrid_lambda=hybrid_lambda)
    train(cfg, progress=False)
    assert seen == [rows, rows]
    with pytest.raises(ValueError, match="a density model uses no labels"):
        resolve_config("digits", None, [{"labelled_fraction": 0.5}])


@pytest.mark.parametrize("fraction", [1.0, 0.2])
def test_hybrid_loss_weighs_the_density_by_lambda_over_dimension(tmp_path: Path, fraction: float) -> None:
    """The hybrid loss is cross-entropy of the labelled rows + lambda * NLL / D of all rows (with a
    labelled fraction, the labelled batch and then an unlabelled one), recomputed here."""
    from iresnet.train.distributed import start_processes
    from iresnet.train.engine import _Trainer

    procs = start_processes("cpu")
    try:
        settings = {"hybrid_lambda": 3.0, "labelled_fraction": fraction}
        trainer = _Trainer(hybrid_config(tmp_path / "run", **settings), procs, progress=False)
        trainer.model(trainer.source.batch(0, 32))  # ActNorm's initialisation from data
        trainer.model.eval()  # no power-iteration updates between the two passes
        torch.manual_seed(5)
        loss, logged = trainer.objective(trainer.model)
        x, y = trainer.source.labelled_batch(0, 32)
        if fraction < 1:
            x = torch.cat([x, trainer.source.batch(0, 32)])
        torch.manual_seed(5)
        logits, log_prob = trainer.model(x)
        assert len(log_prob) == (32 if fraction == 1 else 64)
        expected = torch.nn.functional.cross_entropy(logits[:32], y) - 3.0 * log_prob.mean() / 64
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
        assert logged["nll"].item() == pytest.approx(-log_prob.mean().item(), rel=1e-6)
        assert logged["cross_entropy"].item() == pytest.approx(
            torch.nn.functional.cross_entropy(logits[:32], y).item(), rel=1e-6
        )
    finally:
        procs.close()


def test_another_task_or_data_drops_the_presets_model_options() -> None:
    """The toy preset's toy-flow options mean nothing to the classifier: its defaults apply; the
    digits flow's options carry over to a hybrid (the same builder); explicit options stay."""
    classify = resolve_config("toy", None, [{"task": "classify", "data": "digits"}, parse_override("model.coeff=0.8")])
    assert classify.model == {"coeff": 0.8}
    hybrid = resolve_config("digits", None, [{"task": "hybrid"}])
    assert hybrid.model == PRESETS["digits"]["model"]
    assert resolve_config("toy", None, [{"data": "digits"}]).model == {}
    pytest.importorskip("sklearn")
    from iresnet.models.build import build_model

    assert build_model(classify.task, classify.data, classify.model)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_a_checkpoint_from_before_a_setting_existed_resumes(tmp_path: Path) -> None:
    """Settings added later are missing from older checkpoints; they read as their defaults."""
    train(config(tmp_path / "run", steps=2), progress=False)
    path = tmp_path / "run/checkpoint.pt"
    state = torch.load(path, weights_only=True)
    for later in ("augment", "labelled_fraction", "hybrid_lambda", "lr_milestones", "lr_gamma"):
        del state["config"][later]
    torch.save(state, path)
    assert train(config(tmp_path / "run", steps=3), resume=True, progress=False).step == 3
    with pytest.raises(ValueError, match="cannot resume with different settings for lr_gamma"):
        train(config(tmp_path / "run", steps=4, lr_gamma=0.5), resume=True, progress=False)


def test_settings_of_the_wrong_type_are_named() -> None:
    for setting, value, kind in [("hybrid_lambda", "abc", "a number"), ("steps", "3", "an integer")]:
        with pytest.raises(ValueError, match=f"{setting} must be {kind}, got '{value}'"):
            resolve_config("toy", None, [{setting: value}])
    with pytest.raises(ValueError, match="hybrid_lambda is for the task hybrid"):
        resolve_config("digits", None, [{"hybrid_lambda": 0.5}])


def test_too_few_labels_for_a_batch_is_a_message(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="labelled_fraction 0.01 keeps 16 labelled images, fewer than a batch of 32"):
        train(hybrid_config(tmp_path / "run", labelled_fraction=0.01), progress=False)


def test_threads_sets_torchs_thread_count_while_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``threads`` (default 1) is torch's thread count during the steps, and is free on resume;
    afterwards torch's count is what it was."""
    from iresnet.train.engine import _Trainer

    seen: list[int] = []
    original = _Trainer.train_step

    def spying(self, model):
        seen.append(torch.get_num_threads())
        return original(self, model)

    monkeypatch.setattr(_Trainer, "train_step", spying)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        train(config(tmp_path / "run", steps=2), progress=False)
        train(config(tmp_path / "run", steps=4, threads=2), resume=True, progress=False)
        assert seen == [1, 1, 2, 2]
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="threads must be at least 1 or null, got 0"):
        config(tmp_path / "run", threads=0)


def test_a_stop_between_records_resumes_record_for_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The steps since the last record travel in the checkpoint: the record after a resume
    averages over the same steps as the uninterrupted run's."""
    settings = {"steps": 12, "log_every": 5, "ema_decay": 0.9, "warmup_steps": 3}
    train(config(tmp_path / "straight", **settings), progress=False)
    stop_after(monkeypatch, 7)
    stopped = train(config(tmp_path / "split", **settings), progress=False)
    assert stopped.interrupted and stopped.step == 7
    monkeypatch.undo()
    train(config(tmp_path / "split", **settings), resume=True, progress=False)
    a, b = records(tmp_path / "straight"), records(tmp_path / "split")
    assert [r["step"] for r in b] == [5, 10, 12]
    for straight, split in zip(a, b):
        assert straight.pop("steps_per_s") > 0 and split.pop("steps_per_s") > 0
    assert a == b


def test_resume_with_another_learning_rate_follows_the_schedule(tmp_path: Path, capsys) -> None:
    """lr and grad_clip are free on resume (the advice after a non-finite loss): the warm-up
    goes on from the step reached, times the new rate."""
    train(config(tmp_path / "run", steps=2, lr=0.01, warmup_steps=4), progress=False)
    capsys.readouterr()
    train(config(tmp_path / "run", steps=5, lr=0.002, warmup_steps=4, grad_clip=1.0), resume=True, progress=False)
    assert "resuming at step 2; steps 2 -> 5; lr 0.01 -> 0.002; grad_clip None -> 1.0" in capsys.readouterr().out
    lrs = [r["lr"] for r in records(tmp_path / "run")]
    assert lrs == pytest.approx([0.005, 0.0075, 0.002, 0.002, 0.002])


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_model_safetensors_gets_the_mode_of_a_new_file(tmp_path: Path, umask: int, mode: int) -> None:
    """safetensors' save_file made it 0600 whatever the umask."""
    import os
    import stat

    from iresnet.train.checkpoint import save_weights

    layer = torch.nn.Linear(2, 3)
    previous = os.umask(umask)
    try:
        save_weights(layer, tmp_path / "model.safetensors")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "model.safetensors").stat().st_mode) == mode
    assert torch.equal(load_file(tmp_path / "model.safetensors")["weight"], layer.weight.detach())
