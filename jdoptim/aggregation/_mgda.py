"""MGDA: the minimum-norm element of the convex hull of the gradients (Désidéri, 2012)."""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting, check_gramian
from jdoptim.aggregation._hyper import Hyper, delegated


def _check_epsilon(epsilon: float) -> float:
    if not epsilon > 0.0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    return float(epsilon)


def _check_max_iters(max_iters: int) -> int:
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"max_iters must be a positive int, got {max_iters!r}")
    return max_iters


class MGDAWeighting(Weighting):
    r"""The weighting of :class:`MGDA`: ``w = argmin_{w ∈ Δ_m} wᵀ G w`` by Frank–Wolfe.

    Each iteration moves ``w`` towards the vertex ``e_t`` with ``t = argmin (G w)_t`` by the
    exact line-search step ``γ``; it stops when ``γ < epsilon`` or after ``max_iters`` iterations.
    The iterates only depend on ratios of Gramian entries, so the weights are scale-invariant.

    Parameters
    ----------
    epsilon:
        Stop when the Frank–Wolfe step is shorter than this (``> 0``).
    max_iters:
        Maximum number of iterations (``>= 1``).

    Examples
    --------
    >>> import torch
    >>> J = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    >>> MGDAWeighting()(J @ J.T)
    tensor([0.2000, 0.8000], dtype=torch.float64)
    """

    epsilon = Hyper(_check_epsilon)
    max_iters = Hyper(_check_max_iters)

    def __init__(self, epsilon: float = 0.001, max_iters: int = 100) -> None:
        super().__init__()
        self.epsilon = epsilon
        self.max_iters = max_iters

    def forward(self, gramian: Tensor, /) -> Tensor:
        check_gramian(gramian)
        g = gramian.detach().to(torch.float64)
        m = g.shape[0]
        w = torch.full((m,), 1.0 / m, dtype=torch.float64, device=g.device)
        for _ in range(self.max_iters):
            gw = g @ w
            t = int(torch.argmin(gw))
            norm2 = float(w @ gw)  # ‖Jᵀw‖²
            cross = float(gw[t])  # ⟨Jᵀw, J_t⟩
            gap = norm2 - 2.0 * cross + float(g[t, t])  # ‖Jᵀw - J_t‖²
            if gap <= 0.0 or norm2 <= cross:
                break  # Jᵀw is already the minimum-norm point along this direction.
            gamma = min((norm2 - cross) / gap, 1.0)
            w = (1.0 - gamma) * w
            w[t] += gamma
            if gamma < self.epsilon:
                break
        return w.to(gramian.dtype)

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}, max_iters={self.max_iters}"


class MGDA(GramianWeightedAggregator):
    r"""The minimum-norm point of the convex hull of the rows of ``J``.

    *Multiple-gradient descent algorithm (MGDA) for multiobjective optimization*, Désidéri, 2012
    (https://doi.org/10.1016/j.crma.2012.03.014), solved by Frank–Wolfe on the Gramian as in Sener &
    Koltun, NeurIPS 2018 (https://arxiv.org/abs/1810.04650):

    .. math::

        \mathcal A(J) = Jᵀ w, \qquad w = \operatorname*{argmin}_{w \ge 0,\ \mathbf 1ᵀw = 1}
        \lVert Jᵀ w \rVert^2.

    Properties: non-conflicting at convergence, positively homogeneous, permutation invariant up to
    ties in the Frank–Wolfe vertex choice, Gramian-only, stateless, deterministic. The update
    vanishes as soon as ``0`` lies in the convex hull of the rows.

    Examples
    --------
    >>> import torch
    >>> from jdoptim.aggregation import MGDA
    >>> J = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    >>> MGDA()(J)
    tensor([0.4000, 0.8000], dtype=torch.float64)
    """

    def __init__(self, epsilon: float = 0.001, max_iters: int = 100) -> None:
        super().__init__(MGDAWeighting(epsilon, max_iters))

    epsilon = delegated("epsilon")
    max_iters = delegated("max_iters")
