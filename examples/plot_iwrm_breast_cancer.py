"""
Instance-wise risk minimisation on breast cancer
================================================

Empirical risk minimisation averages the per-sample losses of a batch and steps along the
gradient of that mean. Instance-wise risk minimisation (IWRM) keeps one loss per sample and
applies Jacobian descent to them: with :class:`~jdoptim.aggregation.UPGrad`, no sample's loss
increases to first order.

``batch_dim=0`` declares that loss ``i`` depends only on sample ``i``: the per-sample engine then
gets the Gramian of the per-sample gradients from one forward and one backward pass (closed forms
for ``nn.Linear``), without forming the Jacobian. The data are scikit-learn's breast-cancer
diagnoses (569 samples, 30 features, shipped with scikit-learn).
"""

import os

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm import tqdm

from jdoptim import JacobianOptimizer
from jdoptim.aggregation import Mean, UPGrad
from jdoptim.diagnostics import StepRecorder

QUICK = os.environ.get("JDOPTIM_QUICK") == "1"
STEPS, BATCH = (6, 16) if QUICK else (400, 32)

data = load_breast_cancer()
x_train, x_test, y_train, y_test = train_test_split(
    data.data, data.target, test_size=0.3, random_state=0, stratify=data.target
)
mean, std = x_train.mean(0), x_train.std(0)
x_train, x_test = (torch.tensor((a - mean) / std, dtype=torch.float32) for a in (x_train, x_test))
y_train, y_test = (torch.tensor(a, dtype=torch.float32) for a in (y_train, y_test))

# %%
# The model and one training run. ``Mean()`` gives the ERM update (the gradient of the mean
# loss) through the same optimizer, so both runs are recorded alike.


def per_sample_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x).squeeze(1)
    return nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")


def run(aggregator, seed: int = 0) -> dict[str, list[float]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(30, 16), nn.Tanh(), nn.Linear(16, 1))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = JacobianOptimizer(sgd, aggregator, batch_dim=0)
    recorder = StepRecorder(opt)
    batches = torch.Generator().manual_seed(seed)
    history = {"train loss": [], "worst train loss": [], "conflicting pairs": [], "accuracy": []}
    for _ in tqdm(range(STEPS), desc=type(aggregator).__name__, unit="step"):
        idx = torch.randperm(len(x_train), generator=batches)[:BATCH]

        def closure(idx: torch.Tensor = idx) -> torch.Tensor:
            opt.zero_grad()
            return per_sample_losses(model, x_train[idx], y_train[idx])

        opt.step(closure)
        record = recorder.last
        pairs = BATCH * (BATCH - 1) // 2
        history["conflicting pairs"].append(record.conflicting_pairs / pairs)
        with torch.no_grad():
            losses = per_sample_losses(model, x_train, y_train)
            history["train loss"].append(losses.mean().item())
            history["worst train loss"].append(losses.max().item())
            correct = (model(x_test).squeeze(1) > 0).float() == y_test
            history["accuracy"].append(correct.float().mean().item())
    return history


histories = {"ERM (mean)": run(Mean()), "IWRM (UPGrad)": run(UPGrad())}
for name, h in histories.items():
    print(
        f"{name:14s} test accuracy {h['accuracy'][-1]:.3f}, mean train loss "
        f"{h['train loss'][-1]:.4f}, worst train loss {h['worst train loss'][-1]:.3f}"
    )

# %%
# Training curves, and the fraction of sample pairs in each batch whose gradients conflict.

fig, axes = plt.subplots(1, 4, figsize=(13, 2.8))
for ax, key in zip(
    axes, ["train loss", "worst train loss", "accuracy", "conflicting pairs"], strict=True
):
    for name, h in histories.items():
        ax.plot(h[key], label=name, alpha=0.85)
    ax.set(title=key if key != "accuracy" else "test accuracy", xlabel="step")
axes[1].set_yscale("log")
axes[0].set_yscale("log")
axes[0].legend()
fig.tight_layout()
plt.show()
