r"""Lawson & Hanson's active-set method, batched, for the nearly singular dual-cone problems.

Each problem is the non-negative least-squares problem ``min_{μ >= 0} ‖Ĵᵀ(u + μ)‖²`` (Lawson &
Hanson, *Solving Least Squares Problems*, 1974, ch. 23), written with the scaled Gramian only:
``y = u + μ``, ``λ = Ĝy`` (the alignment of the projection ``p = Ĵᵀy`` with each row). The passive
set ``P`` (``μ_P > 0``) starts empty; each outer step adds the row that ``p`` violates most
(``λ_j`` most negative, beyond the certificate's sign tolerance); the inner steps solve the face
system ``Ĝ_PP Δ_P = -λ_P`` and, where that would make some ``μ_j`` non-positive, move only up to
the first of them and drop it from ``P``. The objective decreases at every step: no cycling.

Why it suits singular ``Ĝ``: a row is added only if ``p`` is not orthogonal to it, which (in
exact arithmetic) keeps the rows of ``P`` linearly independent, so ``|P| <= rank(Ĝ)``. For ``m``
rows of rank ``r << m`` there are about ``r`` outer steps, each factorising ``k`` blocks of size
``<= r``, whatever ``m`` is (projected Newton, used before, stepped on every row not held at its
bound: blocks of size ``~m``, tens of steps; 3.4 s of CPU time for 256 rows of rank 8, 47 ms
now, ``benchmarks/README.md``). In floating point a row nearly in the span of ``P`` makes
``Ĝ_PP`` singular to working precision: the Cholesky factor then has a pivot (squared distance
of a unit row from the span of the others) below ``10 · m · eps``, the rank cut of a Gramian
given with precision ``eps``. Such a row is not added (it is set aside for that problem). A
point that meets the certificate's strict tolerances is returned as it is; the others are
polished by pivoting on the unregularised problem (see ``_active_set``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.linalg._blocks import _factored_solve, _principal_blocks, _sign_tolerance


def _face_solve(g: Tensor, rhs: Tensor, select: Tensor, floor: float) -> tuple[Tensor, Tensor]:
    """``x`` with ``g[S, S] x_S = rhs_S`` (0 off ``S``) for each problem, and whether ``g[S, S]``
    is regular: every Cholesky pivot above ``floor`` (unit diagonal)."""
    batch = select.shape[0]
    size = int(select.sum(dim=1).max())
    if size == 0:
        return torch.zeros_like(rhs), torch.ones(batch, dtype=torch.bool, device=rhs.device)
    extended = torch.nn.functional.pad(g, (0, 1, 0, 1))
    valid, padded, block = _principal_blocks(extended, select, size)
    block.diagonal(dim1=1, dim2=2).add_((~valid).to(g.dtype))
    factor, info = torch.linalg.cholesky_ex(block)
    pivots = factor.diagonal(dim1=1, dim2=2).square()
    regular = (info == 0) & (pivots > floor).all(dim=1) & torch.isfinite(pivots).all(dim=1)
    eye = torch.eye(size, dtype=g.dtype, device=g.device)
    factor = torch.where(regular.view(-1, 1, 1), factor, eye)
    return _factored_solve(factor, block, rhs, valid, padded), regular


def _alignment(g: Tensor, base: Tensor, mu: Tensor, passive: Tensor) -> Tensor:
    """``λ = G(u + μ)`` from ``base = G u``, with ``μ`` supported on ``P``: a sparse product
    (``k · |P| · m`` operations; 4x faster than the dense ``[k, m] x [m, m]`` one at
    ``m = k = 1024``, ``|P| = 16``, and 10x faster than gathering the rows of ``G``)."""
    if not bool(passive.any()):
        return base
    return base + torch.sparse.mm((mu * passive).to_sparse(), g)


def _lawson_hanson(g: Tensor, u: Tensor, eps_in: float) -> tuple[Tensor, Tensor]:
    """Solve ``min_{y >= u} ½ yᵀ g y`` for each row of ``u`` (``g``: unit diagonal, possibly
    singular); returns ``y`` and whether it already satisfies the KKT conditions to the
    certificate's strict tolerance (the others are polished by pivoting, see the module notes)."""
    k, r = u.shape
    floor = 10 * r * eps_in
    out = u.clone()
    certified = torch.zeros(k, dtype=torch.bool, device=g.device)
    rows = torch.arange(k, device=g.device)
    base = u @ g
    y, passive = u.clone(), torch.zeros_like(u, dtype=torch.bool)
    aside = torch.zeros_like(passive)  # rows dependent on P to working precision
    inf = torch.tensor(torch.inf, dtype=g.dtype, device=g.device)
    for _ in range(3 * r + 1):  # each outer step adds a row or sets one aside
        u_rows = u[rows]
        lam = _alignment(g, base, y - u_rows, passive)
        _, tol = _sign_tolerance(lam, y)
        violated = ~passive & (lam < -tol)
        candidates = violated & ~aside
        done = ~candidates.any(dim=1)
        faces = ((lam * passive).abs_() <= tol).all(dim=1)
        certified[rows[done]] = (faces & ~violated.any(dim=1))[done]
        out[rows[done]] = y[done]
        keep = ~done
        if not bool(keep.any()):
            return out, certified
        rows, y, passive, aside, lam = (t[keep] for t in (rows, y, passive, aside, lam))
        u_rows, candidates, base = u_rows[keep], candidates[keep], base[keep]
        entering = torch.where(candidates, lam, inf).argmin(dim=1, keepdim=True)
        trial = passive.scatter(1, entering, True)
        step, regular = _face_solve(g, -(lam * trial), trial, floor)
        # The entering multiplier must come out positive (it does in exact arithmetic): if it
        # does not, or the face is singular, the row is set aside for this problem.
        grows = regular & (step.gather(1, entering).squeeze(1) > 0)
        aside = aside | (torch.zeros_like(aside).scatter(1, entering, True) & ~grows.unsqueeze(1))
        passive = torch.where(grows.unsqueeze(1), trial, passive)
        y, passive = _inner(g, base, u_rows, y, passive, step, grows, floor)
    out[rows] = y  # not converged within the budget: pivoting and certification decide
    return out, certified


def _inner(
    g: Tensor,
    base: Tensor,
    u: Tensor,
    y: Tensor,
    passive: Tensor,
    step: Tensor,
    pending: Tensor,
    floor: float,
) -> tuple[Tensor, Tensor]:
    """Lawson & Hanson's inner loop from the face step ``step``: move to the face minimiser of
    ``P``, or up to the first multiplier that reaches 0 (dropped from ``P``), until feasible."""
    for _ in range(y.shape[1] + 1):  # each pass drops at least one row of P
        mu, mu_z = y - u, y + step - u
        blocking = passive & (mu_z <= 0) & pending.unsqueeze(1)
        ratio = torch.where(blocking, mu / (mu - mu_z).clamp_min(1e-300), torch.inf)
        alpha, first = ratio.min(dim=1, keepdim=True)
        feasible = ~blocking.any(dim=1, keepdim=True)
        y = y + step * (torch.where(feasible, 1.0, alpha) * pending.unsqueeze(1))
        drop = ~feasible & (torch.zeros_like(passive).scatter(1, first, True) | (y - u <= 0))
        passive = passive & ~drop
        y = torch.where(passive, y, u)  # μ = 0 exactly off P
        pending = pending & ~feasible.squeeze(1)
        if not bool(pending.any()):
            break
        lam = _alignment(g, base, y - u, passive)
        step, regular = _face_solve(g, -(lam * passive), passive, floor)
        pending = pending & regular  # a subset of an independent set is independent
    return y, passive
