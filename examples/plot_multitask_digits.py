"""
Multi-task learning on digits with a shared trunk
=================================================

Four tasks share one trunk on scikit-learn's handwritten digits (8x8 images, shipped with
scikit-learn): the digit (10 classes), its parity, whether it is at least 5, and the
reconstruction of the image. The trunk's parameters are passed as ``shared_params``: the Jacobian
of the four losses is taken with respect to them only and aggregated, while each head gets the
plain gradient of its own loss.

We train twice from the same initialisation on the same mini-batches: once with the ``Sum``
aggregator, whose update is the gradient of the summed losses (the usual
``loss.sum().backward()``), and once with :class:`~jdoptim.aggregation.UPGrad`. A step record
hook (see :mod:`jdoptim.diagnostics`) shows how often the task gradients conflict and whether
the update increases one of the losses. ``examples/multitask_demo.py`` repeats the comparison
over several seeds with two more aggregators.
"""

import matplotlib.pyplot as plt
import torch
from _digits import METRICS, QUICK, TASKS, load, train  # examples/_digits.py
from tqdm import tqdm

from jdoptim.aggregation import Sum, UPGrad

STEPS = 8 if QUICK else 800
train_split, test_split = load()
print(f"{len(train_split.x)} training and {len(test_split.x)} test images, {len(TASKS)} tasks")

# %%
# Train with each aggregator. Every 10th step is recorded: the Gramian of the trunk's
# Jacobian (one row per task), from which the record derives the cosines between task
# gradients, and the update's inner product with each task gradient.

runs = {}
for name, aggregator in {"Sum": Sum(), "UPGrad": UPGrad()}.items():
    with tqdm(total=STEPS, desc=name, unit="step") as bar:
        runs[name] = train(
            aggregator,
            0,
            train_split,
            test_split,
            steps=STEPS,
            record_every=10,
            progress=bar.update,
        )
for name, run in runs.items():
    metrics = ", ".join(f"{t} {m:.3f}" for t, m in zip(TASKS, run.metrics, strict=True))
    print(f"{name:7s} {metrics}  ({1e3 * run.seconds_per_step:.1f} ms/step)")

# %%
# The test metric of each task during training.

fig, axes = plt.subplots(1, len(TASKS), figsize=(12, 2.8))
for k, ax in enumerate(axes):
    for name, run in runs.items():
        ax.plot(run.eval_steps, [c[k] for c in run.curves], label=name)
    ax.set_title(f"{TASKS[k]} (test {METRICS[k]})", fontsize=9)
    ax.set_xlabel("step")
axes[0].legend()
fig.tight_layout()

# %%
# Conflicts during training. Left: the number of task pairs (out of 6) whose gradients on the
# trunk point away from each other (negative inner product); the two runs follow different
# trajectories, so they see different Jacobians. Right: whether the update increases some
# task's loss to first order (a negative inner product with that task's gradient). The
# summed gradient does whenever its conflicts are strong enough; UPGrad's update never does
# (up to rounding), by construction.

fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3))
for name, run in runs.items():
    recorded = range(0, 10 * len(run.records), 10)
    left.plot(recorded, [r.conflicting_pairs for r in run.records], label=name, alpha=0.8)
    conflicts = torch.tensor([float(r.update_conflicts) for r in run.records])
    window = min(10, len(conflicts))
    smoothed = conflicts.unfold(0, window, 1).mean(1)  # over the last `window` records
    right.plot(list(recorded)[window - 1 :], smoothed.numpy(), label=name)
    print(f"{name}: the update increased some task loss at {conflicts.mean():.0%} of the records")
left.set(xlabel="step", ylabel="conflicting pairs", title="conflicting task pairs")
right.set(xlabel="step", ylabel="fraction", title="update increases a task loss")
right.set_ylim(-0.05, 1.05)
left.legend()
fig.tight_layout()
plt.show()
