r"""Batched, exact projection onto the dual cone, certified by its KKT conditions.

For a Jacobian ``J`` (``[m, n]``), its Gramian ``G = J Jᵀ`` and a target weight vector ``u``
(``[m]``), the projection of ``g = Jᵀu`` onto the dual cone ``{x : J x >= 0}`` is ``Jᵀw`` with

.. math::

    w = \operatorname*{argmin}_{v \ge u} \tfrac12\, vᵀ G v
    \qquad (\text{Moreau: } g + Jᵀμ \text{ with } μ = w - u = \operatorname*{argmin}_{μ \ge 0}
    \lVert Jᵀ(u + μ) \rVert^2).

Its KKT conditions, with ``μ = v - u`` and ``λ = G v`` (the alignment of the projection with
each row), are ``μ >= 0``, ``λ >= 0`` and ``μ_j λ_j = 0``. All problems (one per target) are
solved together, in float64, on the Gramian's device.

**Jacobi scaling.** Scaling the rows of ``J`` by positive numbers does not change the cone, so
the problem is solved on ``Ĝ = D⁻¹GD⁻¹`` (``D = diag(√G_ii)``: the rows at unit norm) with
targets ``Du``, and mapped back (``w = D⁻¹y``). Zero rows are set aside (their constraint
always holds; their weight stays the target's). Late in training the diagonal of per-sample
Gramians spreads over 1e-11…1e-86; scaled, their condition number is 12…5e8 (test fixtures).

**Well-conditioned** ``Ĝ`` (``diag(Ĝ⁻¹) <= 1e6``, every eigenvalue above about 1e-6): block
principal pivoting (semismooth Newton on ``min(μ, λ) = 0``) moves every infeasible index to the
other set and solves the face system ``Ĝ_FF y_F = -Ĝ_FZ û_Z`` of every problem with one batched
Cholesky factorisation per iteration, started from the free sets that FISTA steps suggest
(``_start``: 64 steps up to ``m = 256``, 16 beyond). Cycling is broken by Kim & Park's backup
rule (after three exchanges without progress, only the last infeasible index moves: finite for
positive definite matrices). When nearly every row is added (early in training) the equivalent
fixed-set form on ``Ĝ⁻¹`` solves ``|Z| x |Z|`` systems instead of ``|F| x |F|`` ones; on CPU the
systems are sorted by size and factorised in buckets.

**Nearly singular** ``Ĝ`` (duplicated rows, ``m > n``, stationary points): the multipliers are
not unique, principal blocks are singular and pivoting can cycle for ever. Lawson & Hanson's
active-set method (``_lawson_hanson``) finds the active sets instead: it adds one violated row at
a time and keeps the rows of its passive set linearly independent, so its face systems are no
larger than the rank of ``Ĝ`` (``m`` rows of rank ``r``: about ``r`` steps of ``k`` blocks of size
``<= r``). Problems its point does not already certify are polished by pivoting from there, each
face system solved as a proximal step ``(Ĝ_FF + δI) Δ = residual`` from the current point
(``δ = 1e-10``; iterated Tikhonov: exact in a step or two where ``Ĝ_FF`` is regular; in its null
directions ``y`` stays where it is, which keeps the weights small). Near full rank (the
Cholesky factorisation of ``Ĝ`` succeeds, or fails beyond its first ``m/2`` rows: a few more
losses than parameters) those proximal pivoting steps run first, from the FISTA start, and
Lawson & Hanson only takes what they leave uncertified: it would add the ~``|F|`` free rows of
each problem one by one (300 rows of rank 280: 26 s, 1.1 s now; 1024 of rank 1000: over
10 minutes, 55 s now).

**Certificate.** A problem is done when its point satisfies the KKT conditions of the
*unregularised* problem: signs within ``tol = 1e-12 · ‖p‖ + 2r · eps · ‖y‖₁`` (``‖p‖ = √(yᵀĜy)``,
the norm of the scaled projection, plus the rounding of ``λ = Ĝy``), and face equations
``|λ_F| <= tol``, or, once a step no longer reduces them, ``|λ_F| <= √eps · (‖p‖ + ‖y‖)``, the
resolution of a Gramian in float64 (a rank-deficient float64 Gramian has null eigenvalues near
1e-16, i.e. directions of size 1e-8 in the rows that no Gramian-only method can tell from 0).
Problems not certified within the iteration budget go to
:func:`jdoptim.linalg.project_weights_quadprog` (one QP at a time, also on the scaled Gramian);
none did on the test inputs or the benchmarks (``benchmarks/test_solver.py`` counts them).

**Host synchronisation.** On CPU each iteration reads the set sizes (to factorise compact
blocks) and drops certified problems from the batch. Off CPU the pivoting blocks are ``[k, m, m]``
(padded with the identity) and convergence is read every ``4`` iterations; Lawson & Hanson reads
the largest passive set once per step (its blocks are that large).
"""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.linalg._blocks import _correction, _product, _sign_tolerance
from jdoptim.linalg._dual_cone import project_weights_quadprog
from jdoptim.linalg._gramian import jacobi_scaled
from jdoptim.linalg._lawson_hanson import _lawson_hanson
from jdoptim.linalg._start import _starting_free_set

