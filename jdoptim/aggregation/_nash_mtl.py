"""Nash-MTL: the Nash bargaining solution of the tasks (Navon et al., ICML 2022)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting, check_gramian
from jdoptim.aggregation._fairgrad import solve_fair_weights
from jdoptim.aggregation._hyper import Hyper, delegated
from jdoptim.aggregation._random import check_state_keys


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _check_max_norm(max_norm: float) -> float:
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)):
        raise TypeError(f"max_norm must be a number, got {type(max_norm).__name__}")
    if not (math.isfinite(max_norm) and max_norm >= 0.0):
        raise ValueError(f"max_norm must be finite and >= 0 (0 disables it), got {max_norm!r}")
    return float(max_norm)


class NashMTLWeighting(Weighting):
    r"""The weighting of :class:`NashMTL`: ``w > 0`` with ``(\hat G w)_i\, w_i = 1``.

    ``\hat G = G / \lVert G \rVert_F`` as in the published implementation, so the weights do not
    depend on the scale of ``J``. Solved natively (no cvxpy) by damped Newton steps on the strictly
    convex ``½ wᵀ\hat G w - Σ_i \log w_i`` (see :func:`~jdoptim.aggregation._fairgrad.
    solve_fair_weights`), warm-started from the previous weights. The weights are recomputed every
    ``update_weights_every`` calls and reused in between; then, when ``max_norm > 0``, they are
    scaled down so that ``‖Jᵀw‖ = \sqrt{wᵀGw} <= max_norm``.

    State (allocated eagerly): ``step`` (calls so far) and ``weights`` (the last unclipped
    weights, initially ones as in the published code). ``reset()`` restores both.

    Examples
    --------
    >>> import torch
    >>> G = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)  # ‖G‖_F = 5
    >>> NashMTLWeighting(n_tasks=2, max_norm=0.0)(G)  # w_i² G_ii / 5 = 1
    tensor([1.2910, 1.1180], dtype=torch.float64)
    """

    max_norm = Hyper(_check_max_norm)
    update_weights_every = Hyper(lambda value: _positive_int("update_weights_every", value))
    optim_niter = Hyper(lambda value: _positive_int("optim_niter", value))

    def __init__(
        self,
        n_tasks: int,
        max_norm: float = 1.0,
        update_weights_every: int = 1,
        optim_niter: int = 20,
    ) -> None:
        super().__init__()
        self.n_tasks = _positive_int("n_tasks", n_tasks)  # the state's size: fixed
        self.max_norm = max_norm
        self.update_weights_every = update_weights_every
        self.optim_niter = optim_niter
        self.reset()

    def forward(self, gramian: Tensor, /) -> Tensor:
        check_gramian(gramian)
        m = gramian.shape[0]
        if m != self.n_tasks:
            raise ValueError(f"NashMTL was built for n_tasks={self.n_tasks}, got {m} rows")
        g = gramian.detach().to(torch.float64)
        if self._step % self.update_weights_every == 0:
            norm = float(torch.linalg.matrix_norm(g))
            if norm > 0.0:
                eps = torch.finfo(gramian.dtype).eps
                start = self._weights.to(g.device)
                self._weights = solve_fair_weights(g / norm, 1.0, start, self.optim_niter, eps)
        self._step += 1
        weights = self._weights.to(g.device)
        if self.max_norm > 0.0:
            update_norm = max(float(weights @ g @ weights), 0.0) ** 0.5
            if update_norm > self.max_norm:
                weights = weights * (self.max_norm / update_norm)
        return weights.to(gramian.dtype)

    def get_extra_state(self) -> dict[str, Any]:
        return {"step": self._step, "weights": self._weights.clone()}

    def set_extra_state(self, state_dict: dict[str, Any]) -> None:
        check_state_keys(state_dict, {"step", "weights"}, type(self).__name__)
        step, weights = state_dict["step"], state_dict["weights"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"expected a non-negative int for 'step', got {step!r}")
        if not isinstance(weights, Tensor) or weights.shape != (self.n_tasks,):
            raise ValueError(f"expected a tensor of shape ({self.n_tasks},) for 'weights'")
        self._step = step
        self._weights = weights.detach().to(torch.float64).clone()

    def reset(self) -> None:
        self._step = 0
        self._weights = torch.ones(self.n_tasks, dtype=torch.float64)

    def extra_repr(self) -> str:
        return (
            f"n_tasks={self.n_tasks}, max_norm={self.max_norm}, "
            f"update_weights_every={self.update_weights_every}, optim_niter={self.optim_niter}"
        )


class NashMTL(GramianWeightedAggregator):
    r"""*Multi-Task Learning as a Bargaining Game*, Navon et al., ICML 2022.

    https://arxiv.org/abs/2202.01017. The update is the Nash bargaining solution of the tasks:
    ``d = Jᵀw`` maximises ``Σ_i \log(g_iᵀd)`` in a ball, whose stationarity condition is

    .. math::

        \mathcal A(J) = Jᵀ w, \qquad w_i\, (\hat G w)_i = 1\ \ \forall i, \quad w > 0,
        \qquad \hat G = J Jᵀ / \lVert J Jᵀ \rVert_F,

    then clipped to norm ``max_norm``. The published implementation solves a sequence of convex
    programs with cvxpy; here the same fixed point is the minimiser of a strictly convex function,
    found by ``optim_niter`` damped Newton steps (no new dependency). When no direction improves
    every task (``0`` in the convex hull of the rows) the bargaining problem has no solution: the
    weights of the blocking rows then grow along a null direction of ``Jᵀ`` (which leaves ``Jᵀw``
    finite) until the iterations stop; numerically zero rows get weight 0.

    Properties: non-conflicting at convergence (``J d ∝ 1/w > 0``), permutation invariant (from a
    fresh state), Gramian-only, deterministic; stateful (warm start, step counter,
    ``update_weights_every``). Positively homogeneous only with ``max_norm=0`` (the weights are
    scale-invariant; clipping is not).

    Parameters
    ----------
    n_tasks:
        The number of rows ``m`` of every Jacobian.
    max_norm:
        Clip ``‖Jᵀw‖`` to this value; ``0`` disables clipping.
    update_weights_every:
        Recompute the weights every this many calls; reuse them in between.
    optim_niter:
        Newton iterations per recomputation (the solver stops earlier once converged).

    Examples
    --------
    >>> import torch
    >>> from jdoptim.aggregation import NashMTL
    >>> J = torch.tensor([3.0, 4.0], dtype=torch.float64).sqrt().diag()  # G = diag(3, 4)
    >>> NashMTL(n_tasks=2, max_norm=0.0)(J)  # w_i = (5 / G_ii)^{1/2}
    tensor([2.2361, 2.2361], dtype=torch.float64)
    >>> NashMTL(n_tasks=2)(J)  # clipped to norm 1
    tensor([0.7071, 0.7071], dtype=torch.float64)
    """

    def __init__(
        self,
        n_tasks: int,
        max_norm: float = 1.0,
        update_weights_every: int = 1,
        optim_niter: int = 20,
    ) -> None:
        super().__init__(NashMTLWeighting(n_tasks, max_norm, update_weights_every, optim_niter))

    max_norm = delegated("max_norm")
    update_weights_every = delegated("update_weights_every")
    optim_niter = delegated("optim_niter")

    @property
    def n_tasks(self) -> int:
        """The number of tasks the state is sized for (fixed at construction)."""
        return self.gramian_weighting.n_tasks
