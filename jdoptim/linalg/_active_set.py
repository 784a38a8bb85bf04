r"""Batched, exact projection onto the dual cone: a primal-dual active-set method in torch.

This module solves the problem of :func:`jdoptim.linalg.project_weights_quadprog` for all
targets at once and on any device. For a Jacobian ``J`` (``[m, n]``), its Gramian ``G = J Jᵀ``
and a target weight vector ``u`` (``[m]``), the projection of ``g = Jᵀu`` onto the dual cone
``{x : J x >= 0}`` is ``Jᵀw`` with

.. math::

    w = \operatorname*{argmin}_{v \ge u} \tfrac12\, vᵀ G v
    \qquad (\text{Moreau: } g + Jᵀμ \text{ with } μ = w - u = \operatorname*{argmin}_{μ \ge 0}
    \lVert Jᵀ(u + μ) \rVert^2),

a convex quadratic program with bound constraints. Its KKT conditions, with ``μ = v - u`` and
``λ = G v`` (``λ_j = ⟨J_j, Jᵀv⟩``, the alignment of the projection with row ``j``), are

.. math::

    μ \ge 0, \qquad λ \ge 0, \qquad μ_j λ_j = 0 \text{ for every } j:

the projection conflicts with no row (``λ >= 0``), and only rows it is orthogonal to are added.

**Active sets.** Given the *free* set ``F`` (rows allowed to be added, ``λ_F = 0``) and its
complement ``Z`` (``μ_Z = 0``, i.e. ``v_Z = u_Z``), the KKT system is linear:

.. math::

    G_{FF}\, v_F = -G_{FZ}\, u_Z, \qquad v_Z = u_Z,

or equivalently, with ``H = G⁻¹``, ``v = H_{:Z}\, x`` where ``H_{ZZ}\, x = u_Z`` (then
``λ_Z = x``, ``λ_F = 0``). Each iteration solves whichever has the smaller systems: when nearly
every row is added, as for per-sample Gramians early in training (62 of 64 rows), the second form
solves ``2 x 2`` systems instead of ``62 x 62`` ones (3.5 ms down to 1.1 ms at ``m = 64``).

The primal-dual active-set iteration (block principal pivoting, semismooth Newton on
``min(μ, λ) = 0``) moves every infeasible index to the other set (``j ∈ F`` with ``μ_j < 0``
leaves, ``j ∈ Z`` with ``λ_j < 0`` enters) and stops when no index is infeasible: the KKT
conditions then hold with exact complementarity, up to the tolerance ``10 · m · eps(float64)``
relative to ``max_j |v_j|``: the float64 solution of the problem posed by the given Gramian (a
float32 Gramian is exact in float64; a tolerance at float32's rounding unit let the iteration stop
on a wrong active set, with errors of 1e-6 to 1e-5 at ``m = 128``). Cycling is broken by Kim &
Park's backup rule: when the number of infeasible indices has not decreased for three
iterations, only the infeasible index of largest position is exchanged (Murty's rule, finite for
positive definite ``G``). All ``k`` problems iterate together, one batched factorisation per
iteration.

**Starting sets.** The iteration starts from the rows that a few steps of accelerated projected
gradient (FISTA in float32, all problems in one matrix product per step, step ``1/λ_max``)
add. On well-conditioned Gramians that guess is usually the
answer, and one factorisation both computes and certifies it; otherwise the iteration corrects it
in a few more. Problems still infeasible after ``max_iter`` iterations (degenerate or very
ill-conditioned ones) are solved by :func:`jdoptim.linalg.project_weights_quadprog`, the only
fallback.

**Well-conditioned ``G`` only.** With dependent rows (duplicated gradients, ``m > n``, zero
rows) ``G`` is singular, the multipliers ``μ`` are not unique and block pivoting can cycle among
equivalent active sets; measured here, it certified none of 128 problems in 30 iterations on a
duplicated-row Gramian. So the iteration runs only when ``λ_min(G) > √eps(dtype) · λ_max(G)``
(one ``eigvalsh`` of the normalised ``G``; ``√eps`` leaves the answer of a float32 Gramian well
above its rounding, and keeps the interlaced sub-blocks ``G_FF`` positive definite, so each
Cholesky factorisation succeeds); otherwise every problem goes to
:func:`jdoptim.linalg.project_weights_quadprog`, which solves on the range of ``G``. Per-sample
and multi-task Gramians met in training are usually far from that limit (condition number 4.7
for the per-sample gradients of the benchmark MLP at initialisation). Each system is solved by
Cholesky plus ``1`` step of iterative refinement (``H`` is accurate to ``κ(G) · eps(float64) <=
1.5e-8`` relative under the conditioning test). The problem is scale-free: ``G`` is
divided by its largest diagonal entry first. All arithmetic is in float64, as in
``project_weights_quadprog``.

**Host synchronisation.** On CPU each iteration reads the largest free-set size (to factorise
``[k, f, f]`` rather than ``[k, m, m]`` blocks) and drops converged problems from the batch; both
are free there. On other devices the blocks are ``[k, m, m]`` (the fixed indices are padded with
the identity), nothing is read back inside an iteration, and convergence is read only every
``4`` iterations; iterations after a problem converged leave it unchanged. The conditioning
test reads one number back before the iteration; the fallback, when needed, costs one more round
trip.
"""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.linalg._dual_cone import project_weights_quadprog
from jdoptim.linalg._gramian import jacobi_scaled

