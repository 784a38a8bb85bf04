"""
Gradient accumulation
=====================

A batch too large for memory is split into micro-batches. With plain gradients one calls
``loss.backward()`` on each and steps once. Jacobian descent cannot sum aggregated updates (the
aggregation of a sum of Jacobians is not the sum of the aggregations), so
``opt.backward(losses, accumulate=True)`` keeps each micro-batch's Jacobian instead; the last
micro-batch goes through ``opt.step(closure)`` (or ``opt.backward(losses)``), which combines them
and aggregates once. With task losses averaged over samples (the default ``cross_rank="mean"``),
``k`` micro-batches of the same size give exactly the step of the whole batch.

The model is the multi-task network of :doc:`plot_multitask_digits` (four tasks on digits, a
shared trunk).
"""

import matplotlib.pyplot as plt
import torch
from _digits import QUICK, TASKS, MultiTaskNet, load, task_losses, test_metrics
from tqdm import tqdm

from jdoptim import JacobianOptimizer
from jdoptim.aggregation import UPGrad

STEPS, BATCH, MICRO = (4, 64, 4) if QUICK else (300, 256, 4)
train_split, test_split = load()


def make(seed: int = 0) -> tuple[MultiTaskNet, JacobianOptimizer]:
    torch.manual_seed(seed)
    model = MultiTaskNet()
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    return model, JacobianOptimizer(adam, UPGrad(), shared_params=model.trunk.parameters())


def accumulated_step(model, opt, x, y) -> torch.Tensor:
    """One step on ``x, y`` split into ``MICRO`` micro-batches."""
    xs, ys = x.chunk(MICRO), y.chunk(MICRO)
    opt.zero_grad()
    for xm, ym in zip(xs[:-1], ys[:-1], strict=True):
        opt.backward(task_losses(model, xm, ym), accumulate=True)  # kept, nothing written yet
    return opt.step(lambda: task_losses(model, xs[-1], ys[-1]))  # combines and aggregates


# %%
# The accumulated step equals the step on the whole batch (up to float32 rounding).

x, y = train_split.x[:BATCH], train_split.y[:BATCH]
whole, whole_opt = make()
whole_opt.step(lambda: task_losses(whole, x, y))
split, split_opt = make()
accumulated_step(split, split_opt, x, y)
difference = max(
    (p - q).abs().max().item() for p, q in zip(whole.parameters(), split.parameters(), strict=True)
)
print(f"largest parameter difference after one step: {difference:.2e}")

# %%
# Training with accumulation: the test metric of each task.

model, opt = make()
batches = torch.Generator().manual_seed(0)
curves = []
for _ in tqdm(range(STEPS), desc=f"{MICRO} micro-batches per step", unit="step"):
    idx = torch.randint(len(train_split.x), (BATCH,), generator=batches)
    accumulated_step(model, opt, train_split.x[idx], train_split.y[idx])
    curves.append(test_metrics(model, test_split))

fig, axes = plt.subplots(1, len(TASKS), figsize=(12, 2.6))
for k, ax in enumerate(axes):
    ax.plot([c[k] for c in curves])
    ax.set(title=TASKS[k], xlabel="step")
fig.tight_layout()
plt.show()
