"""The README's demo: multi-task learning on digits, summed losses vs three aggregators, 5 seeds.

Four tasks share a trunk (see ``_digits.py``): the digit, its parity, whether it is at least 5,
and the image's reconstruction. Each method trains the same model from the same initialisation on
the same mini-batches (Adam, lr 1e-3), for each seed; nothing is tuned per method and no seed is
left out. The script prints the mean ± standard deviation over the seeds of each task's test
metric and the mean time per training step, and writes a figure of the test curves.

Run ``python examples/multitask_demo.py [--seeds 5] [--out multitask_demo.png]``;
``JDOPTIM_QUICK=1`` runs 2 seeds of a few steps (used by the tests).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _digits import METRICS, QUICK, TASKS, load, train  # examples/_digits.py
from tqdm import tqdm

from jdoptim.aggregation import IMTLG, MGDA, UPGrad

METHODS = {"sum": None, "UPGrad": UPGrad, "MGDA": MGDA, "IMTL-G": IMTLG}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2 if QUICK else 5)
    parser.add_argument("--out", default="multitask_demo.png", help="where to write the figure")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # steady timings; the model is small
    train_split, test_split = load()
    runs: dict[str, list] = {name: [] for name in METHODS}
    steps = None
    with tqdm(total=len(METHODS) * args.seeds, desc="training runs", unit="run") as bar:
        for seed in range(args.seeds):
            for name, make in METHODS.items():
                run = train(None if make is None else make(), seed, train_split, test_split)
                runs[name].append(run)
                steps = run.eval_steps[-1] + 1
                bar.update()
    print(table(runs, args.seeds, steps))
    figure(runs, args.out)
    print(f"figure: {args.out}")


def table(runs: dict[str, list], seeds: int, steps: int) -> str:
    """Mean ± standard deviation over seeds of each task's final test metric, and time/step."""
    header = ["method"] + [f"{t} ({m})" for t, m in zip(TASKS, METRICS, strict=True)]
    header.append("ms/step")
    rows = []
    for name, method_runs in runs.items():
        row = [name]
        for k in range(len(TASKS)):
            values = [r.metrics[k] for r in method_runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            digits = 4 if METRICS[k] == "MSE" else 3
            row.append(f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}")
        row.append(f"{1e3 * statistics.mean(r.seconds_per_step for r in method_runs):.2f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"test metrics after {steps} steps, mean ± std over {seeds} seeds"]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]
    ]
    return "\n".join(lines)


def figure(runs: dict[str, list], out: str) -> None:
    """One panel per task: the mean test metric over seeds, shaded between min and max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(3.2 * len(TASKS), 2.8))
    for k, ax in enumerate(axes):
        for name, method_runs in runs.items():
            steps = method_runs[0].eval_steps
            curves = torch.tensor([[c[k] for c in r.curves] for r in method_runs])
            ax.plot(steps, curves.mean(0).numpy(), label=name)
            ax.fill_between(
                steps, curves.min(0).values.numpy(), curves.max(0).values.numpy(), alpha=0.2
            )
        ax.set_title(f"{TASKS[k]} (test {METRICS[k]})", fontsize=9)
        ax.set_xlabel("step")
        if METRICS[k] == "accuracy":
            ax.set_ylim(0.5, 1.0)
        else:
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
