"""Two processes (gloo, 127.0.0.1): Jacobian descent across ranks equals one process on the
whole global batch, with and without DistributedDataParallel, for both ``cross_rank`` modes.

Every scenario runs in one spawn of two processes (starting them costs most of the time). Each
rank trains a float64 model for three steps on its shard of a global batch and saves its final
parameters; the test reruns each scenario in this process on the whole global batch (world size
1: the single-process path) and compares. The spawn is bounded: every collective has a timeout,
and the processes are killed if they outlive the join deadline.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from torch import nn

from jdoptim import JacobianOptimizer
from jdoptim.aggregation import GramianWeightedAggregator, Random, UPGrad
from tests._ranks import Collectives, run_ranks, run_torchrun
from tests.test_optimizer_atomic import _CountingWeighting

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
GLOBAL_BATCH = 8
STEPS = 3
DEADLINE_S = 120

# name: (cross_rank, losses, DDP (or its options), shared_params, batch_dim, path, micro-batches
# per rank)
SCENARIOS = {
    "mean": ("mean", "task", False, False, None, "auto", 1),
    "mean_ddp": ("mean", "task", True, False, None, "auto", 1),
    "mean_shared_ddp": ("mean", "task", True, True, None, "auto", 1),
    "concat_jacobian_ddp": ("concat", "sample", True, False, None, "jacobian", 1),
    "concat_per_sample": ("concat", "sample", False, False, 0, "auto", 1),
    "concat_per_sample_ddp": ("concat", "sample", True, False, 0, "auto", 1),
    "concat_per_sample_shared": ("concat", "sample", True, True, 0, "auto", 1),
    "mean_accumulate_ddp": ("mean", "task", True, False, None, "auto", 2),
    "concat_accumulate_ddp": ("concat", "sample", True, False, 0, "auto", 2),
    "random_synced": ("mean", "task", False, False, None, "auto", 1),
    "mean_ddp_find_unused": (
        "mean",
        "task",
        {"find_unused_parameters": True},
        False,
        None,
        "auto",
        1,
    ),
    "concat_ddp_static_graph": ("concat", "sample", {"static_graph": True}, False, 0, "auto", 1),
    # Per-sample losses averaged over ranks (and micro-batches): loss i is the mean of the i-th
    # samples' losses. The per-sample engine forms the mean Jacobian's Gramian from layer pieces.
    "mean_per_sample_ddp": ("mean", "sample", True, False, 0, "auto", 1),
    "mean_per_sample_shared_accumulate": ("mean", "sample", True, True, 0, "auto", 2),
    # Task losses with the layer-Gramian engine: ranks send layer inputs and output gradients.
    "mean_gramian_ddp": ("mean", "task", True, False, None, "gramian", 1),
    "mean_shared_accumulate_ddp": ("mean", "task", True, True, None, "auto", 2),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(GLOBAL_BATCH, 5, generator=generator, dtype=torch.float64)
    return x, torch.randn(GLOBAL_BATCH, 3, generator=generator, dtype=torch.float64)


def _train(name: str, rank: int, world: int) -> tuple[list[torch.Tensor], list[int]]:
    """Train the scenario on this rank's shard; return the parameters and the bytes per step."""
    cross_rank, kind, ddp, shared, batch_dim, path, micro = SCENARIOS[name]
    groups = micro * WORLD  # the loss vectors that "mean" averages
    mean_of_samples = world == 1 and cross_rank == "mean" and kind == "sample"
    if mean_of_samples:  # the reference: those means, formed in one graph, Jacobian engine
        batch_dim, path = None, "jacobian"
    micro = micro if world > 1 else 1  # the reference sees the global batch at once
    model = _model()
    options = ddp if isinstance(ddp, dict) else {}
    net = nn.parallel.DistributedDataParallel(model, **options) if ddp and world > 1 else model
    aggregator = Random(seed=100 + rank) if name == "random_synced" else UPGrad()
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        aggregator,
        shared_params=model[0].parameters() if shared else None,
        batch_dim=batch_dim,
        path=path,
        cross_rank=cross_rank,
    )

    def losses_of(x, y):
        squared = (net(x) - y) ** 2
        if mean_of_samples:
            return squared.sum(dim=1).view(groups, -1).mean(dim=0)
        return squared.mean(dim=0) if kind == "task" else squared.sum(dim=1)

    sent = []
    for step in range(STEPS):
        x, y = (t.chunk(world)[rank] for t in _data(step))
        xs, ys = x.chunk(micro), y.chunk(micro)
        for i in range(micro - 1):
            opt.backward(losses_of(xs[i], ys[i]), accumulate=True)

        def closure(x=xs[-1], y=ys[-1]):
            opt.zero_grad()
            return losses_of(x, y)

        opt.step(closure)
        sent.append(opt.cross_rank_bytes)
    return [p.detach().clone() for p in model.parameters()], sent


