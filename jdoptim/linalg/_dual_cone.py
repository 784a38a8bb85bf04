r"""Exact projection onto the dual cone of the rows of a Jacobian, from its Gramian alone.

For a Jacobian ``J`` (``[m, n]``) and a weight vector ``u`` (``[m]``), the projection of
``g = Jᵀu`` onto the dual cone ``{x : J x >= 0}`` is ``Jᵀ(u + μ)`` where

.. math::

    μ = \operatorname*{argmin}_{μ \ge 0} \lVert Jᵀ(u + μ) \rVert^2,

a non-negative least-squares problem that needs only ``G = J Jᵀ``. ``G`` is positive semi-definite,
and usually singular (duplicated rows, ``m > n``), so the problem is solved on the range of ``G``:
with ``G = U S Uᵀ`` restricted to its positive eigenvalues and ``B = U S^{1/2}`` (row ``i`` of ``B``
is row ``i`` of ``J`` in an orthonormal basis of the row space), the projection is the strictly
convex quadratic program

.. math::

    y^* = \operatorname*{argmin}_{B y \ge 0} \tfrac12 \lVert y - Bᵀu \rVert^2,

whose KKT multipliers are exactly ``μ``. The problem is solved on the Jacobi-scaled Gramian
``Ĝ = D⁻¹GD⁻¹`` (``D``: the square roots of the diagonal; rows of ``J`` scaled to unit norm,
which leaves the cone unchanged; zero rows set aside, their constraint always holds), so rows
1e12 times smaller than others keep their constraints. The only tolerance decides which
eigenvalues of ``Ĝ`` are numerically zero: ``r · eps(dtype) · λ_max(Ĝ)``, the rounding of a
unit-diagonal Gramian of ``r`` rows in its own dtype. (On ``main`` before issue 14 the cut was
relative to the unscaled ``λ_max`` and dropped rows with ``‖b_i‖² <= m · eps``: exactly the
constraints of fitted samples late in training, 0.2-1.1 relative from the exact projection.)
"""

from __future__ import annotations

import numpy as np
import quadprog
import torch
from torch import Tensor

from jdoptim.linalg._gramian import jacobi_scaled

__all__ = ["project_weights_quadprog"]


def _range_factor(gramian: np.ndarray, eps: float) -> np.ndarray:
    """Return ``B`` (``[m, r]``) with ``B Bᵀ`` equal to ``gramian`` on its numerical range."""
    eigenvalues, eigenvectors = np.linalg.eigh(gramian)
    threshold = eigenvalues[-1] * eps  # the rounding of the (scaled) Gramian: r · eps · λ_max
    keep = eigenvalues > threshold
    return eigenvectors[:, keep] * np.sqrt(eigenvalues[keep])


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``argmin_{x >= 0} ‖a x - b‖²`` by Lawson & Hanson's active-set method (exact, finite)."""
    p = a.shape[1]
    tol = 10 * max(a.shape) * np.finfo(np.float64).eps * np.abs(a).sum(axis=0).max()
    x = np.zeros(p)
    passive = np.zeros(p, dtype=bool)
    for _ in range(3 * p + 1):
        gradient = a.T @ (b - a @ x)
        candidates = np.where(passive, -np.inf, gradient)
        if passive.all() or candidates.max() <= tol:
            break
        passive[np.argmax(candidates)] = True
        while True:
            z = np.zeros(p)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            blocking = passive & (z <= 0.0)
            if not blocking.any():
                break
            step = x[blocking] - z[blocking]  # >= 0; 0 only when x_j = z_j = 0: no move
            alpha = np.min(np.divide(x[blocking], step, out=np.zeros_like(step), where=step > 0))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
        x = z
    return x


def project_weights_quadprog(gramian: Tensor, targets: Tensor) -> Tensor:
    """Return the weights of the dual-cone projections of ``Jᵀ targets[k]``, one QP at a time.

    The reference solver (quadprog on the range of ``G``, on the host, one problem after the
    other), and the fallback of :func:`jdoptim.linalg.project_weights`.

    Parameters
    ----------
    gramian:
        ``G = J Jᵀ``, a finite symmetric positive semi-definite matrix of shape ``[m, m]``.
    targets:
        Weight vectors ``u_k`` stacked in a ``[k, m]`` matrix.

    Returns
    -------
    Tensor
        ``[k, m]`` weights ``w_k = u_k + μ_k`` with ``μ_k >= 0`` such that ``Jᵀ w_k`` is the
        Euclidean projection of ``Jᵀ u_k`` onto ``{x : J x >= 0}``. Same dtype and device as
        ``gramian``.

    Examples
    --------
    Duplicated rows make the Gramian singular; the projection is still exact. Projecting
    ``(-1, 1)`` onto the dual cone of ``{(1, 0), (1, 0), (-1, 1)}`` adds ``(1, 0)`` once in all:

    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    >>> w = project_weights_quadprog(J @ J.T, torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64))
    >>> w[0] @ J
    tensor([0., 1.], dtype=torch.float64)
    """
    eps = float(torch.finfo(gramian.dtype).eps)
    u = targets.detach().to(device="cpu", dtype=torch.float64).numpy()
    weights = u.copy()
    rows, d, scaled = (t.cpu().numpy() for t in jacobi_scaled(gramian.detach().cpu()))
    if rows.size:
        # Rows of Ĵ = D⁻¹J in an orthonormal basis of its row space; targets û = D u.
        b = _range_factor(scaled, len(rows) * eps)
        identity = np.eye(b.shape[1])
        for k in range(u.shape[0]):
            c = b.T @ (u[k, rows] * d)
            if b.shape[1] == 0 or np.all(b @ c >= 0.0):
                continue  # Jᵀu_k already lies in the dual cone.
            try:
                multipliers = quadprog.solve_qp(identity, c, b.T, np.zeros(len(rows)))[4]
            except ValueError:
                # The cone always contains 0, so the QP is feasible; quadprog declares it
                # "inconsistent" only when rounding leaves a dependent constraint violated at a
                # degenerate solution (e.g. rows g and -g). The dual NNLS has no such failure.
                multipliers = _nnls(b.T, -c)
            weights[k, rows] += multipliers / d
    return torch.from_numpy(weights).to(device=gramian.device, dtype=gramian.dtype)
