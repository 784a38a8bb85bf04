"""Two processes (gloo, CPU): FSDP2 (``fully_shard``) and ``process_group=``.

Under FSDP2 each rank holds shards of the parameters; a Jacobian step must equal one process
training on the whole global batch (float64, three steps, SGD with momentum). The reference runs
in this process, without ``torch.distributed``. Everything runs in one bounded spawn of two
processes (see :mod:`tests._ranks`).
"""

from __future__ import annotations

import os
import re
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from jdoptim import JacobianOptimizer
from jdoptim.aggregation import GradDrop, TrimmedMean, UPGrad
from tests._ranks import Collectives, run_ranks, run_torchrun

fsdp = pytest.importorskip("torch.distributed.fsdp")
pytest.importorskip("torch.distributed.checkpoint")

WORLD, GLOBAL_BATCH, STEPS, DEADLINE_S = 2, 8, 3, 120

# name: (aggregator, losses, shared_params, batch_dim, micro-batches per rank, cross_rank)
SCENARIOS = {
    "upgrad_concat": ("upgrad", "sample", False, None, 1, "concat"),
    "upgrad_mean": ("upgrad", "task", False, None, 1, "mean"),
    "trimmed_mean": ("trimmed", "sample", False, None, 1, "concat"),
    "shared_mean": ("upgrad", "task", True, None, 1, "mean"),
    "shared_concat": ("upgrad", "sample", True, None, 1, "concat"),
    "batch_dim": ("upgrad", "sample", False, 0, 1, None),
    "accumulate_concat": ("upgrad", "sample", False, None, 2, "concat"),
    "accumulate_mean": ("upgrad", "task", False, None, 2, "mean"),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    # Uneven shards over two ranks (4 + 3 rows, 1 + 0: rank 1 holds an empty shard, 2 + 1).
    return nn.Sequential(
        nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1), nn.Tanh(), nn.Linear(1, 3)
    ).double()


def _sharded(model: nn.Module, mesh) -> nn.Module:
    for layer in (model[0], model[2], model[4]):
        fsdp.fully_shard(layer, mesh=mesh)
    return fsdp.fully_shard(model, mesh=mesh)


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(GLOBAL_BATCH, 5, generator=generator, dtype=torch.float64)
    return x, torch.randn(GLOBAL_BATCH, 3, generator=generator, dtype=torch.float64)


def _optimizer(model: nn.Module, name: str, **options) -> JacobianOptimizer:
    aggregator, _, shared, batch_dim, _, cross_rank = SCENARIOS[name]
    return JacobianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        TrimmedMean(trim_number=1) if aggregator == "trimmed" else UPGrad(),
        shared_params=model[0].parameters() if shared else None,
        batch_dim=batch_dim,
        cross_rank=cross_rank,
        **options,
    )


