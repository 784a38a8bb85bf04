"""CAGrad: conflict-averse gradient descent (Liu et al., NeurIPS 2021)."""

from __future__ import annotations

import math

import numpy as np
import quadprog
import torch
from torch import Tensor

from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting, check_gramian
from jdoptim.linalg._dual_cone import _nnls


def _hildreth(b: np.ndarray, y0: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Multipliers of ``argmin {‖y - y0‖ : B y >= t}`` by Hildreth's dual coordinate descent.

    For unit rows of ``B`` and a polyhedron with an interior point: cyclic exact minimisation of
    the dual ``½‖Bᵀμ‖² + μᵀ(B y0 - t)`` over each ``μ_i >= 0``, which converges to the projection
    whatever the degeneracy (duplicated or opposite rows, where quadprog can fail). Its active set
    is then polished: the equality-constrained projection on it, kept when it is a KKT point.
    """
    mu = np.zeros(b.shape[0])
    y = y0.copy()
    tol = 64.0 * np.finfo(np.float64).eps * (1.0 + np.abs(t).max() + float(np.linalg.norm(y0)))
    for _ in range(2000):
        largest = 0.0
        for i in range(b.shape[0]):
            step = max(-mu[i], t[i] - float(b[i] @ y))  # exact 1-D minimiser, clipped at μ_i >= 0
            if step != 0.0:
                mu[i] += step
                y += step * b[i]
                largest = max(largest, abs(step))
        if largest <= tol:
            break
    active = mu > 0.0
    exact = np.zeros_like(mu)
    rows = b[active]
    exact[active] = np.linalg.lstsq(rows @ rows.T, t[active] - rows @ y0, rcond=None)[0]
    if np.all(exact >= 0.0) and np.all(b @ (y0 + b.T @ exact) >= t - tol):
        return exact
    return mu


def _project(b: np.ndarray, y0: np.ndarray, t: float) -> tuple[np.ndarray, float] | None:
    """Multipliers ``μ >= 0`` and distance of ``argmin {‖y - y0‖ : B y >= t}`` (``None``: empty).

    The rows are normalised first (``b_iᵀy >= t`` is ``(b_i/‖b_i‖)ᵀy >= t/‖b_i‖``): quadprog's
    tolerances are absolute, so a row 1e9 times shorter than the others made it declare the
    constraints inconsistent. When quadprog still fails on a polyhedron that is not empty:
    ``t = 0``, the projection onto the dual cone, whose dual is the NNLS
    ``min_{μ >= 0} ‖Bᵀμ + y0‖`` (exact active-set method); ``t < 0`` (0 is an interior point),
    Hildreth's method.
    """
    if np.all(b @ y0 >= t):
        return np.zeros(b.shape[0]), 0.0
    norms = np.linalg.norm(b, axis=1)
    unit, bounds = b / norms[:, None], t / norms
    try:
        unit_mu = quadprog.solve_qp(np.eye(b.shape[1]), y0, unit.T, bounds)[4]
    except ValueError:
        if t > 0.0:
            return None  # quadprog: "constraints are inconsistent"
        unit_mu = _nnls(unit.T, -y0) if t == 0.0 else _hildreth(unit, y0, bounds)
    return unit_mu / norms, float(np.linalg.norm(unit.T @ unit_mu))


def _project_above_zero(
    b: np.ndarray, y0: np.ndarray, t: float, hull_tol: float
) -> tuple[np.ndarray, float] | None:
    """:func:`_project` for ``t > 0``, ``None`` when ``0`` is numerically in the hull of the rows.

    ``{B y >= t}`` with ``t > 0`` is empty when ``0`` is in the hull. At a solution, with the
    multipliers ``ν_i = μ_i ‖b_i‖`` of the unit rows, ``ν / Σν`` are hull weights of the *unit*
    rows whose point has norm ``D(t) / Σν``: when it is shorter than ``hull_tol``, the
    constraints were made feasible only by rounding (a direction that is noise of the Gramian),
    with multipliers so large that ``Jᵀw`` would be a cancellation of huge terms. Then
    ``t^* <= 0``. (0 is in the hull of the rows exactly when it is in the hull of the unit rows,
    so the test does not depend on the rows' norms.)
    """
    solution = _project(b, y0, t)
    if solution is not None:
        mu, distance = solution
        total = float((mu * np.linalg.norm(b, axis=1)).sum())
        if total > 0.0 and distance <= hull_tol * total:
            return None
    return solution


def _unit_range_factor(g: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """``(B, norms)``: the non-zero rows of ``J``, in an orthonormal basis of their span.

    ``B = diag(norms) B̂`` where ``B̂ B̂ᵀ`` is the Gramian of the unit rows on its numerical range
    (eigenvalues above ``eps · λ_max`` of the *scaled* Gramian, whose diagonal is 1): the rank is
    judged after the diagonal scaling, so a row 1e-16 times shorter than the others keeps its
    direction instead of falling below the rounding of the largest eigenvalue.
    """
    norms = np.sqrt(np.diag(g))
    scaled = g / np.outer(norms, norms)
    eigenvalues, eigenvectors = np.linalg.eigh((scaled + scaled.T) / 2)
    keep = eigenvalues > eigenvalues[-1] * eps
    return norms[:, None] * eigenvectors[:, keep] * np.sqrt(eigenvalues[keep]), norms


def _cagrad_weights(g: np.ndarray, c: float, norm_eps: float, eps: float) -> np.ndarray:
    """CAGrad's weights for a float64 Gramian ``g`` whose largest diagonal entry is 1."""
    m = g.shape[0]
    p = np.full(m, 1.0 / m)
    nonzero = np.diag(g) > 0.0  # exactly zero rows only: no absolute threshold on the norms
    b, row_norms = _unit_range_factor(g[np.ix_(nonzero, nonzero)], eps)
    y0 = b.T @ p[nonzero]  # g_0 in the orthonormal coordinates of the span of the rows
    rho = c * float(np.linalg.norm(y0))  # the radius c ‖g_0‖
    if b.shape[1] == 0 or rho <= c * norm_eps:  # ‖g_0‖ <= norm_eps · max_i ‖g_i‖ (= 1)
        return p
    alignments = b @ y0
    # t* = max {t : D(t) <= ρ}, D(t) = dist(g_0, {y : B y >= t}), lies in [lower, upper].
    lower = float(alignments.min())
    upper = float((alignments + rho * row_norms).min())
    if not nonzero.all():
        upper = min(upper, 0.0)  # a zero row caps min_i ⟨g_i, d⟩ at 0
        lower = min(lower, 0.0)
    # A hull point of the unit rows shorter than this cannot be told from 0 with a Gramian
    # rounded in the dtype: its eigenvalues below ~m·eps (singular values below sqrt(m·eps)) are
    # noise.
    hull_tol = math.sqrt(10.0 * m * eps)
    t = upper
    solution = _project_above_zero(b, y0, t, hull_tol) if t > 0.0 else _project(b, y0, t)
    if solution is None:  # 0 is in the hull of the rows: t* <= 0
        t = min(upper, 0.0)
        solution = _project(b, y0, t)
    mu, distance = solution
    # D is convex and non-decreasing: Newton's method from the right decreases monotonically to
    # t*. dD/dt = Σ μ / D (envelope theorem on ½ D²).
    for _ in range(100):
        if distance <= rho * (1.0 + 1e-12) or t <= lower:
            break
        slope = mu.sum() / distance
        step = (distance - rho) / slope
        if not step > 1e-15 * (abs(t) + rho * rho):
            break
        t = max(t - step, lower)
        solution = _project_above_zero(b, y0, t, hull_tol) if t > 0.0 else _project(b, y0, t)
        if solution is None:  # 0 is numerically in the hull: t* <= 0
            t = 0.0
            solution = _project(b, y0, t)
        mu, distance = solution
    weights = p.copy()
    weights[nonzero] += mu
    return weights


class CAGradWeighting(Weighting):
    r"""The weighting of :class:`CAGrad`, computed from the Gramian ``G = J Jᵀ``.

    In the orthonormal coordinates ``B`` of the span of the rows (``G = B Bᵀ`` on its numerical
    range), let ``D(t)`` be the distance from ``g_0`` to the polyhedron ``{y : B y >= t}``: a
    convex, non-decreasing function of ``t``. The optimal alignment is
    ``t^* = max {t : D(t) <= c ‖g_0‖}``, found by Newton's method from an upper bound, each
    ``D(t)`` being a strictly convex projection QP (quadprog, identity Hessian, no
    regularisation). At ``t^*`` the projection is ``d = g_0 + Jᵀμ`` with multipliers ``μ >= 0``,
    which are exactly the dual solution: ``μ = c ‖g_0‖ w / ‖Jᵀw‖``. The weights are
    ``1/m + μ``. ``G`` is first divided by its largest diagonal entry (scale-free). When a
    solution with ``t > 0`` has multipliers whose hull point ``Jᵀμ / Σμ`` is shorter than
    ``sqrt(10 m eps) · max_i ‖g_i‖`` (below what the Gramian resolves in its dtype), ``0`` is taken
    to be in the hull of the rows and ``t^* <= 0``: rounding, not the rows, made ``{B y >= t}``
    feasible, and ``Jᵀw`` would cancel huge weights.

    Parameters
    ----------
    c:
        The relative radius ``c >= 0`` of the ball around the mean gradient.
    norm_eps:
        A mean gradient ``g_0`` with ``‖g_0‖ <= norm_eps · max_i ‖g_i‖`` is taken as zero (the
        ball is then the point ``g_0`` and the weights are ``1/m``). Relative, ``>= 0``.

    Examples
    --------
    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    >>> CAGradWeighting(c=0.5)(J @ J.T)  # w* = (1/2, 1/2) = g_0: μ = c ‖g_0‖ w* / ‖g_0‖ = 1/4
    tensor([0.7500, 0.7500], dtype=torch.float64)
    """

    def __init__(self, c: float, norm_eps: float = 1e-4) -> None:
        for name, value in (("c", c), ("norm_eps", norm_eps)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
        self.c = float(c)
        self.norm_eps = float(norm_eps)

    def forward(self, gramian: Tensor, /) -> Tensor:
        check_gramian(gramian)
        m = gramian.shape[0]
        g = gramian.detach().to(device="cpu", dtype=torch.float64).numpy()
        scale = float(np.max(np.diag(g), initial=0.0))
        if m == 0 or scale <= 0.0 or self.c == 0.0:
            weights = np.full(m, 1.0 / max(m, 1))
        else:
            eps = float(torch.finfo(gramian.dtype).eps)
            g = (g + g.T) / (2.0 * scale)
            weights = _cagrad_weights(g, self.c, self.norm_eps, eps)
        return torch.from_numpy(weights).to(device=gramian.device, dtype=gramian.dtype)

    def extra_repr(self) -> str:
        return f"c={self.c}, norm_eps={self.norm_eps}"


class CAGrad(GramianWeightedAggregator):
    r"""The direction, within ``c ‖g_0‖`` of the mean gradient, that most improves the worst loss.

    *Conflict-Averse Gradient Descent for Multi-task Learning*, Liu, Liu, Jin, Stone & Liu,
    NeurIPS 2021 (https://arxiv.org/abs/2110.14048). With ``g_0 = \frac1m Σ_i g_i``:

    .. math::

        d^* = \operatorname*{argmax}_{\lVert d - g_0 \rVert \le c \lVert g_0 \rVert}
              \min_i ⟨g_i, d⟩
            = g_0 + \frac{c \lVert g_0 \rVert}{\lVert Jᵀw^* \rVert} Jᵀw^*, \qquad
        w^* = \operatorname*{argmin}_{w \in Δ_m} ⟨Jᵀw, g_0⟩ + c \lVert g_0 \rVert \lVert Jᵀw \rVert.

    ``A(J) = d^*``, as in the paper's Algorithm 1 (the official code can also divide the update
    by ``1 + c²``; this class does not). The problem is solved exactly from the Gramian (see
    :class:`CAGradWeighting`), with no absolute epsilon: when ``0`` is in the hull of the rows,
    where ``w^*`` is not unique and ``Jᵀw^* = 0``, the update is the optimal ``d`` nearest to
    ``g_0``, which stays well defined.

    Properties: positively homogeneous, permutation invariant, Gramian-only, stateless,
    deterministic. Non-conflicting when ``c >= 1`` (``d = 0`` is then in the ball, so
    ``min_i ⟨g_i, d^*⟩ >= 0``), not for ``c < 1`` in general. ``c = 0`` is the Mean.

    Parameters
    ----------
    c:
        The relative radius ``c >= 0`` (the paper uses 0.2 to 0.9).
    norm_eps:
        Relative threshold below which ``‖g_0‖ / max_i ‖g_i‖`` counts as 0 (``>= 0``).

    Examples
    --------
    >>> import torch
    >>> from jdoptim.aggregation import CAGrad
    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 2.0]], dtype=torch.float64)
    >>> d = CAGrad(c=1.0)(J)  # g_0 = (0, 1), radius 1: d = (1, 1) is aligned by 1 with both rows
    >>> d
    tensor([1., 1.], dtype=torch.float64)
    >>> J @ d
    tensor([1., 1.], dtype=torch.float64)
    """

    def __init__(self, c: float, norm_eps: float = 1e-4) -> None:
        super().__init__(CAGradWeighting(c, norm_eps))
