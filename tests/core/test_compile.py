"""torch.compile: the library's flows compile to first-order graphs that give eager's losses and
gradients, the compiled roulette stays unbiased, and a compiled training step does not recompile
when the roulette draws a new number of terms."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch._inductor.config as inductor_config
from torch._dynamo.utils import counters

import iresnet
from helpers import binding, dense_branch
from iresnet.core.series import _host_series
from iresnet.models import image_flow, toy_flow
from iresnet.train import resolve_config, train


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch, and Inductor draws random numbers as eager torch does
    (same seed, same probes), so that compiled and eager results can be compared."""
    torch._dynamo.reset()
    counters.clear()
    with inductor_config.patch(fallback_random=True):
        yield
    torch._dynamo.reset()


def _loss_and_grads(model: torch.nn.Module, x: torch.Tensor, seed: int):
    torch.manual_seed(seed)
    loss = -model(x).mean()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), grads


def _toy(logdet) -> tuple[torch.nn.Module, torch.Tensor]:
    return toy_flow(2, blocks=2, hidden=16, logdet=logdet), torch.randn(64, 2)


def _conv(logdet) -> tuple[torch.nn.Module, torch.Tensor]:
    model = image_flow((1, 4, 4), scales=2, blocks=1, hidden=8, logdet=logdet, logit_alpha=None)
    return model, torch.randint(0, 256, (16, 1, 4, 4)).float()


@pytest.mark.parametrize(
    "build, logdet",
    [
        (_toy, "exact"),
        (_toy, {"name": "series", "n_terms": 4, "memory_efficient": True}),
        (_conv, {"name": "series", "n_terms": 3, "probe": "basis", "memory_efficient": True}),
    ],
    ids=["toy-exact", "toy-neumann", "conv-neumann"],
)
def test_compiled_flow_matches_eager(device, build, logdet):
    """In training mode (one power iteration per call, ActNorm initialised), the compiled model's
    loss, parameter gradients and updated power-iteration vectors equal eager's within float32
    rounding. (The conv flow draws dequantisation noise too, and compiled it draws its Gaussian
    probes in another order: there the probes are the basis vectors, exact traces.)"""
    torch.manual_seed(0)
    model, x = build(logdet)
    model, x = model.to(device), x.to(device)
    iresnet.initialize_from_data(model, x)
    twin = copy.deepcopy(model)
    eager_loss, eager_grads = _loss_and_grads(model, x, seed=3)
    compiled_loss, compiled_grads = _loss_and_grads(torch.compile(twin), x, seed=3)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        if b is None:
            assert a is None or not a.any()
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert max(g.abs().max() for g in eager_grads if g is not None) > 1e-3
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(dict(twin.named_buffers())[name], buffer, rtol=1e-5, atol=1e-6)


def _block(distribution: str, device) -> iresnet.ResidualBlock:
    torch.manual_seed(1)
    g = binding(dense_branch(2, 16, 0.9)).double().to(device)
    estimator = iresnet.Roulette(n_exact_terms=1, distribution=distribution, p=0.6, rate=1.5, memory_efficient=True)
    block = iresnet.ResidualBlock(g, estimator).eval()
    iresnet.converge_spectral_norms(block.g)
    return block