def _losses(net: nn.Module, kind: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    squared = (net(x) - y) ** 2
    return squared.mean(dim=0) if kind == "task" else squared.sum(dim=1)


def _train(name, model, opt, rank, world, steps=range(STEPS)) -> list[int]:
    """Train ``steps`` on this rank's shard of the global batches; the bytes sent per step."""
    kind, micro = SCENARIOS[name][1], SCENARIOS[name][4] if world > 1 else 1
    sent = []
    for step in steps:
        x, y = (t.chunk(world)[rank] for t in _data(step))
        xs, ys = x.chunk(micro), y.chunk(micro)
        for i in range(micro - 1):
            opt.backward(_losses(model, kind, xs[i], ys[i]), accumulate=True)

        def closure(x=xs[-1], y=ys[-1]):
            opt.zero_grad()
            return _losses(model, kind, x, y)

        opt.step(closure)
        sent.append(opt.cross_rank_bytes)
    return sent


def _full(model: nn.Module) -> list[torch.Tensor]:
    return [getattr(p, "full_tensor", p.detach)().detach().clone() for p in model.parameters()]


def _caught(f) -> tuple[str, str]:
    try:
        f()
    except Exception as e:  # the type and message are what the tests check
        return type(e).__name__, str(e)
    return "no error", ""


def _edge_cases(rank: int, mesh) -> dict[str, object]:
    out: dict[str, object] = {}
    x, y = (t.chunk(WORLD)[rank] for t in _data(0))
    model = _sharded(_model(), mesh)

    def with_nan():
        opt = _optimizer(model, "upgrad_concat")
        losses = _losses(model, "sample", x, y)
        if rank == 1:
            losses = losses * torch.tensor([1.0, float("nan"), 1.0, 1.0], dtype=torch.float64)
        opt.backward(losses)

    before = [p.to_local().clone() for p in model.parameters()]
    out["nan"] = _caught(with_nan)
    out["nan_unchanged"] = all(
        torch.equal(p.to_local(), b) and p.grad is None
        for p, b in zip(model.parameters(), before, strict=True)
    )

    def nan_jacobian():  # finite losses whose Jacobian holds NaN, on rank 1 only
        opt = _optimizer(model, "upgrad_concat")
        output = model(x)
        losses = ((output - y) ** 2).sum(dim=1)
        if rank == 1:
            losses = losses + torch.sqrt(output[:, 0] * 0.0)  # value 0, derivative 0 * inf
        opt.backward(losses)

    out["nan_jacobian"] = _caught(nan_jacobian)
    out["unequal"] = _caught(
        lambda: _optimizer(model, "upgrad_mean").backward(model(x[: 2 + rank]).mean(dim=1))
    )
    out["needs_matrix"] = _caught(
        lambda: JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), GradDrop()).backward(
            _losses(model, "task", x, y)
        )
    )
    from torch.distributed.device_mesh import init_device_mesh

    names = ("replicate", "shard")  # HSDP
    hybrid = _sharded(_model(), init_device_mesh("cpu", (1, WORLD), mesh_dim_names=names))
    out["hsdp"] = _caught(
        lambda: _optimizer(hybrid, "upgrad_concat").backward(_losses(hybrid, "sample", x, y))
    )
    return out


def _scaled(rank: int, mesh) -> list[torch.Tensor]:
    """The two-phase GradScaler loop: ``backward(scaler.scale(losses))``, ``scaler.step``."""
    model = _sharded(_model(), mesh)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = _optimizer(model, "upgrad_concat", grad_scaler=scaler)
    for step in range(STEPS):
        x, y = (t.chunk(WORLD)[rank] for t in _data(step))
        opt.zero_grad()
        opt.backward(scaler.scale(_losses(model, "sample", x, y)))
        scaler.step(opt)
        scaler.update()
    return _full(model)


def _resume(rank: int, mesh, folder: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Train 2 steps, checkpoint with DCP, train 2 more; and resume a fresh model from the
    checkpoint for the same 2 steps. Returns this rank's shards of both runs."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _sharded(_model(), mesh)
    opt = _optimizer(model, "upgrad_concat")
    _train("upgrad_concat", model, opt, rank, WORLD, range(2))
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(folder, "dcp"))
    _train("upgrad_concat", model, opt, rank, WORLD, range(2, 4))
    continued = [p.to_local().clone() for p in model.parameters()]

    fresh = _model()  # another initialisation: everything must come from the checkpoint
    with torch.no_grad():
        for p in fresh.parameters():
            p.normal_()
    fresh = _sharded(fresh, mesh)
    fresh_opt = _optimizer(fresh, "upgrad_concat")
    model_sd, optim_sd = get_state_dict(fresh, fresh_opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=os.path.join(folder, "dcp"))
    set_state_dict(
        fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    _train("upgrad_concat", fresh, fresh_opt, rank, WORLD, range(2, 4))
    return continued, [p.to_local().clone() for p in fresh.parameters()]


def _process_groups(rank: int) -> dict[str, object]:
    """Plain (unsharded) models: a group of both ranks, a 1-D mesh, and one group per rank."""
    from torch.distributed.device_mesh import init_device_mesh

    out: dict[str, object] = {}
    pair = dist.new_group([0, 1])
    singles = [dist.new_group([r]) for r in range(WORLD)]  # every rank creates every group
    for name, scenario, group in (
        ("group_pair", "batch_dim", pair),
        ("group_mesh", "upgrad_mean", init_device_mesh("cpu", (WORLD,))),
    ):
        model = _model()
        opt = _optimizer(model, scenario, process_group=group)
        with Collectives() as recorded:
            _train(scenario, model, opt, rank, WORLD)
        expected = group if name == "group_pair" else group.get_group()
        on_group = [g is expected for g in recorded.groups]
        out[name] = (_full(model), on_group)
    model = _model()  # alone in its group: this rank's shard only, nothing exchanged
    opt = _optimizer(model, "upgrad_concat", process_group=singles[rank])
    sent = _train("upgrad_concat", model, opt, rank, WORLD)
    out["group_single"] = (_full(model), sent)
    grid = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("replicate", "shard"))
    out["2d_mesh"] = _caught(lambda: _optimizer(_model(), "upgrad_concat", process_group=grid))
    out["not_a_member"] = _caught(
        lambda: _optimizer(_model(), "upgrad_concat", process_group=singles[1 - rank]).backward(
            _model()(torch.ones(2, 5, dtype=torch.float64)).sum(dim=1)
        )
    )
    return out


