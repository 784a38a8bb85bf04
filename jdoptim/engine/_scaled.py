r"""Gramian blocks without overflow or underflow, accumulated in float64.

A finite float32 Jacobian can have a Gramian outside float32's range (rows near ``1e19`` square to
``1e38·n``; rows near ``1e-23`` square to zero). Every engine forms its Gramian blocks from rows
scaled by powers of two, ``x̂_i = 2^{-e_i} x_i`` with ``max |x̂_i|`` in ``[½, 1)``, in the rows'
own dtype (float32 at least: fp16/bf16 pieces of an autocast forward are lifted), and maps them
back exactly in float64:

.. math::

    G_{ij} = 2^{e_i + e_j} ⟨x̂_i, x̂_j⟩.

Scaling by a power of two is exact, so for rows within the dtype's range the only rounding is
that of the products themselves. Weighted sums ``Σ_i w_i x_i`` are formed the same way: the
float64 coefficients ``w_i 2^{e_i}`` are brought to ``[-1, 1]`` by one power of two ``2^E``, the
sum is taken in the rows' dtype and multiplied by ``2^E`` at the end.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor


@functools.cache
def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the closed forms run in: the parameter's, float32 at least (a dict look-up:
    ``torch.promote_types`` is a dispatched call)."""
    return torch.promote_types(dtype, torch.float32)


