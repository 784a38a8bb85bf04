r"""
How aggregators combine two conflicting gradients
=================================================

Two losses whose gradients :math:`g_1, g_2` point away from each other (their inner product is
negative). Summing them gives a direction along which one of the losses *increases*. Each
aggregator turns the Jacobian :math:`J = [g_1; g_2]` into one update :math:`d`; a
non-conflicting one keeps :math:`J d \ge 0`, so neither loss increases for a small step.

This example draws the updates of a few aggregators and prints :math:`J d` for each.
"""

import matplotlib.pyplot as plt
import torch

from jdoptim.aggregation import MGDA, DualProj, Mean, PCGrad, UPGrad

J = torch.tensor([[1.6, 0.0], [-1.2, 0.5]], dtype=torch.float64)
aggregators = {
    "Mean": Mean(),
    "UPGrad": UPGrad(),
    "DualProj": DualProj(),
    "MGDA": MGDA(),
    "PCGrad": PCGrad(seed=0),
}

# %%
# Each update :math:`d`, and :math:`J d`: the rate at which each loss decreases along a step
# :math:`-\eta d`. A negative entry means that loss increases.

updates = {name: aggregator(J) for name, aggregator in aggregators.items()}
for name, d in updates.items():
    print(f"{name:8s} d = {d.numpy().round(3) + 0.0}   J d = {(J @ d).numpy().round(3) + 0.0}")

# %%
# The picture: the two gradients (black), the dual cone :math:`\{x : J x \ge 0\}` of the
# directions that conflict with neither (shaded), and each aggregator's update (red). An update
# outside the shaded cone increases one of the losses.

edges = torch.linalg.inv(J)  # {x : J x >= 0} = {J^-1 y : y >= 0}: spanned by J^-1's columns
edges = 1.6 * edges / edges.norm(dim=0)
fig, axes = plt.subplots(1, len(updates), figsize=(2.6 * len(updates), 2.3), sharey=True)
for ax, (name, d) in zip(axes, updates.items(), strict=True):
    ax.fill([0, edges[0, 0], edges[0, 1]], [0, edges[1, 0], edges[1, 1]], color="0.88")
    for i, g in enumerate(J):
        ax.annotate("", xy=g.tolist(), xytext=(0, 0), arrowprops={"arrowstyle": "->", "lw": 1.5})
        ax.text(*(g * 1.1).tolist(), f"$g_{i + 1}$", ha="center", va="center")
    ax.annotate(
        "", xy=d.tolist(), xytext=(0, 0), arrowprops={"arrowstyle": "->", "lw": 2.5, "color": "C3"}
    )
    conflict = bool(((J @ d) < -1e-12).any())
    ax.set_title(f"{name}\n{'conflicts' if conflict else 'no conflict'}", fontsize=10)
    ax.set_aspect("equal")
    ax.set_xlim(-1.5, 1.9)
    ax.set_ylim(-0.2, 1.5)
    ax.set_xticks([])
    ax.set_yticks([])
fig.tight_layout()
plt.show()