__all__ = ["project_weights"]

_BACKUP_BUDGET = 3  # Kim & Park's "p̄": full exchanges allowed without progress.
_CHECK_EVERY = 4  # Off CPU, read convergence back every this many iterations.
_DELTA = 1e-10  # Proximal shift of the factorised blocks (the scaled Gramian has a unit diagonal).
_CONDITION = 1e-4  # Block pivoting alone while diag(G⁻¹) · _DELTA stays below this.


def _reads_are_free(device: torch.device) -> bool:
    """Whether reading a value back to the host costs nothing (no device synchronisation)."""
    return device.type == "cpu"


def _solve_scaled(
    g: Tensor, u: Tensor, eps_in: float, max_iter: int, compact: bool
) -> tuple[Tensor, Tensor]:
    """Solve ``min ½ yᵀ g y`` s.t. ``y >= u`` for each row of ``u``; ``g`` has a unit diagonal.

    Returns the solutions and a mask of the certified ones (see the module notes).
    """
    r = u.shape[1]
    eta = eps_in**0.5  # what a Gramian given with precision eps_in resolves, relatively
    floor = max(_DELTA, r * eps_in)  # the smallest shift: above the Gramian's rounding
    factor, info = torch.linalg.cholesky_ex(g)
    inverse = torch.cholesky_inverse(factor) if int(info) == 0 else None
    # Well conditioned (every eigenvalue above about 1e-6, 1e4 · _DELTA): principal blocks are
    # positive definite, block pivoting is finite and exact without a shift. Otherwise it may
    # cycle among equivalent active sets: each face system is then a proximal step.
    well = inverse is not None and bool(inverse.diagonal().max() * _DELTA <= _CONDITION)
    # Nearly singular but near full rank (a batch of 300 samples of a model of 280 parameters:
    # the Cholesky factorisation fails late, or succeeds on an ill-conditioned matrix): Lawson &
    # Hanson would add the many free rows one by one, so proximal pivoting from the FISTA start
    # certifies first (300 x 280: 1.1 s against 26 s; 1024 x 1000: 55 s against more than
    # 10 min; one core). At low rank its blocks are far larger than the rank, and Lawson & Hanson
    # on the slightly regularised problem finds the active sets (256 x 8: 0.04 s against
    # 0.45 s), then block pivoting from there makes the answer exact on the unregularised one.
    y, certified = u.clone(), torch.zeros(u.shape[0], dtype=torch.bool, device=u.device)
    if int(info) == 0 or int(info) - 1 > r // 2:  # the leading info - 1 rows: independent
        fixed_set_form = inverse if well and compact else None
        shift = 0.0 if well else floor
        start = _starting_free_set(g, u)
        y, certified = _pivoting(g, u, y, start, fixed_set_form, shift, eta, max_iter, compact)
        if well or bool(certified.all()):
            return y, certified
    rest = (~certified).nonzero().squeeze(1)
    y[rest], certified[rest] = _lawson_hanson(g, u[rest], eps_in)
    if bool(certified.all()):
        return y, certified
    rest = (~certified).nonzero().squeeze(1)
    u_rest, y_rest = u[rest], y[rest]
    y[rest], certified[rest] = _pivoting(
        g, u_rest, y_rest, y_rest > u_rest, None, floor, eta, max_iter, compact
    )
    return y, certified


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
    targets = u
    proximal = floor > 0  # without a shift the inner problem is the problem: no centre
    delta = torch.full((k,), floor, dtype=dtype, device=device)
    centre = y.clone()  # each inner problem: min ½yᵀGy + δ/2 ‖y - centre‖² s.t. y >= u
    out = u.clone()
    rows = torch.arange(k, device=device)
    certified = torch.zeros(k, dtype=torch.bool, device=device)
    best = torch.full((k,), r + 1, device=device)
    budget = torch.full((k,), _BACKUP_BUDGET, device=device)
    positions = torch.arange(1, r + 1, device=device)
    previous = torch.full((k,), torch.inf, dtype=dtype, device=device)
    lam = _product(y, g, compact)  # then carried over from the end of each iteration
    for iteration in range(max_iter):
        # One block-pivoting step of the inner problem (a positive definite LCP), written as a
        # correction from the current point: its residual uses G + δI itself.
        lam_inner = lam + delta.unsqueeze(1) * (y - centre) if proximal else lam
        shift = delta if proximal else None
        y = y + _correction(g, inverse, lam_inner, u - y, free, shift, compact)
        lam = _product(y, g, compact)  # (Ĵ p)_j of the unregularised problem, p = Ĵᵀy
        lam_inner = lam + delta.unsqueeze(1) * (y - centre) if proximal else lam
        # ‖p‖, and signs to the rounding of λ = G y plus _TAU of the projection's norm.
        norm, tol = _sign_tolerance(lam, y)
        infeasible = torch.where(free, y - u < -tol, lam_inner < -tol)
        count = infeasible.sum(dim=1)
        solved = count == 0  # the inner problem: its centre moves to its solution
        # The unregularised KKT conditions: signs, and face equations λ_F = 0 to the same
        # tolerance or, once a proximal step no longer halves their residual, to what the
        # Gramian resolves (see the module notes).
        residual = (lam * free).abs_().amax(dim=1)
        loose = eta * (norm + y.norm(dim=1, keepdim=True)).squeeze(1)
        stalled = residual > 0.5 * previous
        resolved = (residual <= tol.squeeze(1)) | (stalled & (residual <= loose))
        signs = (free | (lam >= -tol)).all(dim=1)
        previous = torch.where(solved, residual, previous)
        done = solved & signs & resolved
        if proximal:
            centre = torch.where(solved.unsqueeze(1), y, centre)
        if not compact:  # every problem stays in the batch (no reads)
            out = torch.where((done & ~certified).unsqueeze(1), y, out)
            certified |= done
            if (iteration + 1) % _CHECK_EVERY == 0 and bool(certified.all()):
                break
        elif bool(done.any()):  # certified problems leave the batch
            finished = done.nonzero().squeeze(1)
            out[rows[finished]] = y[finished]
            certified[rows[finished]] = True
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            state = (rows, u, y, lam, free, infeasible, count, solved, previous, best, budget)
            rows, u, y, lam, free, infeasible, count, solved, previous, best, budget = (
                t.index_select(0, keep) for t in state
            )
            delta, centre = delta[keep], centre[keep] if proximal else centre
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
    elif not bool(certified.all()):  # the problems left in the batch are the uncertified ones
        out[rows] = y
    return torch.maximum(out, targets), certified


