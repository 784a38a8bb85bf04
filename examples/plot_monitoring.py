"""
Monitoring what the aggregator does
===================================

``opt.register_step_record_hook(hook)`` calls ``hook(opt, record)`` at every step with a
:class:`~jdoptim.diagnostics.StepRecord`: the losses, the Gramian of the Jacobian the aggregator
used, the per-loss gradient norms and their cosines, the number of conflicting pairs, the
aggregator's weights, the update's inner product with each loss gradient (and whether it
increases some loss) and the engine that ran. All of it comes from the Gramian that a Gramian
aggregator computes anyway; nothing is computed while no hook is registered.

This example logs the records of a multi-task run on digits (see :doc:`plot_multitask_digits`)
to TensorBoard when the ``tensorboard`` package is installed, else to a CSV file, and plots them.
"""

import csv
import os
import tempfile

import matplotlib.pyplot as plt
import torch
from _digits import QUICK, TASKS, MultiTaskNet, load, task_losses
from tqdm import tqdm

from jdoptim import JacobianOptimizer
from jdoptim.aggregation import UPGrad

STEPS = 6 if QUICK else 600
log_dir = os.environ.get("JDOPTIM_LOG_DIR") or tempfile.mkdtemp(prefix="jdoptim-monitoring-")

try:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir)
except ImportError:  # no tensorboard: one CSV row per step
    writer = None
    csv_file = open(os.path.join(log_dir, "steps.csv"), "w", newline="")  # noqa: SIM115
    rows = csv.writer(csv_file)
    rows.writerow(
        ["step", "engine", "conflicting_pairs", "update_conflicts"]
        + [f"{what}/{task}" for what in ("loss", "weight", "grad_norm") for task in TASKS]
    )

records = []


def log(opt, record) -> None:
    """The hook: keep the record and write its scalars."""
    step = len(records)
    records.append(record)
    if writer is not None:
        writer.add_scalar("conflicting_pairs", record.conflicting_pairs, step)
        writer.add_scalar("update_conflicts", float(record.update_conflicts), step)
        for k, task in enumerate(TASKS):
            writer.add_scalar(f"loss/{task}", record.losses[k], step)
            writer.add_scalar(f"weight/{task}", record.weights[k], step)
            writer.add_scalar(f"grad_norm/{task}", record.gradient_norms[k], step)
    else:
        values = [*record.losses, *record.weights, *record.gradient_norms]
        rows.writerow(
            [step, record.engine, record.conflicting_pairs, int(record.update_conflicts)]
            + [f"{float(v):.6g}" for v in values]
        )


torch.manual_seed(0)
train_split, _ = load()
model = MultiTaskNet()
adam = torch.optim.Adam(model.parameters(), lr=1e-3)
opt = JacobianOptimizer(adam, UPGrad(), shared_params=model.trunk.parameters())
handle = opt.register_step_record_hook(log)
batches = torch.Generator().manual_seed(0)
for _ in tqdm(range(STEPS), unit="step"):
    idx = torch.randint(len(train_split.x), (128,), generator=batches)
    opt.step(lambda idx=idx: task_losses(model, train_split.x[idx], train_split.y[idx]))
handle.remove()  # stop recording
if writer is not None:
    writer.close()
else:
    csv_file.close()
print(f"logged {len(records)} steps to {log_dir} ({'TensorBoard' if writer else 'CSV'})")
print(
    f"engine: {records[-1].engine}; the update increased some task loss at "
    f"{sum(r.update_conflicts for r in records)} of {len(records)} steps"
)

# %%
# The cosines between the task gradients (on the trunk) at the first and the last step.

fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
for ax, (when, record) in zip(
    axes, [("first step", records[0]), ("last step", records[-1])], strict=True
):
    image = ax.imshow(record.cosine.numpy(), vmin=-1, vmax=1, cmap="RdBu")
    ax.set(title=f"cosines, {when}", xticks=range(len(TASKS)), yticks=range(len(TASKS)))
    ax.set_xticklabels(TASKS, rotation=30, fontsize=7)
    ax.set_yticklabels(TASKS, fontsize=7)
fig.colorbar(image, ax=axes, shrink=0.8)

# %%
# Over training: UPGrad's weight for each task, each task's gradient norm, and the number of
# conflicting task pairs (out of 6).

fig, axes = plt.subplots(1, 3, figsize=(13, 2.8))
weights = torch.stack([r.weights for r in records]).numpy()
norms = torch.stack([r.gradient_norms for r in records]).numpy()
for k, task in enumerate(TASKS):
    axes[0].plot(weights[:, k], label=task)
    axes[1].plot(norms[:, k], label=task)
axes[0].set(title="UPGrad weights", xlabel="step")
axes[1].set(title="gradient norm on the trunk", xlabel="step", yscale="log")
axes[2].plot([r.conflicting_pairs for r in records])
axes[2].set(title="conflicting pairs", xlabel="step")
axes[0].legend(fontsize=7)
fig.tight_layout()
plt.show()
