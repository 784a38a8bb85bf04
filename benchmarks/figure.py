"""Draw the per-sample step ratio (to a plain step) against the batch size, from one run.

Usage::

    python -m pytest benchmarks/test_step_grid.py -k per_sample_step --benchmark-only \\
        --benchmark-json=grid.json
    python benchmarks/figure.py grid.json docs/images/per_sample_ratio.png

It prints the ratios as a markdown table and draws them. Every ratio is the median step time
over the median plain step of the same model and batch size, from the same run (needs
``matplotlib``: ``pip install jdoptim[bench]``).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def ratios(path: str) -> dict[tuple[str, str], dict[int, float]]:
    """``(model, method) -> {batch: ratio to the plain step}`` from a pytest-benchmark JSON."""
    with open(path) as f:
        benches = json.load(f)["benchmarks"]
    medians: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
    for b in benches:
        info = b.get("extra_info", {})
        if "batch" in info and "model" in info:
            medians[info["model"], info["batch"]][info["method"]] = b["stats"]["median"]
    result: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for (model, batch), by_method in medians.items():
        plain = by_method.get("plain")
        for method, median in by_method.items():
            if plain and method != "plain":
                result[model, method][batch] = median / plain
    return result


def table(path: str) -> str:
    """A markdown table of the ratios: one row per model and batch size, one column per method."""
    data = ratios(path)
    methods = sorted({method for _, method in data})
    rows = sorted({(model, b) for (model, _), points in data.items() for b in points})
    lines = [
        "| model | B | " + " | ".join(methods) + " |",
        "|---|---:|" + "---:|" * len(methods),
    ]
    for model, b in rows:
        cells = [data.get((model, m), {}).get(b) for m in methods]
        text = ["-" if c is None else f"{c:.2f}x" for c in cells]
        lines.append(f"| {model} | {b} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def draw(path: str, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = ratios(path)
    models = sorted({model for model, _ in data})
    fig, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models), 3.2), sharey=True)
    axes = axes if len(models) > 1 else [axes]
    for ax, model in zip(axes, models, strict=True):
        for (m, method), points in sorted(data.items()):
            if m == model:
                batches = sorted(points)
                ax.plot(batches, [points[b] for b in batches], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.axhline(1.0, color="grey", linewidth=0.5)
        ax.set_title(model, fontsize=8)
        ax.set_xlabel("batch size (losses m)")
    axes[0].set_ylabel("step time / plain step")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=80)


if __name__ == "__main__":
    print(table(sys.argv[1]))
    if len(sys.argv) > 2:
        draw(sys.argv[1], sys.argv[2])
