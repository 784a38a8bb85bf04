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

__all__ = ["gramian"]

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
