r"""The Gramian ``G = J Jᵀ`` of any finite matrix, in float64, without overflow or underflow.

A float32 matrix whose entries are near ``1e19`` has a finite Gramian that float32 cannot hold
(``1e38`` times ``n``), and one with entries near ``1e-23`` has a Gramian that float32 flushes to
zero; float16 overflows as soon as a row's norm exceeds 256. The Gramian is therefore always
accumulated in float64:

* **float32, float16, bfloat16.** Products of two such numbers are exact in float64 (at most 48
  significant bits) and their squares stay far inside float64's range (``3.4e38² · n`` and
  ``(1.4e-45)²`` are both representable), so the result is ``J Jᵀ`` to float64 rounding: more
  accurate than a Gramian formed in the input dtype, at every scale.
* **float64.** Rows whose largest entry lies outside ``[2^-450, 2^450]`` are first multiplied by a
  power of two that brings it into ``[1/2, 1)`` (exact: only exponents change), and the product is
  scaled back by the same powers of two. An entry is then exact to float64 rounding whenever it is
  representable: it overflows to ``inf`` only when ``‖J_i‖ ‖J_j‖`` exceeds ``1.8e308`` and loses
  relative precision only below ``2.2e-308`` (rows of norm ``~1e±154``).

The columns are processed in chunks, so the float64 copy never exceeds a few tens of MiB
whatever ``n`` is.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gramian", "jacobi_scaled", "trim_gramian"]

_CHUNK_ELEMENTS = 2**22  # float64 elements of one column chunk: 32 MiB.
_SAFE_EXPONENT = 450  # float64 rows with max |J_ij| in [2^-450, 2^450] need no scaling.


def _row_exponents(matrix: Tensor) -> Tensor:
    """Integer ``e_i`` with ``max_j |J_ij| · 2^-e_i`` in ``[1/2, 1)`` (0 for zero rows)."""
    largest = matrix.abs().amax(dim=1)
    return torch.frexp(largest).exponent.to(torch.float64)


def gramian(matrix: Tensor) -> Tensor:
    """Return ``J Jᵀ`` in float64 for a finite floating-point matrix ``J`` of shape ``[m, n]``.

    Never overflows or underflows for float32, float16 and bfloat16 input (the result is exact to
    float64 rounding); float64 input is exact whenever the result itself is representable (see
    the module notes).

    Parameters
    ----------
    matrix:
        A finite ``[m, n]`` floating-point tensor (any device).

    Returns
    -------
    Tensor
        The symmetric ``[m, m]`` float64 Gramian, on ``matrix``'s device.

    Raises
    ------
    ValueError
        If ``matrix`` is not a two-dimensional floating-point tensor.

    Examples
    --------
    A float32 Jacobian with entries near ``1e19`` (its float32 Gramian would be ``inf``):

    >>> import torch
    >>> J = torch.tensor([[3e19, 0.0], [1e19, 2e19]])
    >>> gramian(J)
    tensor([[9.0000e+38, 3.0000e+38],
            [3.0000e+38, 5.0000e+38]], dtype=torch.float64)
    """
    if matrix.ndim != 2 or not matrix.is_floating_point():
        raise ValueError(
            f"expected a floating-point matrix of shape [m, n], got {matrix.dtype} of shape "
            f"{tuple(matrix.shape)}"
        )
    m, n = matrix.shape
    f64 = torch.float64
    scale = None
    if matrix.dtype == f64 and m > 0 and n > 0:
        exponents = _row_exponents(matrix)
        if bool((exponents.abs() > _SAFE_EXPONENT).any()):
            scale = exponents
            low = torch.floor(scale / 2)  # exact halves: each 2^part fits in float64
            high = scale - low
    result = torch.zeros(m, m, dtype=f64, device=matrix.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(m, 1))
    for start in range(0, n, chunk):
        block = matrix[:, start : start + chunk].to(f64)
        if scale is not None:
            block = block * torch.exp2(-low).unsqueeze(1) * torch.exp2(-high).unsqueeze(1)
        result.addmm_(block, block.T)
    if scale is not None:
        for part in (low, high):  # 2^(e_i + e_j) one representable power of two at a time
            factor = torch.exp2(part)
            result = result * factor.unsqueeze(1) * factor.unsqueeze(0)
    # Mirror the upper triangle: exactly symmetric, whatever the product's rounding.
    return torch.triu(result) + torch.triu(result, diagonal=1).T


def jacobi_scaled(gramian: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(rows, d, Ĝ)``: the rows with a positive diagonal, ``d = √G_ii`` on them, and
    ``Ĝ = D⁻¹ G D⁻¹`` restricted to them (float64, exactly symmetric, unit diagonal).

    The Gramian of the rows of ``J`` scaled to unit norm: ``{x : J x >= 0}`` does not change.
    Zero rows (``G_ii = 0``) are left out: their constraint always holds.
    """
    g = gramian.detach().to(torch.float64)
    g = torch.triu(g) + torch.triu(g, diagonal=1).mT  # symmetric by mirroring, no rounding
    diagonal = g.diagonal()
    rows = (diagonal > 0).nonzero().squeeze(1)
    d = diagonal[rows].sqrt()
    # |G_ij| <= d_i d_j, so neither division can overflow.
    scaled = g[rows][:, rows] / d.unsqueeze(1) / d.unsqueeze(0)
    return rows, d, scaled