def _edge_cases(rank: int) -> dict[str, object]:
    """Errors raise on every rank (no hang); accumulation exchanges nothing before the end."""
    out: dict[str, object] = {}
    model = _model()
    opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), batch_dim=0)
    x = torch.randn(4, 5, dtype=torch.float64)
    losses = model(x).sum(dim=1)
    if rank == 1:
        losses = losses * torch.tensor([1.0, float("nan"), 1.0, 1.0], dtype=torch.float64)
    try:
        opt.backward(losses)
    except Exception as e:  # the type is what the test checks
        out["nan"] = (type(e).__name__, str(e))
    opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), cross_rank="mean")
    try:
        opt.backward(model(x[: 2 + rank]).mean(dim=1))  # 2 losses on rank 0, 3 on rank 1
    except Exception as e:
        out["unequal"] = (type(e).__name__, str(e))
    opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), batch_dim=0)
    with Collectives() as counter:
        opt.backward(model(x).sum(dim=1), accumulate=True)
        out["collectives_while_accumulating"] = len(counter.groups)
        opt.backward(model(x).sum(dim=1))
        out["collectives_at_the_end"] = len(counter.groups)
    out["record_m"] = (opt._path.record.m, tuple(opt._path.record.gramian.shape))
    for name, batch_dim in (("atomic_samples", 0), ("atomic_mean", None)):
        out[name] = _failed_late(model, x, batch_dim)
    return out


def _failed_late(model: nn.Module, x: torch.Tensor, batch_dim: int | None) -> tuple:
    """A step whose weights are NaN (after the exchange): what it raised and what it changed."""
    opt = JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        GramianWeightedAggregator(_CountingWeighting(poison_at=2)),
        batch_dim=batch_dim,
    )

    def losses():
        return model(x).sum(dim=1) if batch_dim == 0 else model(x).mean(dim=0)

    opt.step(losses)  # call 1: momentum state
    before = [(p.detach().clone(), p.grad.clone()) for p in model.parameters()]
    momentum = str(opt.optimizer.state_dict())
    try:
        opt.step(losses)
    except Exception as e:
        unchanged = all(
            torch.equal(p, v) and torch.equal(p.grad, g)
            for p, (v, g) in zip(model.parameters(), before, strict=True)
        )
        (calls,) = [int(v) for k, v in opt.aggregator.state_dict().items() if k.endswith("calls")]
        return type(e).__name__, unchanged, momentum == str(opt.optimizer.state_dict()), calls
    return ("no error",)


def _worker(rank: int, world: int, folder: str) -> dict[str, object]:
    results: dict[str, object] = {}
    for name in SCENARIOS:
        try:
            results[name] = _train(name, rank, world)
        except Exception:  # reported to the test as a traceback
            results[name] = traceback.format_exc()
    results["edge_cases"] = _edge_cases(rank)
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, object]]:
    return run_ranks(_worker, WORLD, tmp_path_factory.mktemp("ranks"), DEADLINE_S)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ranks_agree_with_one_process_on_the_global_batch(ranks, name):
    for rank in ranks:
        assert not isinstance(rank[name], str), rank[name]  # a traceback
    expected, _ = _train(name, 0, 1)
    params0, _ = ranks[0][name]
    for rank in ranks[1:]:
        for p0, p in zip(params0, rank[name][0], strict=True):
            assert torch.equal(p0, p), "the ranks hold different parameters"
    for p, e in zip(params0, expected, strict=True):
        torch.testing.assert_close(p, e, rtol=1e-9, atol=1e-11)


