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

whose KKT multipliers are exactly ``μ``. No regularisation moves the answer: the only tolerance is
the one that decides which eigenvalues of ``G`` are numerically zero (``eps(dtype) · λ_max``, the
rounding unit of ``G``'s largest eigenvalue in its own dtype: below it, an eigenvalue cannot be told
from the rounding of ``G``; a larger ``m · eps`` factor dropped real directions of float32
Gramians, e.g. a 33% error at ``m = 128`` for a Jacobian with condition number 370).
The problem is scale-free: ``G`` is divided by its largest diagonal entry first.
"""

from __future__ import annotations

import numpy as np
import quadprog
import torch
from torch import Tensor

__all__ = ["project_weights_quadprog"]


def _range_factor(gramian: np.ndarray, eps: float) -> np.ndarray:
    """Return ``B`` (``[m, r]``) with ``B Bᵀ`` equal to ``gramian`` on its numerical range."""
    eigenvalues, eigenvectors = np.linalg.eigh(gramian)
    threshold = eigenvalues[-1] * eps  # the rounding unit of λ_max in the dtype of G
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
    m = gramian.shape[0]
    eps = float(torch.finfo(gramian.dtype).eps)
    g = gramian.detach().to(device="cpu", dtype=torch.float64).numpy()
    u = targets.detach().to(device="cpu", dtype=torch.float64).numpy()
    weights = u.copy()
    scale = float(np.max(np.diag(g), initial=0.0))
    if scale > 0.0:
        g = (g + g.T) / (2.0 * scale)
        b = _range_factor(g, eps)
        # Constraints of rows that vanish on the range (zero gradients) can never be active.
        active_rows = np.flatnonzero(np.einsum("ij,ij->i", b, b) > m * eps)
        constraints = b[active_rows]
        identity = np.eye(b.shape[1])
        for k in range(u.shape[0]):
            c = b.T @ u[k]
            if b.shape[1] == 0 or np.all(constraints @ c >= 0.0):
                continue  # Jᵀu_k already lies in the dual cone.
            try:
                multipliers = quadprog.solve_qp(
                    identity, c, constraints.T, np.zeros(len(active_rows))
                )[4]
            except ValueError:
                # The cone always contains 0, so the QP is feasible; quadprog declares it
                # "inconsistent" only when rounding leaves a dependent constraint violated at a
                # degenerate solution (e.g. rows g and -g). The dual NNLS has no such failure.
                multipliers = _nnls(constraints.T, -c)
            weights[k, active_rows] += multipliers
    return torch.from_numpy(weights).to(device=gramian.device, dtype=gramian.dtype)
