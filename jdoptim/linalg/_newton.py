"""Bertsekas' projected Newton method for the nearly singular dual-cone problems."""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.linalg._blocks import _TAU, _correction

_ARMIJO = 1e-4  # Sufficient decrease of the projected Newton steps...
_STEPS = 2.0 ** -torch.arange(0, 30, 3, dtype=torch.float64)  # ... tried in one batch.
_HANDOFF = 1e-6  # Newton stops at KKT residuals below this · (‖p‖ + ‖y‖).
_BINDING = 1e-3  # Bertsekas' ε: bound within this and pushed against it, held there.


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
    for _ in range(max_iter):
        u_rows = u[rows]
        slack = y - u_rows
        norm = (lam * y).sum(dim=1, keepdim=True).clamp_min(0).sqrt()
        tol = _TAU * norm + 2 * r * eps * y.abs().sum(dim=1, keepdim=True)
        # KKT residual: λ_j = 0 where y_j > u_j, λ_j >= 0 at the bound.
        residual = torch.where(slack > tol, lam.abs(), (-lam).clamp_min(0)).amax(dim=1)
        loose = eps_in**0.5 * (norm + y.norm(dim=1, keepdim=True)).squeeze(1)
        # Newton only has to find the active sets (pivoting polishes afterwards): it stops at
        # _HANDOFF, and certifies only at what a Gramian resolves.
        certified[rows] |= (residual <= tol.squeeze(1)) | (residual <= loose)
        done = residual <= _HANDOFF * loose / eps_in**0.5
        out[rows] = torch.where(done.unsqueeze(1), y, out[rows])
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
        first = torch.where(armijo.any(dim=0), armijo.to(torch.uint8).argmax(dim=0), -1)
        pick = torch.arange(y.shape[0], device=g.device)
        y, lam = candidates[first, pick], lam_c[first, pick]
    out[rows] = torch.where(certified[rows].unsqueeze(1), out[rows], y)
    return torch.maximum(out, u), certified
