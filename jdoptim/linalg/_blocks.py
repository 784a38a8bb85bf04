"""Batched solves of the face systems of the dual-cone projection (see ``_active_set``)."""

from __future__ import annotations

import torch
from torch import Tensor

_REFINEMENTS = 1  # Iterative refinements of each free-set solve.
_CHUNK_ELEMENTS = 2**22  # Problems per batched solve: their [chunk, f, f] blocks stay under this.
_BUCKET = 32  # Problems factorised together at one block size (CPU).
_TAU = 1e-12  # Certificate: KKT residuals within _TAU · ‖projection‖ (plus the rounding floor).
_SPARSE = 0.1  # x @ g as a sparse product when at most this fraction of x is non-zero (CPU)
_SPARSE_ROWS = 256  # and g has at least this many rows (below, the dense product is faster).


def _sign_tolerance(lam: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The projection's norm ``‖p‖ = √(yᵀĜy)`` (from ``λ = Ĝy``) and the certificate's sign
    tolerance: ``_TAU · ‖p‖`` plus the rounding of ``λ``, each ``[k, 1]``."""
    eps = torch.finfo(y.dtype).eps
    norm = (lam * y).sum(dim=1, keepdim=True).clamp_min(0).sqrt()
    return norm, _TAU * norm + 2 * y.shape[1] * eps * y.abs().sum(dim=1, keepdim=True)


def _product(x: Tensor, g: Tensor, compact: bool) -> Tensor:
    """``x @ g``, as a sparse product when ``x`` is mostly zeros and reads are free (``compact``).

    Pivoting's points are ``u`` off the free set, so for UPGrad's targets (``u_k = e_k``) a row
    holds about ``|F| + 1`` non-zeros, and its corrections off ``F`` only the few rows that left
    ``F``. With one thread at ``m = k = 1024`` the sparse product takes 0.65x the dense one's time
    at 8 % non-zeros, 0.14x at 1 %; at ``m = 128`` it is slower from 3 % on, at ``m = 64`` always.
    """
    if not compact or g.shape[0] < _SPARSE_ROWS:
        return x @ g
    nonzeros = int(torch.count_nonzero(x))
    if nonzeros == 0:
        return x.new_zeros(x.shape[0], g.shape[1])
    if nonzeros <= _SPARSE * x.numel():
        return torch.sparse.mm(x.to_sparse(), g)
    return x @ g


def _cholesky_solve(factor: Tensor, rhs: Tensor) -> Tensor:
    """Two triangular solves (5x faster than ``torch.cholesky_solve`` on CPU batches)."""
    y = torch.linalg.solve_triangular(factor, rhs, upper=False)
    return torch.linalg.solve_triangular(factor.mT, y, upper=True)


def _correction(
    g: Tensor,
    inverse: Tensor | None,
    lam: Tensor,
    fix: Tensor,
    free: Tensor,
    delta: Tensor | None,
    compact: bool,
) -> Tensor:
    """Return ``Δ`` with ``Δ_Z = fix_Z`` and ``((G + δI) Δ)_F = -λ_F`` for each problem.

    ``λ`` is the current point's residual in its inner problem, so ``y + Δ`` solves that problem
    on the face ``F`` (a correction, so the rounding of earlier steps is corrected too). Each
    problem has its own shift ``δ`` (``delta``, ``[k]``; ``None``: no shift).

    Two equivalent forms, and the one with the smaller systems is used: on the free set,
    ``A_FF Δ_F = -λ_F - A_FZ fix_Z`` (``A = G + δI``); on the fixed set, ``Δ = H(-λ + ν)`` with
    ``H = A⁻¹`` (given as ``inverse``, for one common ``δ``), ``ν`` supported on ``Z`` and
    ``H_ZZ ν_Z = fix_Z + (Hλ)_Z``. When nearly every row is added (per-sample Gramians early in
    training: 62 of 64), the second form solves ``2 x 2`` systems instead of ``62 x 62`` ones.
    Without ``inverse`` (off CPU: no reads; or ``G`` nearly singular) the first form is used.
    """
    m = free.shape[1]
    fixed_part = fix * ~free
    n_free, n_fixed = m, m
    if compact:
        counts = free.sum(dim=1)
        n_free, n_fixed = int(counts.max()), m - int(counts.min())
    if inverse is not None and n_fixed < n_free:
        nu = _block_solve(inverse, fixed_part + lam @ inverse, ~free, n_fixed, None, compact)
        return (nu - lam) @ inverse
    rhs = (lam + _product(fixed_part, g, compact)).neg_()
    if delta is not None:
        rhs -= delta.unsqueeze(1) * fixed_part
    return fixed_part + _block_solve(g, rhs, free, n_free, delta, compact)


def _block_solve(
    matrix: Tensor,
    rhs: Tensor,
    select: Tensor,
    size: int,
    shift: Tensor | None = None,
    compact: bool = False,
) -> Tensor:
    """Solve ``(matrix + shift I)[S, S] x_S = rhs_S`` for each problem (``S``: its ``select``
    row; ``shift``: its own ``δ``, 0 when ``None``), 0 off ``S``.

    ``size`` bounds every ``|S|``. The problems are solved in chunks, so that the gathered blocks
    (``[chunk, size, size]``, gathered directly) stay within a few tens of MiB
    however large ``k`` and ``m`` are. With ``compact`` (set sizes readable for free: CPU), the
    problems are sorted by ``|S|`` and each chunk of ``_BUCKET`` problems is factorised at its own
    largest size: the cost is ``Σ |S|³`` rather than ``k · max |S|³`` (3x less at ``m = 256``).
    """
    batch, m = select.shape
    if batch == 0 or size == 0:
        return torch.zeros_like(rhs)
    if shift is None:
        shift = torch.zeros(batch, dtype=rhs.dtype, device=rhs.device)
    # The padding points at an extra zero row and column ``m`` (padded once for all chunks).
    extended = torch.nn.functional.pad(matrix, (0, 1, 0, 1))
    if compact and batch > _BUCKET:
        counts = select.sum(dim=1)
        order = torch.argsort(counts)
        out = torch.empty_like(rhs)
        for part in order.split(_BUCKET):
            bucket = int(counts[part].max())
            if bucket == 0:
                out[part] = 0.0
                continue
            out[part] = _block_solve_chunk(extended, rhs[part], select[part], bucket, shift[part])
        return out
    chunk = max(1, _CHUNK_ELEMENTS // (size * size + m))
    if batch <= chunk:
        return _block_solve_chunk(extended, rhs, select, size, shift)
    return torch.cat(
        [
            _block_solve_chunk(extended, b, s, size, d)
            for b, s, d in zip(
                rhs.split(chunk), select.split(chunk), shift.split(chunk), strict=True
            )
        ]
    )


def _block_solve_chunk(
    extended: Tensor, rhs: Tensor, select: Tensor, size: int, shift: Tensor
) -> Tensor:
    """One batch of ``_block_solve`` (``extended``: the matrix, padded with a zero row and
    column)."""
    valid, padded, block = _principal_blocks(extended, select, size)
    block.diagonal(dim1=1, dim2=2).add_(torch.where(valid, shift.unsqueeze(1), 1.0))
    return _factored_solve(torch.linalg.cholesky(block), block, rhs, valid, padded)


def _principal_blocks(extended: Tensor, select: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``[batch, size, size]`` principal blocks ``matrix[S, S]`` of each problem's set ``S``
    (``extended``: the matrix padded with a zero row and column ``m``), with the indices they
    use: ``valid`` (which of the ``size`` positions hold a selected index) and ``padded`` (those
    indices, in no particular order, and ``m`` elsewhere). The padding part of a block is zero:
    the caller puts a unit diagonal there, so that the blocks come padded with an identity block.

    The indices come from an unsorted top-``size`` of the indicator (``size >= |S|``: every
    selected index is among them; 6x faster than a stable sort of ``[1024, 1024]`` indicators for
    ``size = 17``, no host synchronisation) and the blocks from one gather of the flattened matrix
    (1.8x faster than two-index advanced indexing at ``m = 1024``)."""
    batch, m = select.shape
    chosen, indices = torch.topk(select.to(torch.uint8), size, dim=1, sorted=False)
    valid = chosen.bool()
    padded = torch.where(valid, indices, m)
    flat = (padded * (m + 1)).unsqueeze(2) + padded.unsqueeze(1)
    block = extended.view(-1).index_select(0, flat.view(-1)).view(batch, size, size)
    return valid, padded, block


def _factored_solve(
    factor: Tensor, block: Tensor, rhs: Tensor, valid: Tensor, padded: Tensor
) -> Tensor:
    """``x`` with ``block x_S = rhs_S`` (0 off ``S``), from ``block``'s Cholesky ``factor`` and
    the indices of :func:`_principal_blocks`, with ``_REFINEMENTS`` iterative refinements."""
    extended = torch.nn.functional.pad(rhs, (0, 1))
    b = extended.gather(1, padded).unsqueeze(2)
    x = _cholesky_solve(factor, b)
    for _ in range(_REFINEMENTS):
        x = x + _cholesky_solve(factor, b - block @ x)
    # The padding positions point at the spare column m, dropped after the scatter.
    return torch.zeros_like(extended).scatter_(1, padded, x.squeeze(2) * valid)[:, :-1]