__all__ = ["project_weights"]

_BACKUP_BUDGET = 3  # Kim & Park's "p̄": full exchanges allowed without progress.
_REFINEMENTS = 1  # Iterative refinements of each free-set solve.
_FISTA_STEPS = 12  # Steps of the starting guess.
_CHECK_EVERY = 4  # Off CPU, read convergence back every this many iterations.
_DELTA = 1e-10  # Proximal shift of the factorised blocks (the scaled Gramian has a unit diagonal).
_TAU = 1e-12  # Certificate: KKT residuals within _TAU · ‖projection‖ (plus the rounding floor).
_CONDITION = 1e-4  # Block pivoting while diag((G + δI)⁻¹) stays below this / δ.
_NEWTON_ITER = 200  # Projected Newton steps (nearly singular G) before the fallback.
_ARMIJO = 1e-4  # Sufficient decrease of the projected Newton steps...
_STEPS = 2.0 ** -torch.arange(0, 30, 3, dtype=torch.float64)  # ... tried in one batch.
_BINDING = 1e-3  # Bertsekas' ε: bound within this and pushed against it, held there.
_CHUNK_ELEMENTS = 2**22  # Problems per batched solve: their [chunk, f, m] rows stay under this.


def _reads_are_free(device: torch.device) -> bool:
    """Whether reading a value back to the host costs nothing (no device synchronisation)."""
    return device.type == "cpu"


def _correction(
    g: Tensor,
    inverse: Tensor | None,
    lam: Tensor,
    fix: Tensor,
    free: Tensor,
    delta: Tensor,
    compact: bool,
) -> Tensor:
    """Return ``Δ`` with ``Δ_Z = fix_Z`` and ``((G + δI) Δ)_F = -λ_F`` for each problem.

    ``λ`` is the current point's residual in its inner problem, so ``y + Δ`` solves that problem
    on the face ``F`` (a correction, so the rounding of earlier steps is corrected too). Each
    problem has its own shift ``δ`` (``delta``, ``[k]``).

    Two equivalent forms, and the one with the smaller systems is used: on the free set,
    ``A_FF Δ_F = -λ_F - A_FZ fix_Z`` (``A = G + δI``); on the fixed set, ``Δ = H(-λ + ν)`` with
    ``H = A⁻¹`` (given as ``inverse``, for one common ``δ``), ``ν`` supported on ``Z`` and
    ``H_ZZ ν_Z = fix_Z + (Hλ)_Z``. When nearly every row is added (per-sample Gramians early in
    training: 62 of 64), the second form solves ``2 x 2`` systems instead of ``62 x 62`` ones.
    Without ``inverse`` (off CPU: no reads; or ``G`` nearly singular) the first form is used.
    """
    m = free.shape[1]
    n_free = int(free.sum(dim=1).max()) if compact else m
    n_fixed = int((~free).sum(dim=1).max()) if compact else m
    fixed_part = torch.where(free, torch.zeros_like(fix), fix)
    if inverse is not None and n_fixed < n_free:
        nu = _block_solve(inverse, fixed_part + lam @ inverse, ~free, n_fixed)
        return (nu - lam) @ inverse
    rhs = -lam - fixed_part @ g - delta.unsqueeze(1) * fixed_part
    return fixed_part + _block_solve(g, rhs, free, n_free, delta)