def trim_gramian(gramian: Tensor, eps: float) -> Tensor:
    r"""Remove from a Gramian the directions that rounding of ``J`` at precision ``eps`` creates.

    ``J`` stored in a dtype of machine epsilon ``eps`` has each row perturbed by up to
    ``eps/2`` of its norm, so the rows scaled to unit norm, ``Ĵ``, are known only up to a
    perturbation of spectral norm ``√r · eps/2``: an eigenvalue of ``Ĝ = Ĵ Ĵᵀ`` below
    ``θ = r · eps²`` can be created by rounding alone (a rank-deficient float64 matrix rounded
    to float32 becomes full-rank, with eigenvalues near ``1e-14``). Those eigenvalues are set to
    zero: ``G' = D Ĝ_θ D``, the Gramian of rows each moved by at most ``√θ`` of its norm. This
    matters for exactly singular problems stored in low precision (the stationary families of
    issue 14): on the unrounded rows the dual cone is a subspace and the projection has small
    weights; rounded, it is a thin wedge whose exact projection needs weights near ``1/eps``,
    which an update formed in the input dtype cannot carry.

    Costs one Cholesky factorisation of ``Ĝ - θI``; the eigendecomposition runs only when that
    fails (some eigenvalue is below ``θ``). A no-op for ``eps`` of float64 (``θ`` far below
    float64's rounding of ``Ĝ``).

    Parameters
    ----------
    gramian:
        A float64 Gramian (e.g. from :func:`gramian`).
    eps:
        Machine epsilon of the dtype ``J`` was stored in.

    Returns
    -------
    Tensor
        The float64 Gramian ``G'``.

    Examples
    --------
    Two float32 rows that are parallel up to rounding keep a rank-one Gramian:

    >>> import torch
    >>> J = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0 + 2**-23]])
    >>> g = trim_gramian(gramian(J), torch.finfo(torch.float32).eps)
    >>> float(torch.linalg.eigvalsh(g)[0]) < 1e-12
    True
    """
    g = gramian.to(torch.float64)
    if eps <= torch.finfo(torch.float64).eps:
        return g
    rows, d, scaled = jacobi_scaled(g)
    r = rows.numel()
    threshold = r * eps * eps
    identity = torch.eye(r, dtype=torch.float64, device=g.device)
    if r == 0 or int(torch.linalg.cholesky_ex(scaled - threshold * identity).info) == 0:
        return g
    eigenvalues, eigenvectors = torch.linalg.eigh(scaled)
    kept = torch.where(eigenvalues >= threshold, eigenvalues, 0.0)
    trimmed = (eigenvectors * kept) @ eigenvectors.mT
    trimmed = (trimmed + trimmed.mT) / 2 * d.unsqueeze(1) * d.unsqueeze(0)
    out = torch.zeros_like(g)
    out[rows.unsqueeze(1), rows.unsqueeze(0)] = trimmed
    return out