def as_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)``, skipping the call (a dispatch) when ``x`` already has ``dtype``."""
    return x if x.dtype == dtype else x.to(dtype)


def _window(dtype: torch.dtype) -> int:
    """A sixth of the dtype's exponent range: products of two rows within ``2^{±k}``, summed
    over any realistic length, stay far from overflow and underflow."""
    return int(math.log2(torch.finfo(dtype).max)) // 6


def exponents(pieces: list[Tensor]) -> Tensor | None:
    """Per row (leading dim), the exponent ``e`` with ``max |x| < 2^e`` over all ``pieces``, or
    ``None`` (no scaling) when every row is within ``2^{±k}`` (see :func:`_window`); one host
    read decides, and the scaling passes are skipped in the common case."""
    return exponents_each([pieces])[0]


def exponents_each(groups: list[list[Tensor]]) -> list[Tensor | None]:
    """:func:`exponents` of each group of pieces, decided by one host read for all groups (the
    groups of one dtype and row count; others are decided apart)."""
    if not groups:
        return []
    rows = [
        torch.stack([_row_amax(p) for p in g]).amax(0) if len(g) > 1 else _row_amax(g[0])
        for g in groups
    ]
    if len({(r.shape, r.dtype) for r in rows}) > 1:
        return [exponents_each([g])[0] for g in groups]
    amax = torch.stack(rows)
    # 1 for the rows that are zero, NaN or inf (NaN compares false)
    exps = torch.frexp(torch.where((amax > 0) & (amax < math.inf), amax, 1.0)).exponent
    needs = (exps.abs() > _window(rows[0].dtype)).any(dim=1).tolist()
    return [e if need else None for e, need in zip(exps, needs, strict=True)]


def _row_amax(piece: Tensor) -> Tensor:
    rows = piece if piece.ndim == 2 else piece.reshape(piece.shape[0], -1)
    return rows.abs().amax(dim=1)


def add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """The sum of two exponent vectors, ``None`` standing for zeros."""
    return b if a is None else a if b is None else a + b


def _times_pow2(x: Tensor, e: Tensor) -> Tensor:
    """``x · 2^e`` exactly, in two factors: ``2^e`` alone may not fit ``x``'s dtype (float32
    rows near its smallest subnormal need ``2^149``)."""
    half = torch.div(e, 2, rounding_mode="floor")
    one = torch.ones((), dtype=x.dtype, device=x.device)
    return x * torch.ldexp(one, half.to(x.dtype)) * torch.ldexp(one, (e - half).to(x.dtype))


def scale_rows(x: Tensor, exps: Tensor | None) -> Tensor:
    """``x_i · 2^{-e_i}`` (exact)."""
    if exps is None:
        return x
    return _times_pow2(x, (-exps).view(-1, *([1] * (x.ndim - 1))))


def unscale_gramian(block: Tensor, exps: Tensor | None) -> Tensor:
    """``2^{e_i + e_j} block_ij`` in float64, for a block formed from rows scaled by ``exps``."""
    if exps is None:
        return block.to(torch.float64)
    scale = torch.ldexp(torch.ones_like(exps, dtype=torch.float64), exps.to(torch.float64))
    return block.to(torch.float64) * torch.outer(scale, scale)


@contextlib.contextmanager
def shared_coefficients() -> Iterator[None]:
    """Within the block, :func:`coefficients` of exponent-free rows are formed once per weights
    tensor and dtype: the layers of one step share one host read (the engines hold the weights
    unchanged while they form the updates)."""
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


_SHARED: contextvars.ContextVar[dict[Any, Any] | None] = contextvars.ContextVar(
    "jdoptim_shared_coefficients", default=None
)


def coefficients(
    weights: Tensor, exps: Tensor | None, dtype: torch.dtype
) -> tuple[Tensor, Tensor | None]:
    """``c`` in ``dtype`` and ``E`` with ``Σ_i w_i x_i = 2^E Σ_i c_i x̂_i`` (``E = None``: 0).

    The float64 coefficients ``w_i 2^{e_i}`` are used as they are when they fit ``dtype``
    comfortably (one host read decides); otherwise they are brought to ``|c_i| <= 1``. Within
    :func:`shared_coefficients`, the answer without ``exps`` is formed once.
    """
    if exps is not None:
        full = torch.ldexp(as_dtype(weights, torch.float64), exps.to(torch.float64))
        return _coefficients(full, dtype)
    shared = _SHARED.get()
    if shared is None:
        return _coefficients(as_dtype(weights, torch.float64), dtype)
    key = (id(weights), dtype)  # the entry holds the tensor: its id is not reused meanwhile
    if key not in shared:
        shared[key] = (weights, _coefficients(as_dtype(weights, torch.float64), dtype))
    return shared[key][1]


def _coefficients(full: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    top = full.abs().amax()
    window = 2.0 ** _window(dtype)
    if 1 / window <= float(top) <= window:
        return full.to(dtype), None
    shift = torch.frexp(
        torch.where(torch.isfinite(top) & (top > 0), top, top.new_ones(()))
    ).exponent
    return torch.ldexp(full, -shift.to(torch.float64)).to(dtype), shift


def rescale(x: Tensor, shift: Tensor | None) -> Tensor:
    """``x · 2^shift``."""
    return x if shift is None else _times_pow2(x, shift)


class ScaledRows:
    """Rows ``[m, k]`` kept as ``2^{-e_i}``-scaled rows; Gramian in float64, weighted sums.

    Examples
    --------
    >>> import torch
    >>> rows = ScaledRows(torch.tensor([[3e19, 4e19], [1e-23, 0.0]]))
    >>> rows.gramian()
    tensor([[2.5000e+39, 3.0000e-04],
            [3.0000e-04, 1.0000e-46]], dtype=torch.float64)
    >>> rows.combine(torch.tensor([0.0, 1.0], dtype=torch.float64))
    tensor([1.0000e-23, 0.0000e+00])
    """

    __slots__ = ("exps", "scaled")

    def __init__(self, rows: Tensor, *, prescaled: bool = False, exps: Tensor | None = None):
        """``rows`` ``[m, ...]``; ``prescaled``: already scaled by ``2^{-exps}``."""
        rows = rows.reshape(rows.shape[0], -1)
        rows = as_dtype(rows, compute_dtype(rows.dtype))
        if not prescaled:
            exps = exponents([rows])
            rows = scale_rows(rows, exps)
        self.exps, self.scaled = exps, rows

    def gramian(self) -> Tensor:
        return unscale_gramian(self.scaled @ self.scaled.T, self.exps)

    def combine(self, weights: Tensor) -> Tensor:
        """``Σ_i w_i x_i`` (flat)."""
        coef, shift = coefficients(weights, self.exps, self.scaled.dtype)
        return rescale(coef @ self.scaled, shift)