def _block_solve(
    matrix: Tensor, rhs: Tensor, select: Tensor, size: int, shift: Tensor | None = None
) -> Tensor:
    """Solve ``(matrix + shift I)[S, S] x_S = rhs_S`` for each problem (``S``: its ``select``
    row; ``shift``: its own ``δ``, 0 when ``None``), 0 off ``S``.

    ``size`` bounds every ``|S|``. The problems are solved in chunks, so that the gathered blocks
    (``[chunk, size, m]`` rows, ``[chunk, size, size]`` blocks) stay within a few tens of MiB
    however large ``k`` and ``m`` are.
    """
    batch, m = select.shape
    if batch == 0 or size == 0:
        return torch.zeros_like(rhs)
    if shift is None:
        shift = torch.zeros(batch, dtype=rhs.dtype, device=rhs.device)
    chunk = max(1, _CHUNK_ELEMENTS // (size * m))
    if batch <= chunk:
        return _block_solve_chunk(matrix, rhs, select, size, shift)
    return torch.cat(
        [
            _block_solve_chunk(matrix, b, s, size, d)
            for b, s, d in zip(
                rhs.split(chunk), select.split(chunk), shift.split(chunk), strict=True
            )
        ]
    )


def _block_solve_chunk(
    matrix: Tensor, rhs: Tensor, select: Tensor, size: int, shift: Tensor
) -> Tensor:
    batch, m = select.shape
    # Selected indices first, in increasing order (stable sort of the other indicator). The
    # padding points at an extra zero row and column ``m``, and gets a unit diagonal: the blocks
    # come padded with an identity block.
    order = torch.sort((~select).to(torch.uint8), dim=1, stable=True).indices[:, :size]
    valid = torch.arange(size, device=select.device) < select.sum(dim=1, keepdim=True)
    padded = torch.where(valid, order, m)
    extended = torch.nn.functional.pad(matrix, (0, 1, 0, 1))
    rows = extended.index_select(0, padded.flatten()).view(batch, size, m + 1)
    block = rows.gather(2, padded.unsqueeze(1).expand(batch, size, size))
    block.diagonal(dim1=1, dim2=2).add_(torch.where(valid, shift.unsqueeze(1), 1.0))
    factor = torch.linalg.cholesky(block)
    b = torch.nn.functional.pad(rhs, (0, 1)).gather(1, padded).unsqueeze(2)

    def solve(r: Tensor) -> Tensor:
        y = torch.linalg.solve_triangular(factor, r, upper=False)
        return torch.linalg.solve_triangular(factor.mT, y, upper=True)

    x = solve(b)
    for _ in range(_REFINEMENTS):
        x = x + solve(b - block @ x)
    return torch.zeros_like(rhs).scatter(1, order, x.squeeze(2) * valid)


def _starting_free_set(gramian: Tensor, targets: Tensor, lipschitz: Tensor) -> Tensor:
    """Rows added by a few FISTA steps on ``min_{v >= u} ½ vᵀGv`` (a guess, checked later).

    Only the set matters, so the steps run in float32 (half the cost of float64 products).
    """
    g = gramian.float()
    u = targets.float()
    step = (1.0 / lipschitz).float()
    v = u
    y = u
    t = 1.0
    for _ in range(_FISTA_STEPS):
        v_next = torch.maximum(y - step * (y @ g), u)
        t_next = (1.0 + (1.0 + 4.0 * t * t) ** 0.5) / 2.0
        y = v_next + ((t - 1.0) / t_next) * (v_next - v)
        v, t = v_next, t_next
    return v > u


def _solve_scaled(
    g: Tensor, u: Tensor, eps_in: float, max_iter: int, compact: bool
) -> tuple[Tensor, Tensor]:
    """Solve ``min ½ yᵀ g y`` s.t. ``y >= u`` for each row of ``u``; ``g`` has a unit diagonal.

    Returns the solutions and a mask of the certified ones (see the module notes).
    """
    r = u.shape[1]
    device, dtype = g.device, g.dtype
    eta = eps_in**0.5  # what a Gramian given with precision eps_in resolves, relatively
    identity = torch.eye(r, dtype=dtype, device=device)
    floor = max(_DELTA, r * eps_in)  # the smallest shift: above the Gramian's rounding
    factor, info = torch.linalg.cholesky_ex(g + floor * identity)
    inverse = torch.cholesky_inverse(factor)
    # Nearly singular G (an eigenvalue below about 1e4 · δ): block pivoting may cycle.
    well_conditioned = int(info) == 0 and bool(inverse.diagonal().max() * floor <= _CONDITION)
    inverse = inverse if compact else None
    if well_conditioned:
        start = _starting_free_set(g + floor * identity, u, torch.linalg.matrix_norm(g, 1) + floor)
        return _pivoting(g, u, u.clone(), start, inverse, floor, eta, max_iter, compact)
    # Nearly singular: projected Newton finds the active sets, block pivoting (from there) makes
    # the answer exact where it can; otherwise Newton's certified answer stands.
    y, newton_ok = _projected_newton(g, u, eps_in, floor, _NEWTON_ITER, compact)
    y_piv, pivot_ok = _pivoting(g, u, y, y > u, None, floor, eta, max_iter, compact)
    return torch.where(pivot_ok.unsqueeze(1), y_piv, y), pivot_ok | newton_ok


def _pivoting(
    g: Tensor,
    u: Tensor,
    y: Tensor,
    free: Tensor,
    inverse: Tensor | None,
    floor: float,
    eta: float,
    max_iter: int,
    compact: bool,
) -> tuple[Tensor, Tensor]:
    """Block principal pivoting from ``(y, free)``, each inner problem proximal (``δ = floor``)."""
    k, r = u.shape
    device, dtype = g.device, g.dtype
    eps = torch.finfo(dtype).eps
    delta = torch.full((k,), floor, dtype=dtype, device=device)
    centre = y.clone()  # each inner problem: min ½yᵀGy + δ/2 ‖y - centre‖² s.t. y >= u
    out = u.clone()
    rows = torch.arange(k, device=device)
    certified = torch.zeros(k, dtype=torch.bool, device=device)
    best = torch.full((k,), r + 1, device=device)
    budget = torch.full((k,), _BACKUP_BUDGET, device=device)
    positions = torch.arange(1, r + 1, device=device)
    previous = torch.full((k,), torch.inf, dtype=dtype, device=device)
    for iteration in range(max_iter):
        u_rows = u[rows]
        # One block-pivoting step of the inner problem (a positive definite LCP), written as a
        # correction from the current point: its residual uses G + δI itself.
        lam_inner = y @ g + delta.unsqueeze(1) * (y - centre)
        y = y + _correction(g, inverse, lam_inner, u_rows - y, free, delta, compact)
        lam = y @ g  # (Ĵ p)_j of the unregularised problem, p = Ĵᵀy
        lam_inner = lam + delta.unsqueeze(1) * (y - centre)
        norm = (lam * y).sum(dim=1, keepdim=True).clamp_min(0).sqrt()  # ‖p‖
        # Signs: to the rounding of λ = G y, plus _TAU of the projection's norm.
        tol = _TAU * norm + 2 * r * eps * y.abs().sum(dim=1, keepdim=True)
        infeasible = torch.where(free, y - u_rows < -tol, lam_inner < -tol)
        count = infeasible.sum(dim=1)
        solved = count == 0  # the inner problem: its centre moves to its solution
        # The unregularised KKT conditions: signs, and face equations λ_F = 0 to the same
        # tolerance or, once a proximal step no longer halves their residual, to what the
        # Gramian resolves (see the module notes).
        residual = torch.where(free, lam.abs(), 0).amax(dim=1)
        loose = eta * (norm + y.norm(dim=1, keepdim=True)).squeeze(1)
        stalled = residual > 0.5 * previous
        resolved = (residual <= tol.squeeze(1)) | (stalled & (residual <= loose))
        signs = torch.where(free, True, lam >= -tol).all(dim=1)
        previous = torch.where(solved, residual, previous)
        done = solved & signs & resolved
        centre = torch.where(solved.unsqueeze(1), y, centre)
        out[rows] = torch.where((done & ~certified[rows]).unsqueeze(1), y, out[rows])
        certified[rows] |= done
        if compact:
            keep = ~done
            if not bool(keep.any()):
                break
            rows, free, infeasible, count, solved = (
                t[keep] for t in (rows, free, infeasible, count, solved)
            )
            y, centre, previous, best, budget, delta = (
                t[keep] for t in (y, centre, previous, best, budget, delta)
            )
        elif (iteration + 1) % _CHECK_EVERY == 0 and bool(certified.all()):
            break
        # Kim & Park's backup rule: full exchange while the infeasibility count keeps falling
        # (or for a few more tries), otherwise Murty's single exchange of the last infeasible.
        # A solved inner problem restarts the count for the next one (same sets, new centre).
        improved = count < best
        full = improved | (budget > 0)
        best = torch.where(solved, r + 1, torch.where(improved, count, best))
        budget = torch.where(solved | improved, _BACKUP_BUDGET, budget - 1)
        last = (infeasible * positions).argmax(dim=1, keepdim=True)
        single = torch.zeros_like(infeasible).scatter_(1, last, True) & infeasible
        free = free ^ torch.where(full.unsqueeze(1), infeasible, single)
    if not compact:
        out = torch.where(certified.unsqueeze(1), out, y)
    else:
        out[rows] = torch.where(certified[rows].unsqueeze(1), out[rows], y)
    return torch.maximum(out, u), certified


def _projected_newton(
    g: Tensor, u: Tensor, eps_in: float, delta: float, max_iter: int, compact: bool
) -> tuple[Tensor, Tensor]:
    """Bertsekas' projected Newton method on ``min ½ yᵀ g y`` s.t. ``y >= u`` (nearly singular
    ``g``), certified like :func:`_solve_scaled`.

    Rows within ``ε_k`` of their bound and pushed against it are held (gradient step); the others
    take the Newton step of ``(G_FF + δI)`` (a descent direction however singular ``G_FF`` is),
    and the step ``y(α) = max(y + α d, u)`` is the first of ``1, 1/8, 1/64, ...`` with Armijo's
    decrease, all candidates evaluated in one batch.
    """
    k, r = u.shape
    eps = torch.finfo(g.dtype).eps
    steps = _STEPS.to(g.device).view(-1, 1, 1)
    delta_k = torch.full((k,), delta, dtype=g.dtype, device=g.device)
    y, lam, out = u.clone(), u @ g, u.clone()
    rows = torch.arange(k, device=g.device)
    certified = torch.zeros(k, dtype=torch.bool, device=g.device)
    stuck = torch.zeros(k, dtype=torch.bool, device=g.device)  # no step decreased f
    for _ in range(max_iter):
        u_rows = u[rows]
        slack = y - u_rows
        norm = (lam * y).sum(dim=1, keepdim=True).clamp_min(0).sqrt()
        tol = _TAU * norm + 2 * r * eps * y.abs().sum(dim=1, keepdim=True)
        # KKT residual: λ_j = 0 where y_j > u_j, λ_j >= 0 at the bound.
        residual = torch.where(slack > tol, lam.abs(), (-lam).clamp_min(0)).amax(dim=1)
        loose = eps_in**0.5 * (norm + y.norm(dim=1, keepdim=True)).squeeze(1)
        done = (residual <= tol.squeeze(1)) | (stuck & (residual <= loose))
        out[rows] = torch.where(done.unsqueeze(1), y, out[rows])
        certified[rows] |= done
        keep = ~done
        if not bool(keep.any()):
            break
        # Converged problems leave the batch (one read per iteration, on every device).
        rows, y, lam = rows[keep], y[keep], lam[keep]
        u_rows, slack, delta_k = u_rows[keep], slack[keep], delta_k[keep]
        gap = (y - torch.maximum(y - lam, u_rows)).norm(dim=1, keepdim=True)
        free = ~((slack <= gap.clamp_max(_BINDING)) & (lam > 0))
        zeros = torch.zeros_like(lam)
        d = _correction(g, None, lam, zeros, free, delta_k, compact)
        d = torch.where(free, d, -lam)
        candidates = torch.maximum(y + steps * d, u_rows)  # [steps, k, r]
        lam_c = candidates @ g
        decrease = 0.5 * ((lam_c * candidates).sum(dim=2) - (lam * y).sum(dim=1))
        armijo = decrease <= _ARMIJO * (lam * (candidates - y)).sum(dim=2)
        stuck = ~armijo.any(dim=0)
        first = torch.where(stuck, -1, armijo.to(torch.uint8).argmax(dim=0))
        pick = torch.arange(y.shape[0], device=g.device)
        y, lam = candidates[first, pick], lam_c[first, pick]
    out[rows] = torch.where(certified[rows].unsqueeze(1), out[rows], y)
    return torch.maximum(out, u), certified


def project_weights(gramian: Tensor, targets: Tensor, *, max_iter: int = 30) -> Tensor:
    """Return the weights of the dual-cone projections of ``Jᵀ targets[k]``, all at once.

    All problems are solved together by one batched primal-dual active-set iteration (block
    principal pivoting) in torch, on the Gramian's device: each iteration solves the KKT system of
    every problem's current active set with one batched Cholesky factorisation, in float64, and
    stops when the KKT conditions hold (complementarity exact, signs to ``10 · m · eps(float64)``
    relative). Problems not certified within ``max_iter`` iterations are handed to
    :func:`jdoptim.linalg.project_weights_quadprog`. The answer does not depend on a
    regularisation: the tests compare it with an independent float64 NNLS to 1e-6 relative.

    Parameters
    ----------
    gramian:
        ``G = J Jᵀ``, a finite symmetric positive semi-definite matrix of shape ``[m, m]``.
    targets:
        Weight vectors ``u_k`` stacked in a ``[k, m]`` matrix.
    max_iter:
        Active-set iterations before the problems still infeasible (degenerate or very
        ill-conditioned ones; well-conditioned problems take 1 to 3) are handed to
        :func:`jdoptim.linalg.project_weights_quadprog`.

    Returns
    -------
    Tensor
        ``[k, m]`` weights ``w_k = u_k + μ_k`` with ``μ_k >= 0`` such that ``Jᵀ w_k`` is the
        Euclidean projection of ``Jᵀ u_k`` onto ``{x : J x >= 0}``. Same dtype and device as
        ``gramian``. When ``G`` is singular the projection is unique but ``w`` need not be.

    Raises
    ------
    ValueError
        If ``gramian`` is not square, or ``targets`` is not a matrix with as many columns as
        ``gramian`` has rows.

    Examples
    --------
    Two conflicting gradients ``(1, 0)`` and ``(-1, 1)``: projecting the first onto the dual cone
    adds half of the second to it; projecting the second adds all of the first.

    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    >>> w = project_weights(J @ J.T, torch.eye(2, dtype=torch.float64))
    >>> w
    tensor([[1.0000, 0.5000],
            [1.0000, 1.0000]], dtype=torch.float64)
    >>> J @ (w[0] @ J)  # no row conflicts with the projection
    tensor([0.5000, 0.0000], dtype=torch.float64)
    """
    if gramian.ndim != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"gramian must be a square matrix, got shape {tuple(gramian.shape)}.")
    m = gramian.shape[0]
    if targets.ndim != 2 or targets.shape[1] != m:
        raise ValueError(
            f"targets must have shape [k, {m}] to match the [{m}, {m}] gramian, got "
            f"{tuple(targets.shape)}."
        )
    dtype, device = gramian.dtype, gramian.device
    u = targets.detach().to(dtype=torch.float64, device=device)
    weights = u.clone()
    rows, d, scaled = jacobi_scaled(gramian)  # zero rows left out: their constraint holds
    if rows.numel() == 0 or u.shape[0] == 0:
        return weights.to(dtype)
    eps_in = torch.finfo(dtype).eps  # the precision the Gramian was given in
    y, certified = _solve_scaled(scaled, u[:, rows] * d, eps_in, max_iter, _reads_are_free(device))
    weights[:, rows] = torch.maximum(y / d, u[:, rows])  # μ >= 0 exactly, despite (u·d)/d
    if not bool(certified.all()):
        missing = (~certified).nonzero().squeeze(1)
        fallback = project_weights_quadprog(gramian.detach(), u[missing].to(dtype))
        weights[missing] = fallback.to(torch.float64)
    # Weights beyond the dtype's range (rows over 1e38 times smaller than others, in float32)
    # are clamped: the update they would form is not representable either.
    limit = torch.finfo(dtype).max
    return weights.clamp(-limit, limit).to(dtype)
