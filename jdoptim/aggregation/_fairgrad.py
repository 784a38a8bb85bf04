"""FairGrad: α-fair weights from the Gramian (Ban & Ji, ICML 2024)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting, check_gramian
from jdoptim.aggregation._hyper import Hyper, delegated

# A row of a reduced problem whose squared norm is below this many eps of its own squared norm
# in the original problem lies in the span of the blocking rows (numerically zero there).
ZERO_ROW_RTOL = 100.0
# Weights whose contribution w_i ‖g_i‖^{2/(1+p)} (1 when the rows are orthogonal; ‖w_i g_i‖ for
# α = 1) exceeds this are growing along a null direction of Jᵀ: the problem has no solution.
BLOW_UP = 1e4


def _newton(g: Tensor, p: float, w: Tensor, iters: int, tol: float) -> tuple[Tensor, int, bool]:
    """Damped Newton on ``½ wᵀGw - Σ φ(w_i)`` in the relative variable; (w, iterations, blown)."""
    # A row's contribution relative to its value for orthogonal rows (w_i = n_i^{-2/(1+p)}):
    # scale-free, so that rows much shorter than the others are not taken for blocking ones.
    norms = g.diagonal() ** (1.0 / (1.0 + p))

    def objective(v: Tensor) -> float:
        phi = v.log().sum() if p == 1.0 else (v ** (1.0 - p)).sum() / (1.0 - p)
        return float(0.5 * v @ (g @ v) - phi)

    eye = torch.eye(w.shape[0], dtype=torch.float64, device=g.device)
    for k in range(iters):
        powered = w ** (1.0 - p)
        residual = powered - w * (g @ w)  # -diag(w) ∇h(w)
        if float((residual.abs() / powered).max()) <= tol:
            return w, k, False
        if float((w * norms).max()) > BLOW_UP:
            return w, k, True
        hessian = w[:, None] * g * w[None, :] + p * torch.diag(powered)
        jitter = tol * float(hessian.diagonal().max()) * eye
        factor, info = torch.linalg.cholesky_ex(hessian + jitter)
        if int(info) == 0:
            z = torch.cholesky_solve(residual[:, None], factor)[:, 0]
        else:
            z = torch.linalg.lstsq(hessian, residual[:, None]).solution[:, 0]
        decrement = float(z @ residual)
        if not decrement > 0.0:
            return w, k, False
        if p == 1.0 and decrement < 0.1:
            # ½wᵀGw - Σ log w is self-concordant: with a Newton decrement below 1 the full step
            # stays positive (the relative Hessian is >= I, so |z_i| < 1) and converges
            # quadratically. Backtracking there compared objective values that differ by less
            # than their rounding and stopped the iteration 1e-6 (relative) from the solution.
            w = w * (1.0 + z)
            continue
        step = 1.0 if float(z.min()) > -0.5 else 0.5 / float(-z.min())
        current = objective(w)
        while objective(w * (1.0 + step * z)) > current - 0.25 * step * decrement:
            step *= 0.5
            if step < 1e-10:
                return w, k, False
        w = w * (1.0 + step * z)
    return w, iters, False


def _drop_rounding(g: Tensor, eps: float) -> Tensor:
    """``G`` without the eigenvalues of its unit-diagonal scaling below ``eps · λ_max``.

    Left in, such an eigenvalue is a spurious direction along which ``G w = w^{-p}`` has a
    solution when the exact rows have none (e.g. two opposite rows in float32), and the weights
    then follow it into a conflicting update. The rank is judged, and ``G`` rebuilt, after the
    diagonal scaling ``D^{-1} G D^{-1}`` (``D = diag(G)^{1/2}``, positive here): rebuilding ``G``
    itself added errors of ``eps · λ_max`` to every entry, a relative error of 1e-8 on the rows
    1e4 times shorter than the longest, which moved the weights by as much.
    """
    norms = g.diagonal().sqrt()
    scaled = g / norms[:, None] / norms[None, :]
    values, vectors = torch.linalg.eigh((scaled + scaled.T) / 2)
    values = torch.where(values > eps * values[-1], values, torch.zeros_like(values))
    rebuilt = (vectors * values) @ vectors.T
    return rebuilt * norms[:, None] * norms[None, :]


def solve_fair_weights(
    gramian: Tensor,
    p: float,
    start: Tensor | None,
    max_iters: int,
    eps: float,
    floor: Tensor | None = None,
) -> Tensor:
    r"""Solve ``(G w)_i = w_i^{-p}``, ``w > 0``, by damped Newton steps (float64, scale-free).

    The equations are the stationarity conditions of the strictly convex
    ``h(w) = ½ wᵀGw - Σ_i φ(w_i)`` with ``φ'(w) = w^{-p}``. Newton steps are taken in the relative
    variable ``z`` (``w ← w ⊙ (1 + t z)``), whose Hessian ``diag(w) G diag(w) + p diag(w^{1-p})``
    is well conditioned, with backtracking on ``h`` so that ``w`` stays positive. ``G`` is divided
    by its largest diagonal entry ``γ`` and the weights multiplied back by ``γ^{-1/(1+p)}``, so the
    iterates do not depend on the scale of ``G``. Zero rows (``G_ii = 0``, or ``G_ii <= floor_i``)
    get weight 0. A row however short is not zero: the relative Newton steps are invariant to
    the scaling of the rows (``diag(w) G diag(w)`` is unchanged by ``G -> DGD``, ``w -> D⁻¹w``), so
    a row ``10⁻⁸`` times shorter than the others keeps its equation, and ``g_iᵀd = w_i^{-p} > 0``.
    (Before, rows with ``G_ii <= 100 eps · max_j G_jj`` were dropped: on rows spread over 12
    decades the update then conflicted with the shortest ones, cosine down to -0.99.)

    When ``0`` is in the convex hull of the rows no solution exists: the weights of a *blocking*
    set ``B`` of rows (which combine positively to ``0``) grow without bound and ``d = Jᵀw`` tends
    to the solution for the other rows ``R`` within the orthogonal complement of ``span(g_B)``.
    Once a contribution ``w_i ‖g_i‖`` exceeds ``10⁴`` that limit is computed exactly: the rows with
    large contributions form ``B``, the problem is solved on the Schur complement
    ``G_RR - G_RB G_BB^+ G_BR`` (recursively), and ``w_B = -G_BB^+ G_BR w_R``, so that
    ``g_Bᵀd = 0`` and ``g_Rᵀd = w_R^{-p}``.
    """
    g = gramian.detach().to(torch.float64)
    g = (g + g.T) / 2
    m = g.shape[0]
    weights = torch.zeros(m, dtype=torch.float64, device=g.device)
    scale = float(g.diagonal().max()) if m else 0.0
    live = g.diagonal() > (0.0 if floor is None else floor)
    if scale <= 0.0 or not bool(live.any()):
        return weights
    g = _drop_rounding(g[live][:, live] / scale, eps)
    w = g.diagonal() ** (-1.0 / (1.0 + p))  # the solution when the rows are orthogonal
    if start is not None and start.shape == (m,) and bool((start[live] > 0).all()):
        w = start[live].to(torch.float64) * scale ** (1.0 / (1.0 + p))
    w, _, blown = _newton(g, p, w, max_iters, max(eps, 1e-13))
    if blown:
        blocking = w * g.diagonal() ** (1.0 / (1.0 + p)) > BLOW_UP**0.5
        free = ~blocking
        w = torch.zeros_like(w)
        if bool(free.any()):
            coupling = torch.linalg.pinv(g[blocking][:, blocking], hermitian=True)
            coupling = coupling @ g[blocking][:, free]
            reduced = g[free][:, free] - g[free][:, blocking] @ coupling
            # Zero relative to each row's own norm in the original problem.
            floor = ZERO_ROW_RTOL * eps * g.diagonal()[free]
            w[free] = solve_fair_weights(reduced, p, None, max_iters, eps, floor)
            w[blocking] = -coupling @ w[free]
    weights[live] = w * scale ** (-1.0 / (1.0 + p))
    return weights


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a number, got {type(alpha).__name__}")
    if not (math.isfinite(alpha) and alpha > 0.0):
        raise ValueError(f"alpha must be positive and finite, got {alpha!r}")
    return float(alpha)


def _check_max_iters(max_iters: int | None) -> int | None:
    if max_iters is not None and (
        isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1
    ):
        raise ValueError(f"max_iters must be None or a positive int, got {max_iters!r}")
    return max_iters


class FairGradWeighting(Weighting):
    r"""The weighting of :class:`FairGrad`: the positive solution of ``G w = w^{-1/α}``.

    Parameters
    ----------
    alpha:
        The fairness parameter ``α > 0`` (``α = 1``: proportional fairness, Nash-MTL's weights;
        ``α → ∞``: max-min fairness).
    max_iters:
        Maximum number of Newton iterations; ``None`` is 100 (it usually converges in fewer).

    Examples
    --------
    >>> import torch
    >>> J = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    >>> FairGradWeighting(alpha=1.0)(J @ J.T)  # orthogonal rows: w_i = 1 / ‖g_i‖
    tensor([0.5000, 1.0000], dtype=torch.float64)
    """

    alpha = Hyper(_check_alpha)
    max_iters = Hyper(_check_max_iters)

    def __init__(self, alpha: float, max_iters: int | None = None) -> None:
        super().__init__()
        self.alpha = alpha
        self.max_iters = max_iters

    def forward(self, gramian: Tensor, /) -> Tensor:
        check_gramian(gramian)
        iters = 100 if self.max_iters is None else self.max_iters
        eps = torch.finfo(gramian.dtype).eps
        return solve_fair_weights(gramian, 1.0 / self.alpha, None, iters, eps).to(gramian.dtype)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, max_iters={self.max_iters}"


class FairGrad(GramianWeightedAggregator):
    r"""α-fair aggregation of the rows: *Fair Resource Allocation in Multi-Task Learning*.

    Ban & Ji, ICML 2024 (https://arxiv.org/abs/2402.15638). The update ``d = Jᵀw`` maximises the
    α-fair utility of the per-row improvements ``g_iᵀd`` in a ball, which gives

    .. math::

        \mathcal A(J) = Jᵀ w, \qquad (G w)_i = w_i^{-1/α} \quad (w > 0,\ G = J Jᵀ).

    The published code solves this with ``scipy.optimize.least_squares``; here it is the minimiser
    of a strictly convex function, found natively by damped Newton steps in float64
    (:func:`solve_fair_weights`). Zero rows get weight 0; when no solution
    exists (``0`` in the convex hull of the rows) the iterations stop before the weights blow up.

    Properties: non-conflicting at convergence (``J d = G w = w^{-1/α} > 0``), permutation
    invariant, Gramian-only, stateless, deterministic. Not positively homogeneous: ``A(sJ) =
    s^{(1-α)/(1+α)} A(J)`` (scale-invariant for ``α = 1``).

    Examples
    --------
    >>> import torch
    >>> from jdoptim.aggregation import FairGrad
    >>> J = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    >>> FairGrad(alpha=1.0)(J)
    tensor([1., 1.], dtype=torch.float64)
    """

    def __init__(self, alpha: float, max_iters: int | None = None) -> None:
        super().__init__(FairGradWeighting(alpha, max_iters))

    alpha = delegated("alpha")
    max_iters = delegated("max_iters")
