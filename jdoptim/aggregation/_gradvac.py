"""GradVac: gradient vaccine, adaptive targets of gradient similarity (Wang et al., ICLR 2021)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting, check_gramian
from jdoptim.aggregation._hyper import Hyper, delegated
from jdoptim.aggregation._pcgrad import random_orders
from jdoptim.aggregation._random import RandomState, check_state_keys


def _check_unit(name: str, value: float, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")
    return float(value)


class GradVacWeighting(Weighting):
    r"""The weighting of :class:`GradVac`, computed from the Gramian ``G = J Jᵀ``.

    As in :class:`~jdoptim.aggregation.PCGradWeighting`, each modified gradient is tracked by its
    coefficients ``g_i' = Jᵀ c_i``, so that ``⟨g_i', g_j⟩ = (G c_i)_j``, ``‖g_i'‖² = c_iᵀ G c_i``
    and ``‖g_j‖² = G_jj``; the weights are ``Σ_i c_i``. The targets ``\hat φ`` (``[m, m]``, float64)
    are created at the first call (zeros) and are part of its extra state (``None`` before it).

    Parameters
    ----------
    beta:
        The EMA rate ``β ∈ [0, 1]`` of the targets.
    eps:
        Added to ``sqrt(1 - \hat φ²)`` in the denominator (``>= 0``, dimensionless).
    seed:
        Seed of the generator of the orders (``None``: drawn from torch's global generator).

    Examples
    --------
    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    >>> weighting = GradVacWeighting(beta=0.5, eps=0.0, seed=0)
    >>> weighting(J @ J.T)  # zero targets: PCGrad's projections
    tensor([2.0000, 1.5000], dtype=torch.float64)
    >>> weighting.get_extra_state()["targets"]  # (1 - β)·0 + β·cos(g_1, g_2)
    tensor([[ 0.0000, -0.3536],
            [-0.3536,  0.0000]], dtype=torch.float64)
    """

    beta = Hyper(lambda value: _check_unit("beta", value, 0.0, 1.0))
    eps = Hyper(lambda value: _check_unit("eps", value, 0.0, math.inf))

    def __init__(self, beta: float = 0.5, eps: float = 1e-8, seed: int | None = None) -> None:
        super().__init__()
        self.beta = beta
        self.eps = eps
        self._rng = RandomState(seed)
        self._targets: Tensor | None = None

    def _current_targets(self, m: int, device: torch.device) -> Tensor:
        if self._targets is None:
            return torch.zeros((m, m), dtype=torch.float64, device=device)
        if self._targets.shape != (m, m):
            raise ValueError(
                f"GradVac's targets are for {self._targets.shape[0]} tasks but got {m} rows; "
                "call reset() to start over with a different number of tasks"
            )
        return self._targets.to(device=device, dtype=torch.float64).clone()

    def forward(self, gramian: Tensor, /) -> Tensor:
        check_gramian(gramian)
        m = gramian.shape[0]
        targets = self._current_targets(m, gramian.device)
        orders = random_orders(m, self._rng.generator).to(gramian.device)
        g = gramian.detach().to(torch.float64)
        g = (g + g.T) / 2
        diagonal = torch.diagonal(g)
        coefficients = torch.eye(m, dtype=torch.float64, device=g.device)
        products = g.clone()  # row i: G c_i
        rows = torch.arange(m, device=g.device)
        for step in range(m - 1):
            j = orders[:, step]
            inner = products[rows, j]  # ⟨g_i', g_j⟩
            norm2_i = (products * coefficients).sum(dim=1).clamp_min(0.0)  # ‖g_i'‖²
            norm2_j = diagonal[j]
            # The cosine of a pair with a zero vector is undefined: such a pair is left alone.
            valid = (norm2_i > 0) & (norm2_j > 0)
            denominator = torch.sqrt(torch.where(valid, norm2_i * norm2_j, 1.0))
            phi = (inner / denominator).clamp(-1.0, 1.0)
            target = targets[rows, j]
            sin_phi, sin_target = torch.sqrt(1 - phi**2), torch.sqrt(1 - target**2)
            ratio = torch.sqrt(torch.where(valid, norm2_i / norm2_j.clamp_min(1e-300), 0.0))
            weight = ratio * (target * sin_phi - phi * sin_target) / (sin_target + self.eps)
            weight = torch.where(valid & (phi < target), weight, 0.0)
            coefficients[rows, j] += weight
            products += weight[:, None] * g.index_select(0, j)
            moved = (1 - self.beta) * target + self.beta * phi
            targets[rows, j] = torch.where(valid, moved, target)
        self._targets = targets
        return coefficients.sum(dim=0).to(gramian.dtype)

    def get_extra_state(self) -> dict[str, Any]:
        targets = None if self._targets is None else self._targets.clone()
        return {"targets": targets, "rng": self._rng.state_dict()}

    def set_extra_state(self, state_dict: dict[str, Any]) -> None:
        check_state_keys(state_dict, {"targets", "rng"}, type(self).__name__)
        targets = state_dict["targets"]
        if targets is not None and (
            not isinstance(targets, Tensor)
            or targets.ndim != 2
            or targets.shape[0] != targets.shape[1]
        ):
            raise ValueError(f"expected None or a square matrix for 'targets', got {targets!r}")
        self._rng.load_state_dict(state_dict["rng"])
        self._targets = None if targets is None else targets.detach().to(torch.float64).clone()

    def reset(self) -> None:
        self._targets = None
        self._rng.reset()

    def extra_repr(self) -> str:
        return f"beta={self.beta}, eps={self.eps}, seed={self._rng.seed}"


class GradVac(GramianWeightedAggregator):
    r"""Move each gradient towards an adaptive target cosine with each other gradient, then sum.

    *Gradient Vaccine: Investigating and Improving Multi-task Optimization in Massively
    Multilingual Models*, Wang, Tsvetkov, Firat & Cao, ICLR 2021
    (https://arxiv.org/abs/2010.05874), Algorithm 2. For each task ``i``, from ``g_i' = g_i`` and
    for every other task ``j`` in a random order, with ``φ = cos(g_i', g_j)`` and the target
    ``\hat φ_{ij}`` (an EMA over steps, ``0`` at first):

    .. math::

        g_i' \leftarrow g_i' + \frac{\lVert g_i' \rVert\,\big(\hat φ_{ij} \sqrt{1 - φ^2}
            - φ \sqrt{1 - \hat φ_{ij}^2}\big)}{\lVert g_j \rVert
            \big(\sqrt{1 - \hat φ_{ij}^2} + ε\big)}\, g_j \quad \text{if } φ < \hat φ_{ij},
        \qquad \hat φ_{ij} \leftarrow (1 - β)\, \hat φ_{ij} + β φ,

    and ``A(J) = Σ_i g_i'``. With ``ε = 0`` the step sets ``cos(g_i', g_j) = \hat φ_{ij}``; with
    zero targets (the first step) it is PCGrad's projection. ``ε`` only guards the dimensionless
    ``sqrt(1 - \hat φ²)`` (targets near 1), never a norm, so it changes nothing at any gradient
    scale; a pair with a zero gradient (undefined cosine) is skipped and its target kept.

    Properties: stateful (the targets, allocated at the first call and saved by ``state_dict`` even
    before it, so a fresh instance loads them; ``reset()`` clears them and re-seeds), random (the
    orders, as in PCGrad), positively homogeneous for a given state and draws (cosines and norm
    ratios are scale-free), Gramian-only. Not non-conflicting, not permutation invariant for a
    given seed, not linear. The number of rows must stay the same between ``reset()`` calls.

    Parameters
    ----------
    beta:
        The EMA rate ``β ∈ [0, 1]`` of the targets.
    eps:
        ``ε >= 0``, added to ``sqrt(1 - \hat φ²)`` in the denominator.
    seed:
        Seed of the generator of the orders (``None``: drawn from torch's global generator).

    Examples
    --------
    >>> import torch
    >>> from jdoptim.aggregation import GradVac
    >>> J = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    >>> aggregator = GradVac(beta=1.0, eps=0.0, seed=0)
    >>> aggregator(J)  # no conflict: the sum; the targets become cos(g_1, g_2) = 0.7071
    tensor([2., 1.], dtype=torch.float64)
    >>> aggregator(torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    tensor([2., 2.], dtype=torch.float64)
    """

    beta = delegated("beta")
    eps = delegated("eps")

    def __init__(self, beta: float = 0.5, eps: float = 1e-8, seed: int | None = None) -> None:
        super().__init__(GradVacWeighting(beta, eps, seed))
