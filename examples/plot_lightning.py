"""
Training with PyTorch Lightning
===============================

Jacobian descent needs the vector of losses, so the LightningModule uses manual optimisation
(``self.automatic_optimization = False``) and returns a :class:`~jdoptim.JacobianOptimizer`
from ``configure_optimizers``. Two forms work inside ``training_step``:

* the closure form, ``opt.step(closure=...)`` with a closure that returns the losses;
* the two-phase form, ``opt.optimizer.backward(losses)`` (``self.optimizers()`` is Lightning's
  wrapper; ``.optimizer`` is ours), then for instance ``self.clip_gradients(...)``, then
  ``opt.step()``.

Both advance ``trainer.global_step``; ``precision="bf16-mixed"`` works with both. Lightning calls
``on_before_optimizer_step`` right after the closure, that is before the aggregation: inspect
the aggregated ``.grad`` in a step record hook instead (see :doc:`plot_monitoring`). The model is
the multi-task network of :doc:`plot_multitask_digits`; Lightning draws its own (tqdm) progress
bar.
"""

import lightning.pytorch as pl
import matplotlib.pyplot as plt
import torch
from _digits import QUICK, TASKS, MultiTaskNet, load, task_losses

from jdoptim import JacobianOptimizer
from jdoptim.aggregation import UPGrad


class MultiTask(pl.LightningModule):
    def __init__(self, two_phase: bool) -> None:
        super().__init__()
        self.automatic_optimization = False  # we step ourselves, with the vector of losses
        self.model, self.two_phase = MultiTaskNet(), two_phase
        self.history: list[list[float]] = []

    def configure_optimizers(self):
        adam = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        return JacobianOptimizer(adam, UPGrad(), shared_params=self.model.trunk.parameters())

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        if self.two_phase:
            opt.zero_grad()
            losses = task_losses(self.model, x, y)
            opt.optimizer.backward(losses)  # writes the aggregated .grad
            self.clip_gradients(opt, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
            opt.step()
        else:

            def closure():
                opt.zero_grad()
                return task_losses(self.model, x, y)

            losses = opt.step(closure=closure)
        self.history.append(losses.detach().float().tolist())
        self.log("digit_loss", losses[0], prog_bar=True)


train_split, _ = load()
loader = torch.utils.data.DataLoader(
    torch.utils.data.TensorDataset(train_split.x, train_split.y), batch_size=128, shuffle=True
)
modules = {}
for two_phase in (False, True):
    torch.manual_seed(0)
    module = MultiTask(two_phase)
    trainer = pl.Trainer(
        max_steps=5 if QUICK else 300,
        accelerator="cpu",
        precision="bf16-mixed",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    name = "two-phase, clipped" if two_phase else "closure"
    print(f"{name}: global_step = {trainer.global_step}")
    modules[name] = module

# %%
# The task losses seen by each step (bf16 autocast), for both forms.

fig, axes = plt.subplots(1, len(TASKS), figsize=(12, 2.6))
for k, ax in enumerate(axes):
    for name, module in modules.items():
        ax.plot([h[k] for h in module.history], label=name, alpha=0.85)
    ax.set(title=TASKS[k], xlabel="step", yscale="log")
axes[0].legend(fontsize=8)
fig.tight_layout()
plt.show()