def _worker(rank: int, world: int, folder: str) -> dict[str, object]:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    results: dict[str, object] = {}
    for name in SCENARIOS:
        try:
            model = _sharded(_model(), mesh)
            sent = _train(name, model, _optimizer(model, name), rank, world)
            results[name] = (_full(model), sent)
        except Exception:  # reported to the test as a traceback
            results[name] = traceback.format_exc()
    for key, run in (
        ("edge_cases", lambda: _edge_cases(rank, mesh)),
        ("resume", lambda: _resume(rank, mesh, folder)),
        ("scaled", lambda: _scaled(rank, mesh)),
        ("groups", lambda: _process_groups(rank)),
    ):
        try:
            results[key] = run()
        except Exception:
            results[key] = traceback.format_exc()
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, object]]:
    return run_ranks(_worker, WORLD, tmp_path_factory.mktemp("fsdp"), DEADLINE_S)


def _reference(name: str, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    model = _model()
    _train(name, model, _optimizer(model, name), rank, world)
    return [p.detach() for p in model.parameters()]


def _result(ranks, key: str, rank: int = 0):
    value = ranks[rank][key]
    assert not isinstance(value, str), value  # a traceback
    return value


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_fsdp2_equals_one_process_on_the_global_batch(ranks, name):
    expected = _reference(name)
    for rank in range(WORLD):
        params, _ = _result(ranks, name, rank)
        for p, e in zip(params, expected, strict=True):
            torch.testing.assert_close(p, e, rtol=1e-12, atol=1e-14)


def test_fsdp2_sends_the_other_shards_rows_and_one_gramian(ranks):
    # n = 42 + 8 + 6 parameters. Rank 0 holds rows 0-3 of Linear(5, 7), the row of Linear(7, 1)
    # and rows 0-1 of Linear(1, 3): 24 + 8 + 4 = 36; rank 1 holds 18 + 0 + 2 = 20. Each rank
    # sends its 4 local losses' rows on the other rank's columns, then the 8 x 8 Gramian and two
    # flags (float64).
    gramian = (8 * 8 + 1 + 1) * 8
    assert _result(ranks, "upgrad_concat", 0)[1] == [4 * 20 * 8 + gramian] * STEPS
    assert _result(ranks, "upgrad_concat", 1)[1] == [4 * 36 * 8 + gramian] * STEPS
    # "mean": 3 task losses, one m x n reduce-scatter in effect, a 3 x 3 Gramian.
    assert _result(ranks, "upgrad_mean", 0)[1] == [3 * 20 * 8 + (9 + 2) * 8] * STEPS


def test_fsdp2_a_bad_loss_on_one_rank_raises_on_every_rank(ranks):
    rank0, rank1 = _result(ranks, "edge_cases", 0), _result(ranks, "edge_cases", 1)
    assert rank1["nan"][0] == "ValueError" and "NaN or inf" in rank1["nan"][1]
    assert rank0["nan"][0] == "PeerRankError" and "rank 1 failed" in rank0["nan"][1]
    for rank in (rank0, rank1):
        assert rank["nan_unchanged"]
        assert rank["nan_jacobian"][0] == "NonFiniteError", rank["nan_jacobian"]
        assert rank["unequal"][0] == "ValueError" and "[2, 3] losses" in rank["unequal"][1]


def test_fsdp2_an_aggregator_of_the_whole_matrix_raises_naming_the_alternatives(ranks):
    for rank in range(WORLD):
        kind, message = _result(ranks, "edge_cases", rank)["needs_matrix"]
        assert kind == "NotImplementedError"
        assert "GradDrop" in message and "Gramian" in message and "TrimmedMean" in message


def test_fsdp2_on_a_2d_mesh_hsdp_raises(ranks):
    for rank in range(WORLD):
        kind, message = _result(ranks, "edge_cases", rank)["hsdp"]
        assert kind == "NotImplementedError" and "HSDP" in message


def test_fsdp2_with_a_grad_scaler_equals_one_process_unscaled(ranks):
    expected = _reference("upgrad_concat")
    for rank in range(WORLD):
        for p, e in zip(_result(ranks, "scaled", rank), expected, strict=True):
            torch.testing.assert_close(p, e, rtol=1e-12, atol=1e-14)


def test_fsdp2_resumes_from_a_dcp_checkpoint_bit_for_bit(ranks):
    for rank in range(WORLD):
        continued, resumed = _result(ranks, "resume", rank)
        assert all(torch.equal(a, b) for a, b in zip(continued, resumed, strict=True))


def test_a_process_group_of_both_ranks_carries_every_collective(ranks):
    for name, scenario in (("group_pair", "batch_dim"), ("group_mesh", "upgrad_mean")):
        expected = _reference(scenario)
        for rank in range(WORLD):
            params, on_group = _result(ranks, "groups", rank)[name]
            assert on_group and all(on_group), on_group
            for p, e in zip(params, expected, strict=True):
                torch.testing.assert_close(p, e, rtol=1e-12, atol=1e-14)


def test_a_rank_alone_in_its_group_trains_on_its_shard_only(ranks):
    for rank in range(WORLD):
        params, sent = _result(ranks, "groups", rank)["group_single"]
        assert sent == [0] * STEPS
        expected = _reference("upgrad_concat", rank, WORLD)  # its own shard of every batch
        for p, e in zip(params, expected, strict=True):
            torch.testing.assert_close(p, e, rtol=1e-12, atol=1e-14)


def test_a_process_outside_the_group_is_told_so(ranks):
    for rank in range(WORLD):
        kind, message = _result(ranks, "groups", rank)["not_a_member"]
        assert kind == "ValueError" and "not a member" in message


def test_a_2d_mesh_as_process_group_is_refused_naming_its_shape(ranks):
    for rank in range(WORLD):
        kind, message = _result(ranks, "groups", rank)["2d_mesh"]
        assert kind == "ValueError" and "1-D DeviceMesh" in message and "(1, 2)" in message


def test_process_group_must_be_a_group_or_a_1d_mesh():
    with pytest.raises(TypeError, match="process_group must be"):
        JacobianOptimizer(torch.optim.SGD(_model().parameters(), lr=0.1), process_group="world")


def test_the_fsdp2_example_runs_under_torchrun_and_matches_one_process():
    script = Path(__file__).resolve().parents[1] / "examples" / "distributed_fsdp.py"
    out = run_torchrun(script, WORLD, DEADLINE_S)
    gap = re.search(r"largest difference from one process on the global batch: (\S+)", out)
    assert gap is not None and float(gap[1]) < 1e-12, out
    # Rank 0 holds 32 rows of Linear(20, 64) and the row of Linear(64, 1): 672 + 65 = 737 of the
    # n = 1409 parameters; it sends its 16 losses' rows on rank 1's 672 columns, the 32 x 32
    # Gramian and two flags (float64).
    sent = [line for line in out.splitlines() if line.startswith("step")]
    assert sent and all(
        line.endswith(f"bytes sent {16 * 672 * 8 + (32 * 32 + 2) * 8}") for line in sent
    )
