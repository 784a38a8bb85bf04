"""SDMGrad: stochastic direction-oriented multi-objective gradient descent (Xiao et al., 2023)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from jdoptim.aggregation._double_sampling import DoubleSamplingWeighting
from jdoptim.aggregation._hyper import Hyper
from jdoptim.aggregation._pref import check_pref_vector, pref_repr, pref_weights
from jdoptim.linalg._simplex import _project_simplex


def _check_number(name: str, value: float, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{name} must be finite and in [{low}, {high}], got {value!r}")
    return float(value)


def _check_lr(lr: float) -> float:
    lr = _check_number("lr", lr, 0.0)
    if lr == 0.0:
        raise ValueError("lr must be positive, got 0.0")
    return lr


def _check_momentum(momentum: float) -> float:
    momentum = _check_number("momentum", momentum, 0.0, 1.0)
    if momentum == 1.0:
        raise ValueError("momentum must be < 1, got 1.0")
    return momentum


def _check_n_iter(n_iter: int) -> int:
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter must be a positive int, got {n_iter!r}")
    return n_iter


class SDMGradWeighting(DoubleSamplingWeighting):
    r"""MGDA weights pulled towards a preferred direction, by projected momentum steps.

    *Direction-oriented Multi-objective Learning: Simple and Provable Stochastic Algorithms*,
    Xiao, Ban & Ji, NeurIPS 2023 (https://arxiv.org/abs/2305.18409). With ``ω = pref_vector``
    (``1/m`` by default, so ``Jᵀω`` is the average gradient) and ``λ = lambda_``, the weights
    ``w`` (state, warm-started across calls) approximately solve

    .. math::

        \min_{w \in Δ} \tfrac12 \lVert Jᵀ w + λ\, Jᵀ ω \rVert^2
        \quad\text{with the stochastic gradient}\quad C\,(w + λ ω), \quad C = J_1 J_2ᵀ,

    by ``n_iter`` heavy-ball steps ``v ← μ v + C(w + λω)``, ``w ← Π_Δ(w - lr · v)`` (``μ =
    momentum``, ``v = 0`` at each call, ``Π_Δ`` the exact sort-based projection). ``C`` is first
    divided by ``(mean_i sqrt|C_ii|)²`` (the squared mean gradient norm when ``C = JJᵀ``), so
    ``lr`` is scale-free, as in the authors' implementation (without its absolute ``1e-4``
    inside the square root). The returned weights are

    .. math::

        \frac{w + λ ω}{1 + λ}, \qquad \mathcal A(J) = Jᵀ\, \frac{w + λω}{1 + λ}.

    ``C`` is the cross-Gramian of two independent mini-batches (double sampling; feed them with
    :func:`~jdoptim.aggregation.jac_pair_to_grad`) or, with one batch, the Gramian ``J Jᵀ``
    (``GramianWeightedAggregator(SDMGradWeighting())`` in a :class:`~jdoptim.JacobianOptimizer`).

    Properties: stateful (``w``; ``reset()`` returns to uniform, a change of ``m`` restarts from
    uniform), deterministic, Gramian-only; the weights are scale-invariant, so the aggregator is
    positively homogeneous given the same state. Permutation invariant from a fresh (uniform)
    state with the default ``pref_vector``; otherwise only when ``J``, the stored ``w`` and ``ω``
    are permuted together. Not non-conflicting.

    Parameters
    ----------
    lr:
        Step size of the inner loop (``> 0``), on the normalised ``C``.
    momentum:
        Heavy-ball momentum ``μ ∈ [0, 1)``.
    n_iter:
        Number of inner steps per call (``>= 1``).
    lambda_:
        Strength ``λ >= 0`` of the pull towards ``Jᵀω``.
    pref_vector:
        The preferred weights ``ω``; ``None`` is the mean.

    Examples
    --------
    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    >>> SDMGradWeighting(lr=0.1, momentum=0.0, n_iter=1, lambda_=1.0)(J @ J.T)
    tensor([0.5333, 0.4667], dtype=torch.float64)
    """

    lr = Hyper(_check_lr)
    momentum = Hyper(_check_momentum)
    n_iter = Hyper(_check_n_iter)
    lambda_ = Hyper(lambda value: _check_number("lambda_", value, 0.0))
    pref_vector = Hyper(check_pref_vector)

    def __init__(
        self,
        lr: float = 10.0,
        momentum: float = 0.5,
        n_iter: int = 20,
        lambda_: float = 0.3,
        pref_vector: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.lr = lr
        self.momentum = momentum
        self.n_iter = n_iter
        self.lambda_ = lambda_
        self.pref_vector = pref_vector

    def weights_from_cross_gramian(self, cross_gramian: Tensor) -> Tensor:
        w = self._start(cross_gramian)
        c = cross_gramian.detach().to(w.dtype)
        omega = pref_weights(self.pref_vector, c)
        scale = torch.diagonal(c).abs().sqrt().mean().square()
        # A zero diagonal falls back on the largest entry; C = 0 stays 0. No host sync.
        scale = torch.where(scale > 0, scale, c.abs().amax())
        c = c / torch.where(scale > 0, scale, 1.0)
        target = self.lambda_ * (c @ omega)
        velocity = torch.zeros_like(w)
        for _ in range(self.n_iter):
            velocity = self.momentum * velocity + (c @ w + target)
            w = _project_simplex(w - self.lr * velocity)
        self._lambda = w
        return ((w + self.lambda_ * omega) / (1.0 + self.lambda_)).to(cross_gramian.dtype)

    def extra_repr(self) -> str:
        return (
            f"lr={self.lr}, momentum={self.momentum}, n_iter={self.n_iter}, "
            f"lambda_={self.lambda_}, {pref_repr(self.pref_vector)}"
        )
