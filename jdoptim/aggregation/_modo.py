"""MoDo: multi-objective gradient descent with double sampling (Chen et al., 2023)."""

from __future__ import annotations

import math

from torch import Tensor

from jdoptim.aggregation._double_sampling import DoubleSamplingWeighting
from jdoptim.aggregation._hyper import Hyper
from jdoptim.linalg._simplex import _project_simplex


def _check_gamma(gamma: float) -> float:
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be a positive finite number, got {gamma!r}")
    return float(gamma)


def _check_rho(rho: float) -> float:
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho >= 0):
        raise ValueError(f"rho must be a non-negative finite number, got {rho!r}")
    return float(rho)


class MoDoWeighting(DoubleSamplingWeighting):
    r"""One projected stochastic-gradient step on the MGDA weights per call, with double sampling.

    *Three-Way Trade-Off in Multi-Objective Learning: Optimization, Generalization and
    Conflict-Avoidance*, Chen, Fernando, Ying & Chen, NeurIPS 2023
    (https://arxiv.org/abs/2305.20057). The weights ``λ`` (state, uniform at the start) track the
    minimiser of ``½‖Jᵀλ‖² + ½ρ‖λ‖²`` over the simplex ``Δ``; each call makes one step

    .. math::

        λ \leftarrow Π_Δ\big(λ - γ\,(J_1 J_2ᵀ λ + ρ λ)\big)

    with the cross-Gramian ``J₁J₂ᵀ`` of two independent mini-batches (unbiased for
    ``E[J] E[J]ᵀ``), and returns the new ``λ``. Called on a Gramian ``J Jᵀ`` it is the one-batch
    variant. ``Π_Δ`` is the exact sort-based projection of Duchi et al., 2008
    (:func:`~jdoptim.linalg.project_simplex`). Feed two batches with
    :func:`~jdoptim.aggregation.jac_pair_to_grad`; in a
    :class:`~jdoptim.JacobianOptimizer` use ``GramianWeightedAggregator(MoDoWeighting())``.

    Properties: stateful (``λ``; ``reset()`` returns to uniform, a change of ``m`` restarts from
    uniform), deterministic, Gramian-only, weights on the simplex. Not positively homogeneous:
    ``γ`` is in units of ``1/‖g‖²``, as in the paper (``A(sJ)`` takes a step ``s²`` times longer).
    Permutation invariant from a fresh (uniform) state; afterwards only when ``J`` and the stored
    ``λ`` are permuted together. Not non-conflicting.

    Parameters
    ----------
    gamma:
        The step size ``γ > 0`` of the weights.
    rho:
        The regularisation ``ρ >= 0`` of the weights' subproblem.

    Examples
    --------
    >>> import torch
    >>> J = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    >>> weighting = MoDoWeighting(gamma=0.1, rho=0.1)
    >>> weighting(J @ J.T)  # Π_Δ([0.5, 0.5] - 0.1 ([2, 0.5] + [0.05, 0.05]))
    tensor([0.4250, 0.5750], dtype=torch.float64)
    >>> weighting(J @ J.T)  # a second step from the stored λ
    tensor([0.3695, 0.6305], dtype=torch.float64)
    """

    gamma = Hyper(_check_gamma)
    rho = Hyper(_check_rho)

    def __init__(self, gamma: float = 0.1, rho: float = 0.1) -> None:
        super().__init__()
        self.gamma = gamma
        self.rho = rho

    def weights_from_cross_gramian(self, cross_gramian: Tensor) -> Tensor:
        lam = self._start(cross_gramian)
        c = cross_gramian.detach().to(lam.dtype)
        lam = _project_simplex(lam - self.gamma * (c @ lam + self.rho * lam))
        self._lambda = lam
        return lam.to(cross_gramian.dtype)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, rho={self.rho}"