def test_the_per_sample_engine_sends_layer_pieces_not_the_jacobian(ranks):
    # Local batch 4: Linear(5, 6) sends inputs [4, 5] and output gradients [4, 6], Linear(6, 3)
    # [4, 6] and [4, 3]; float64. The Jacobian rows would be 4 x (36 + 21) floats.
    pieces = 4 * (5 + 6 + 6 + 3) * 8
    _, sent = ranks[0]["concat_per_sample_ddp"]
    assert sent == [pieces] * STEPS
    _, sent = ranks[0]["concat_jacobian_ddp"]
    assert sent == [4 * (36 + 21) * 8] * STEPS
    _, sent = ranks[0]["mean_ddp"]
    assert sent == [3 * (36 + 21) * 8] * STEPS  # one all_reduce of the 3 x n Jacobian
    _, sent = ranks[0]["mean_per_sample_ddp"]
    assert sent == [pieces] * STEPS  # "mean" sends the same layer pieces as "concat"


def test_the_layer_gramian_engine_sends_layer_pieces_under_mean(ranks):
    # 3 task losses, local batch 4. Linear(5, 6): input [4, 5], output gradients [3, 4, 6];
    # Linear(6, 3): [4, 6] and [3, 4, 3]. The Jacobian would be 3 x 57 values.
    _, sent = ranks[0]["mean_gramian_ddp"]
    assert sent == [(4 * 5 + 3 * 4 * 6 + 4 * 6 + 3 * 4 * 3) * 8] * STEPS
    # shared_params=Linear(5, 6): its pieces, and the summed gradient of the head (6 x 3 + 3).
    _, sent = ranks[0]["mean_shared_ddp"]
    assert sent == [(4 * 5 + 3 * 4 * 6 + 21) * 8] * STEPS


def test_a_failure_on_one_rank_raises_on_every_rank(ranks):
    rank0, rank1 = ranks[0]["edge_cases"], ranks[1]["edge_cases"]
    assert rank1["nan"][0] == "ValueError" and "NaN or inf" in rank1["nan"][1]
    assert rank0["nan"][0] == "PeerRankError" and "rank 1 failed" in rank0["nan"][1]
    for rank in (rank0, rank1):
        assert rank["unequal"][0] == "ValueError"
        assert "[2, 3] losses" in rank["unequal"][1]


def test_a_failure_after_the_exchange_changes_nothing_on_any_rank(ranks):
    for rank in ranks:
        for name in ("atomic_samples", "atomic_mean"):
            assert rank["edge_cases"][name] == ("NonFiniteError", True, True, 1), name


def test_the_step_record_holds_the_global_gramian(ranks):
    for rank in ranks:
        assert rank["edge_cases"]["record_m"] == (16, (16, 16))  # 2 micro-batches x 4 x 2 ranks


def test_accumulation_exchanges_only_at_the_final_micro_batch(ranks):
    for rank in ranks:
        assert rank["edge_cases"]["collectives_while_accumulating"] == 0
        assert rank["edge_cases"]["collectives_at_the_end"] > 0


def test_the_example_runs_under_torchrun():
    out = run_torchrun(ROOT / "examples" / "ddp_train.py", WORLD, DEADLINE_S)
    assert "ranks hold identical parameters: True" in out, out
    # Per rank and step: 2 micro-batches of 8 samples; Linear(20, 64) and Linear(64, 1) send
    # their inputs and output gradients, float32.
    pieces = 4 * 16 * ((20 + 64) + (64 + 1))
    steps = [line for line in out.splitlines() if line.startswith("step")]
    assert steps and all(line.endswith(f"bytes sent {pieces}") for line in steps), out
