"""
Mixed precision with a GradScaler
=================================

Under ``torch.autocast`` the forward pass runs in float16 (or bfloat16); a ``GradScaler``
multiplies the losses by a large factor so that small gradients do not underflow in float16, and
skips the steps whose gradients overflow. Jacobian descent uses the two-phase form:
``opt.backward(scaler.scale(losses))`` writes the aggregated ``.grad`` at the scaled level, then
``scaler.step(opt)`` unscales, checks for overflow and steps, and ``scaler.update()`` adapts the
scale. Pass the scaler to the optimizer (``grad_scaler=scaler``): the Jacobian is unscaled before
it is aggregated, so the update is the float32 aggregation for every aggregator.

Runs on a GPU when there is one (float16), else on the CPU (float16 autocast on CPU is slower
than float32: the point here is the API, not the speed). The model is the multi-task network of
:doc:`plot_multitask_digits`.
"""

import matplotlib.pyplot as plt
import torch
from _digits import QUICK, TASKS, MultiTaskNet, load, task_losses
from tqdm import tqdm

from jdoptim import JacobianOptimizer
from jdoptim.aggregation import UPGrad

STEPS = 5 if QUICK else 300
device = "cuda" if torch.cuda.is_available() else "cpu"
train_split, test_split = load()
x_all, y_all = train_split.x.to(device), train_split.y.to(device)


def run(mixed: bool) -> tuple[list[list[float]], list[float]]:
    torch.manual_seed(0)
    model = MultiTaskNet().to(device)
    scaler = torch.amp.GradScaler(device, enabled=mixed)
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt = JacobianOptimizer(
        adam, UPGrad(), shared_params=model.trunk.parameters(), grad_scaler=scaler
    )
    batches = torch.Generator().manual_seed(0)
    losses, scales = [], []
    for _ in tqdm(range(STEPS), desc="float16 autocast" if mixed else "float32", unit="step"):
        idx = torch.randint(len(x_all), (128,), generator=batches).to(device)
        with torch.autocast(device, dtype=torch.float16, enabled=mixed):
            task = task_losses(model, x_all[idx], y_all[idx])
        opt.zero_grad()
        opt.backward(scaler.scale(task))
        scaler.step(opt)  # skipped when the gradients overflowed
        scaler.update()
        losses.append(task.detach().float().cpu().tolist())
        scales.append(scaler.get_scale() if mixed else 1.0)
    return losses, scales


fp32, _ = run(mixed=False)
amp, scales = run(mixed=True)
for k, task in enumerate(TASKS):
    print(f"{task:15s} final train loss: float32 {fp32[-1][k]:.5g}, mixed {amp[-1][k]:.5g}")

# %%
# The task losses of both runs, and the scaler's scale (it halves after each overflow and
# doubles after 2000 steps without one).

fig, axes = plt.subplots(1, len(TASKS) + 1, figsize=(14, 2.6))
for k, ax in enumerate(axes[:-1]):
    ax.plot([row[k] for row in fp32], label="float32")
    ax.plot([row[k] for row in amp], label="float16 autocast", alpha=0.8)
    ax.set(title=TASKS[k], xlabel="step", yscale="log")
axes[0].legend(fontsize=8)
axes[-1].plot(scales)
axes[-1].set(title="GradScaler scale", xlabel="step", yscale="log")
fig.tight_layout()
plt.show()
