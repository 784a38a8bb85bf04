"""Figures of the performance page, drawn at build time from ``benchmarks/README.md``."""

from __future__ import annotations

import re

import matplotlib.pyplot as plt
from benchmark_tables import aggregator_times, parse_float, read_tables, step_tables
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

COLORS = {"plain": "#777777", "jdoptim": "#2a7ab0", "peer": "#e08a2c"}


def _label(name: str) -> tuple[str, str]:
    """A short label and its family (plain, jdoptim or the peer) for a benchmark's name."""
    base, _, params = name.removeprefix("test_").partition("[")
    params = params.rstrip("]")
    kind = base.split("_", 1)[1] if "_" in base else base
    if kind == "plain":
        return "plain backward()", "plain"
    family = "peer" if kind.startswith("torchjd") else "jdoptim"
    text = {
        "jacobian_optimizer": "JacobianOptimizer",
        "jacobian_optimizer_batch_dim": "JacobianOptimizer, batch_dim=0",
        "functional": "functional API",
        "torchjd": "peer",
        "torchjd_autogram": "peer, autogram",
    }.get(kind, kind)
    return f"{text} [{params}]" if params else text, family


def steps() -> None:
    """Time of one step relative to a plain step, and peak memory, for each step benchmark."""
    tables = step_tables()
    heights = [len(t.rows) for t in tables]
    _fig, axes = plt.subplots(
        len(tables),
        2,
        figsize=(9, 0.28 * sum(heights) + 1.2 * len(tables)),
        gridspec_kw={"height_ratios": heights, "width_ratios": [3, 2]},
        squeeze=False,
    )
    for (ax_time, ax_mem), table in zip(axes, tables, strict=True):
        labels, families = zip(*(_label(n) for n in table.column("benchmark")), strict=True)
        ratios = [parse_float(c) for c in table.column("vs plain")]
        memory = [parse_float(c) for c in table.column("peak torch (MiB)")]
        colors = [COLORS[f] for f in families]
        y = range(len(labels))
        ax_time.barh(y, ratios, color=colors)
        ax_time.set_xscale("log")
        ax_time.set_xlim(0.8, max(ratios) * 2.5)  # room for the labels
        ax_time.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax_time.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax_time.xaxis.set_minor_formatter(NullFormatter())
        ax_time.set_yticks(list(y), labels)
        ax_time.invert_yaxis()
        ax_time.set_title(table.title, loc="left", fontsize=9)
        ax_time.set_xlabel("step time / plain step (log)")
        for i, r in enumerate(ratios):
            ax_time.text(r, i, f" {r:g}x", va="center", fontsize=7)
        ax_mem.barh(y, memory, color=colors)
        ax_mem.set_yticks(list(y), [])
        ax_mem.invert_yaxis()
        ax_mem.set_xlabel("peak memory of a step (MiB)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    axes[0, 0].legend(handles, ["plain step", "jdoptim", "peer (TorchJD)"], loc="lower right")


def weighting() -> None:
    """The UPGrad weighting alone: the batched solver against one quadprog problem per row."""
    series: dict[str, dict[int, float]] = {}
    for table in read_tables():
        match = re.fullmatch(r"UPGrad weighting.*m=(\d+)", table.title)
        if not match:
            continue
        for name, median in zip(
            table.column("benchmark"), table.column("median (ms)"), strict=True
        ):
            kind = name.split("[")[0].removeprefix("test_upgrad_weighting").strip("_") or "jdoptim"
            series.setdefault(kind, {})[int(match.group(1))] = parse_float(median)
    if not series:
        raise ValueError("no 'UPGrad weighting ... m=N' table in benchmarks/README.md")
    names = {
        "jdoptim": "project_weights (batched active set)",
        "quadprog": "quadprog, one row at a time",
        "torchjd": "peer (TorchJD)",
    }
    _fig, ax = plt.subplots(figsize=(6, 3.6))
    for kind, points in series.items():
        ms = sorted(points)
        ax.plot(ms, [points[m] for m in ms], marker="o", label=names.get(kind, kind))
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("m (number of losses)")
    ax.set_ylabel("median time (ms, log)")
    ax.set_title("UPGrad weights from a random m x m Gramian", loc="left")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()


def aggregators() -> None:
    """Each aggregator alone on a Jacobian of shape ``[m, 10 000]``, at the two largest ``m``."""
    ms, times = aggregator_times()
    shown = ms[-2:]
    order = sorted(times, key=lambda k: times[k][-1] or 0.0)
    _fig, ax = plt.subplots(figsize=(7, 0.25 * len(order) + 1.2))
    width = 0.4
    for j, m in enumerate(shown):
        column = ms.index(m)
        values = [times[k][column] or 0.0 for k in order]
        ax.barh(
            [i + (j - 0.5) * width for i in range(len(order))],
            values,
            height=width,
            label=f"m = {m}",
        )
    ax.set_yticks(range(len(order)), order)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("median time of aggregator(J), J of shape [m, 10 000], float32 (ms, log)")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.grid(True, axis="x", which="major", alpha=0.3)
    ax.legend(loc="upper right")