@pytest.mark.parametrize("distribution", ["geometric", "poisson"])
@pytest.mark.parametrize("neumann", [False, True])
def test_device_series_equals_the_host_series(device, distribution, neumann):
    """The compiled roulette's loop (tail length drawn on the device, terms in a while_loop) sums
    the same weighted terms as the host loop for the same tail length."""
    block = _block(distribution, device)
    x = torch.randn(5, 2, dtype=torch.float64, device=device)
    products = iresnet.linearize(block.g, x)
    v = torch.randn_like(x)
    for tail in (0, 1, 3, 7):
        estimator = block.logdet
        weights = [1.0] * estimator.n_exact_terms + [1 / estimator.survival(m) for m in range(1, tail + 1)]
        expected = _host_series(products, v, weights, neumann)
        with torch.no_grad():
            got = estimator.device_series(products, v, neumann, torch.tensor(tail, device=device))
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_compiled_roulette_is_unbiased(device):
    """Compiled, each roulette draws its tail length on the device: the mean of many estimates
    equals the exact log-det within four standard errors, for both tail distributions."""
    geometric, poisson = _block("geometric", device), _block("poisson", device)
    x = torch.randn(3, 2, dtype=torch.float64, device=device)
    exact = torch.stack([iresnet.ResidualBlock(b.g, "exact")(x)[1] for b in (geometric, poisson)]).detach()

    @torch.compile
    def both(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([geometric(x)[1], poisson(x)[1]])

    with torch.no_grad():
        draws = torch.stack([both(x) for _ in range(3000)])
    error = draws.mean(0) - exact
    standard_error = draws.std(0) / math.sqrt(len(draws))
    assert (error.abs() <= 4 * standard_error).all(), (error, standard_error)
    assert (draws.std(0) > 1e-4).all()  # the estimates are random: the draws differ


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _training_steps(model: torch.nn.Module, x: torch.Tensor, steps: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        (-model(x).mean()).backward()
        opt.step()


def test_device_roulette_training_never_recompiles(device):
    """With the Neumann gradient the roulette draws on the device: after the first step, 200
    steps with fresh tail lengths compile nothing more."""
    torch.manual_seed(0)
    model, x = _toy({"name": "roulette", "memory_efficient": True})
    model, x = model.to(device), x.to(device)
    iresnet.initialize_from_data(model, x)
    compiled = torch.compile(model, backend="aot_eager")
    _training_steps(compiled, x, 2)
    warm = _graphs()
    _training_steps(compiled, x, 200)
    assert _graphs() == warm >= 1
    assert not counters["graph_break"]


@torch._dynamo.config.patch(recompile_limit=10_000)
def test_bucketed_roulette_recompiles_at_most_once_per_bucket(device):
    """A differentiated roulette series draws on the host, padded with zero weights to the next
    power of two: 200 steps compile at most one graph per bucket and block (parametrize gives
    every block's layers classes of their own), not one per draw. No cap on recompilations hides
    a recompilation at every step."""
    torch.manual_seed(0)
    model, x = _toy({"name": "roulette", "p": 0.5})
    model, x = model.to(device), x.to(device)
    tails: list[int] = []
    for block in model.modules():
        if isinstance(block, iresnet.ResidualBlock):
            draw = block.logdet.draw_tail_length
            block.logdet.draw_tail_length = lambda draw=draw: tails.append(draw()) or tails[-1]
    iresnet.initialize_from_data(model, x)
    compiled = torch.compile(model, backend="aot_eager")
    _training_steps(compiled, x, 2)
    warm, buckets_seen = _graphs(), {_bucket(t) for t in tails}
    _training_steps(compiled, x, 200)
    buckets = {_bucket(t) for t in tails}
    assert len(buckets) >= 3  # the draws did vary
    blocks = sum(isinstance(m, iresnet.ResidualBlock) for m in model.modules())
    assert _graphs() - warm <= blocks * len(buckets - buckets_seen)


def _bucket(tail: int) -> int:
    return 0 if tail == 0 else 1 << (tail - 1).bit_length()


def test_train_compile_gives_the_eager_run(tmp_path: Path):
    """`iresnet train compile=true` trains the same model as the eager run: the same losses,
    step by step, within float32 rounding (the toy preset's exact log-det has no randomness)."""
    tiny = {"model": {"blocks": 2, "hidden": 16}, "batch_size": 64, "eval_size": 200, "log_every": 1, "steps": 6}
    losses = {}
    for compiled in (True, False):
        run = tmp_path / str(compiled)
        train(resolve_config("toy", None, [tiny, {"out": str(run), "compile": compiled}]), progress=False)
        lines = (run / "metrics.jsonl").read_text().splitlines()
        losses[compiled] = [r["nll"] for r in map(json.loads, lines) if r["split"] == "train"]
        if compiled:
            assert _graphs() >= 1 and not counters["graph_break"]  # it did compile, in one piece
    assert len(losses[True]) == 6
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def _fixed_tail(model: torch.nn.Module, tail: int) -> None:
    """Every roulette in ``model`` draws ``tail``: on the host, and on the device."""
    for block in model.modules():
        if isinstance(block, iresnet.ResidualBlock):
            block.logdet.draw_tail_length = lambda: tail
            block.logdet._device_tail_length = lambda like: torch.tensor(tail, device=like.device)


@pytest.mark.parametrize("memory_efficient", [False, True], ids=["bucketed", "device-loop"])
def test_compiled_roulette_equals_eager_for_the_same_draw(device, memory_efficient):
    """For the same tail length (3, padded to a bucket of 4 on the bucketed path), the compiled
    roulette gives eager's loss and gradients: the padding adds nothing, and the device loop sums
    the same terms with the same weights."""
    torch.manual_seed(0)
    roulette = {
        "name": "roulette",
        "n_exact_terms": 1,
        "p": 0.5,
        "probe": "basis",
        "memory_efficient": memory_efficient,
    }
    model, x = _toy(roulette)  # basis probes: no randomness but the (fixed) tail length
    model, x = model.to(device), x.to(device)
    iresnet.initialize_from_data(model, x)
    model.eval()  # the same weights for both: no power-iteration step
    twin = copy.deepcopy(model)
    _fixed_tail(model, 3), _fixed_tail(twin, 3)
    eager_loss, eager_grads = _loss_and_grads(model, x, seed=4)
    compiled_loss, compiled_grads = _loss_and_grads(torch.compile(twin, backend="aot_eager"), x, seed=4)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_device_tail_length_is_drawn_in_float64(monkeypatch: pytest.MonkeyPatch):
    """A float32 uniform would cap the geometric tail near 25 terms; drawn in float64, the largest
    uniform below 1 gives a tail of 54 for p = 1/2, whatever the model's dtype."""
    estimator = iresnet.Roulette(p=0.5)
    largest = 1 - 2.0**-53
    monkeypatch.setattr(torch, "rand", lambda *shape, dtype=None, device=None: torch.tensor(largest, dtype=dtype))
    assert int(estimator._device_tail_length(torch.zeros(2, dtype=torch.float32))) == 54


@pytest.mark.parametrize("distribution", ["geometric", "poisson"])
def test_device_tail_lengths_follow_the_survival_function(distribution):
    """The device draws' frequencies of N >= m match the survival function the weights divide by."""
    estimator = iresnet.Roulette(distribution=distribution, p=0.4, rate=2.5)
    like = torch.zeros(1)
    draws = torch.stack([estimator._device_tail_length(like) for _ in range(20000)]).double()
    for m in range(1, 7):
        assert (draws >= m).double().mean().item() == pytest.approx(estimator.survival(m), abs=0.015)


@pytest.mark.parametrize("build", [_toy, _conv], ids=["dense", "conv"])
def test_compiled_inverse_equals_the_eager_inverse(device, build):
    """With compile_inverse every block's iterations evaluate g through one compiled function per
    architecture: the same preimages within the stopping tolerance, and one graph for all blocks
    of the same architecture."""
    torch.manual_seed(0)
    model, x = build("exact")
    model, x = model.to(device), x.to(device)
    iresnet.initialize_from_data(model, x)
    model.eval()
    iresnet.converge_spectral_norms(model)
    blocks = [m for m in model.modules() if isinstance(m, iresnet.ResidualBlock)]
    flow = model.flow()
    z = flow.transform(x)
    eager = flow.transform.inv(z)
    for block in blocks:
        block.compile_inverse = True
    compiled = model.flow().transform.inv(z)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled, x, rtol=1e-3, atol=1e-3)
    assert not counters["graph_break"]
    graphs = _graphs()
    model.flow().transform.inv(z + 0.01)
    assert _graphs() == graphs  # a later inversion compiles nothing


def test_compiled_inverse_compiles_per_architecture_not_per_block():
    """Doubling the number of identical blocks adds no compiled graph."""
    counts = []
    for blocks in (2, 4):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = toy_flow(2, blocks=blocks, hidden=16, logdet="exact")
        x = torch.randn(64, 2)
        iresnet.initialize_from_data(model, x)
        model.eval()
        for block in model.modules():
            if isinstance(block, iresnet.ResidualBlock):
                block.compile_inverse = True
        model.flow().transform.inv(x)
        counts.append(_graphs())
    assert counts[1] == counts[0] >= 1


def test_compile_inverse_refuses_a_branch_it_cannot_express():
    g = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh())
    block = iresnet.ResidualBlock(g, "exact", compile_inverse=True)
    with pytest.raises(TypeError, match="Tanh"):
        block.inverse(torch.randn(3, 2))


