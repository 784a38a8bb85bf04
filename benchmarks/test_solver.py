"""The UPGrad weights alone on real-training Gramians beside random ones (issue 14).

For each Gramian ``G``: ``UPGradWeighting()(G)`` (the batched solver, ``project_weights``),
one-by-one quadprog (``project_weights_quadprog``, the reference) and the peer's
``UPGradWeighting`` (TorchJD, skipped when absent), in the same run. Real Gramians are the float64
Gramians of the per-sample Jacobians of ``tests/_realdata.py`` (digits MLP, early and late in
training; m = B = 16…256, plus a B = 1024 capture made here); random ones are ``J Jᵀ`` for
``J ~ N(0, 1)`` of shape ``[m, 1000]`` (float64). ``extra_info["fallbacks"]`` counts the problems
the batched solver handed to quadprog during the timed calls (expected: 0). quadprog and the
peer are timed for m <= 256 only (one-by-one QPs take seconds beyond). m = 1024 is marked
``slow`` (deselect with ``-m "not slow"``).

``test_rank_deficient_weights``: ``UPGradWeighting()(J Jᵀ)`` for ``J ~ N(0, 1)`` of shape
``[m, r]`` with ``r << m`` (64 x 32, 128 x 8, 256 x 8, 1024 x 16, float64): singular Gramians,
where the solver runs Lawson & Hanson (projected Newton before: 36 s at 256 x 8).

Run from the repository root (``tests`` must be importable)::

    python -m pytest benchmarks/test_solver.py -o addopts="" -p no:cacheprovider \\
        --benchmark-only --benchmark-json=solver.json
    PYTHONPATH=. python benchmarks/test_solver.py solver.json   # the README table
"""

from __future__ import annotations

import functools
import importlib
import json
import sys
from collections import defaultdict

import pytest
import torch

import jdoptim.linalg._active_set as active_set
from jdoptim.aggregation import UPGradWeighting
from jdoptim.linalg import project_weights_quadprog

SIZES = (16, 64, 128, 256, 1024)
RANK_DEFICIENT = ((64, 32), (128, 8), (256, 8), (1024, 16))
KINDS = ("random", "early", "late")
SOLVERS = ("jdoptim", "quadprog", "torchjd")


@functools.cache
def _captures() -> dict[str, torch.Tensor]:
    pytest.importorskip("sklearn")
    from tests._realdata import capture

    out = {}
    for c in capture("digits", "mlp", (16, 64, 128, 256, 1024), 300):
        out[c.name] = c.gramian
    return out


def _gramian(kind: str, m: int) -> torch.Tensor:
    if kind == "random":
        j = torch.randn(m, 1000, generator=torch.Generator().manual_seed(m), dtype=torch.float64)
        return j @ j.T
    return _captures()[f"digits-mlp-{kind}-B{m}"]


def _counted_fallbacks(monkeypatch) -> list[int]:
    """Count the problems ``project_weights`` hands to quadprog (expected: none)."""
    fallbacks: list[int] = []

    def counted(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        fallbacks.append(u.shape[0])
        return project_weights_quadprog(g, u)

    monkeypatch.setattr(active_set, "project_weights_quadprog", counted)
    return fallbacks


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize(
    "m", [pytest.param(m, marks=pytest.mark.slow) if m >= 1024 else m for m in SIZES]
)
@pytest.mark.parametrize("kind", KINDS)
def test_upgrad_weights(benchmark, monkeypatch, kind: str, m: int, solver: str):
    gramian = _gramian(kind, m)
    benchmark.group = f"UPGrad weights, {kind}, m={m}"
    benchmark.extra_info.update({"kind": kind, "m": m, "solver": solver})
    if solver != "jdoptim" and m > 256:
        pytest.skip("one-by-one QPs: seconds per call beyond m = 256")
    if solver == "jdoptim":
        fallbacks = _counted_fallbacks(monkeypatch)
        weigh = functools.partial(UPGradWeighting(), gramian)
    elif solver == "quadprog":
        targets = torch.eye(m, dtype=gramian.dtype)
        weigh = functools.partial(lambda: project_weights_quadprog(gramian, targets).mean(0))
    else:
        pytest.importorskip("torchjd", reason="torchjd is not installed (optional competitor)")
        weigh = functools.partial(
            importlib.import_module("torchjd.aggregation").UPGradWeighting(), gramian
        )
    weigh()  # warm-up
    if solver == "jdoptim":
        fallbacks.clear()
    rounds = 1 if (solver != "jdoptim" and m >= 128) or m >= 1024 else 5
    benchmark.pedantic(weigh, rounds=rounds, iterations=1)
    if solver == "jdoptim":
        benchmark.extra_info["fallbacks"] = sum(fallbacks)


@pytest.mark.parametrize(
    ("m", "rank"),
    [
        pytest.param(*shape, marks=pytest.mark.slow) if shape[0] >= 1024 else shape
        for shape in RANK_DEFICIENT
    ],
)
def test_rank_deficient_weights(benchmark, monkeypatch, m: int, rank: int):
    j = torch.randn(m, rank, generator=torch.Generator().manual_seed(m), dtype=torch.float64)
    gramian = j @ j.T
    benchmark.group = f"UPGrad weights, rank {rank}, m={m}"
    benchmark.extra_info.update({"kind": f"rank {rank}", "m": m, "solver": "jdoptim"})
    fallbacks = _counted_fallbacks(monkeypatch)
    weigh = functools.partial(UPGradWeighting(), gramian)
    weigh()  # warm-up
    fallbacks.clear()
    benchmark.pedantic(weigh, rounds=1 if m >= 1024 else 3, iterations=1)
    benchmark.extra_info["fallbacks"] = sum(fallbacks)


def table(path: str) -> str:
    """Markdown: one row per (kind, m), median ms per solver and the fallback count."""
    with open(path) as f:
        data = json.load(f)
    cells: dict[tuple[str, int], dict[str, str]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        key = (info["kind"], info["m"])
        cells[key][info["solver"]] = f"{bench['stats']['median'] * 1e3:.1f}"
        if "fallbacks" in info:
            cells[key]["fallbacks"] = str(info["fallbacks"])
    lines = [
        "| Gramian | m | jdoptim (ms) | quadprog one-by-one (ms) | peer (ms) | fallbacks |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    keys = [(kind, m) for kind in KINDS for m in SIZES]
    keys += [(f"rank {r}", m) for m, r in RANK_DEFICIENT]
    for kind, m in keys:
        if (kind, m) in cells:
            row = cells[(kind, m)]
            values = [row.get(s, "-") for s in (*SOLVERS, "fallbacks")]
            lines.append(f"| {kind} | {m} | " + " | ".join(values) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1]))
