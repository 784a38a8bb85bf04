"""Time of each aggregator of ``AGGREGATORS_UNDER_TEST`` on one Jacobian, at m = 2, 8, 32, 128.

One representative configuration per method: the first entry of the table for each method name
(``UPGrad`` and not ``UPGrad-pref``, ``CAGrad`` with ``c = 0.5``, ``CRMOGM-MGDA``, ...), built by
the table's own factory for ``m`` rows. The input is ``J ~ N(0, 1)`` of shape ``[m, 10_000]``,
float32, CPU, seeded per ``m``; the time is that of ``aggregator(J)``, Gramian included for the
Gramian-only methods. Stateful methods are timed in steady state (their state moves from call to
call, as in training); random ones draw fresh randomness at every call. Methods undefined for
``m`` rows (fewer than the entry's ``min_rows``) are skipped with the reason.

Run from the repository root (``tests`` must be importable)::

    python -m pytest benchmarks/test_aggregators.py -o addopts="" -p no:cacheprovider \\
        --benchmark-only --benchmark-json=agg.json
    PYTHONPATH=. python benchmarks/test_aggregators.py agg.json   # aggregator x m table
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import pytest
import torch

from tests.aggregation._table import AGGREGATORS_UNDER_TEST, Entry

N_COLUMNS = 10_000
ROWS = (2, 8, 32, 128)
WARMUP_CALLS = 2


def _method(entry: Entry) -> str:
    """The method's name: the entry's name up to its first configuration suffix."""
    return entry.name.split("-")[0]


def _representatives() -> list[Entry]:
    seen: set[str] = set()
    chosen = []
    for entry in AGGREGATORS_UNDER_TEST:
        if _method(entry) not in seen:
            seen.add(_method(entry))
            chosen.append(entry)
    return chosen


REPRESENTATIVES = _representatives()


def _jacobian(m: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(m)
    return torch.randn(m, N_COLUMNS, generator=generator, dtype=torch.float32)


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("entry", REPRESENTATIVES, ids=str)
def test_aggregator(benchmark, entry: Entry, m: int):
    benchmark.group = f"aggregators, m={m}, n={N_COLUMNS}, float32"
    benchmark.extra_info.update({"aggregator": entry.name, "m": m, "n": N_COLUMNS})
    if m < entry.min_rows:
        pytest.skip(f"{entry.name} is undefined for m={m} rows (needs at least {entry.min_rows})")
    matrix = _jacobian(m)
    aggregator = entry.make(m)
    for _ in range(WARMUP_CALLS):
        aggregator(matrix)
    update = benchmark(aggregator, matrix)
    assert update.shape == (N_COLUMNS,)
    assert bool(torch.isfinite(update).all())


def table(path: str) -> str:
    """The markdown table ``aggregator x m`` of the median times (ms) in a benchmark JSON file."""
    with open(path) as f:
        data = json.load(f)
    medians: dict[str, dict[int, float]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        medians[info["aggregator"]][info["m"]] = bench["stats"]["median"] * 1e3
    header = "| aggregator | " + " | ".join(f"m = {m}" for m in ROWS) + " |"
    lines = [header, "|---|" + "---:|" * len(ROWS)]
    for entry in REPRESENTATIVES:
        times = medians.get(entry.name, {})
        cells = [f"{times[m]:.2f}" if m in times else "-" for m in ROWS]
        lines.append(f"| {entry.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1]))