def test_memory_lean_compiled_step_saves_no_more_than_eager(device):
    """Compiled under memory_lean, the training step's autograd saves no more than the eager
    step does (the default partitioner saved more)."""
    from iresnet.core.compiled import memory_lean
    from iresnet.core.memory import SavedTensorMeter

    torch.manual_seed(0)
    model, x = _toy({"name": "roulette", "memory_efficient": True})
    model, x = model.to(device), x.to(device)
    iresnet.initialize_from_data(model, x)
    compiled = torch.compile(model)
    peaks = []
    for step in (lambda: model(x), lambda: compiled(x)):
        with memory_lean():
            (-step().mean()).backward()  # the compiled graph is made here, outside the meter
        with SavedTensorMeter() as meter, memory_lean():
            (-step().mean()).backward()
        peaks.append(meter.peak)
    assert 0 < peaks[1] <= peaks[0]


def test_compiled_model_refuses_nan_inputs(device):
    """Compiled, the finiteness check runs on the device (no host sync) and still raises, naming
    the layer, instead of returning NaN log-likelihoods."""
    torch.manual_seed(0)
    model, x = _toy("exact")
    model, x = model.to(device), x.to(device)
    iresnet.initialize_from_data(model, x)
    compiled = torch.compile(model, backend="aot_eager")
    compiled(x)
    x[3, 0] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or inf"):
        compiled(x)