def project_weights(gramian: Tensor, targets: Tensor, *, max_iter: int = 30) -> Tensor:
    """Return the weights of the dual-cone projections of ``Jᵀ targets[k]``, all at once.

    Exact for every finite positive semi-definite ``G`` (singular ones included), whatever its
    dtype: the Gramian is Jacobi-scaled, all arithmetic is in float64, and each answer is
    certified by the KKT conditions of the unregularised problem (see the module notes for the
    method and tolerances): the tests compare it with an independent float64 NNLS to 1e-6
    relative (1e-4 for float32 inputs) on real-training, stationary, duplicated-row and
    spread-row inputs, with quadprog forbidden. Problems not certified within the iteration
    budget (none in the tests) are handed to :func:`jdoptim.linalg.project_weights_quadprog`.
    Among the many optimal weights of a singular problem, small ones are returned.

    Parameters
    ----------
    gramian:
        ``G = J Jᵀ``, a finite symmetric positive semi-definite matrix of shape ``[m, m]``.
    targets:
        Weight vectors ``u_k`` stacked in a ``[k, m]`` matrix.
    max_iter:
        Block-pivoting iterations (well-conditioned problems take 2 to 10; nearly singular ones
        first take Lawson & Hanson's steps, about one per active row) before uncertified
        problems are handed to :func:`jdoptim.linalg.project_weights_quadprog`.

    Returns
    -------
    Tensor
        ``[k, m]`` weights ``w_k = u_k + μ_k`` with ``μ_k >= 0`` such that ``Jᵀ w_k`` is the
        Euclidean projection of ``Jᵀ u_k`` onto ``{x : J x >= 0}``. Same dtype and device as
        ``gramian`` (weights beyond the dtype's range are clamped to it). When ``G`` is
        singular the projection is unique but ``w`` need not be.

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

    A row ``10⁸`` times smaller still bounds the cone: the projection of ``(1)`` onto
    ``{x : x >= 0, -10⁻⁸ x >= 0}`` is exactly 0.

    >>> J = torch.tensor([[1.0], [-1e-8]], dtype=torch.float64)
    >>> (project_weights(J @ J.T, torch.tensor([[1.0, 0.0]], dtype=torch.float64)) @ J).item()
    0.0
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
