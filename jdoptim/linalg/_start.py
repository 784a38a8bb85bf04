r"""The starting free sets of block pivoting: a few FISTA steps on every problem at once.

Block pivoting (``_active_set``) converges in a few iterations from a good guess of each
problem's free set ``F`` (the rows with ``y_j > u_j`` at the solution) and in many from a poor
one: after a face solve on too small a set it adds every violated row at once and overshoots
(on real ``m = 1024`` Gramians about a third of those additions are right). The guess is read from
an iterate of FISTA (accelerated projected gradient, step ``1/λ_max``) on
``min_{v >= u} ½ vᵀĜv``, run in float32 (only the set matters; half the cost of float64
products).

How many steps pay depends on the size. A step costs one ``[k, m] x [m, m]`` product; a
pivoting iteration a batched Cholesky factorisation of every problem's face plus a handful of
``[k, m]`` operations, each with a fixed overhead. For ``m <= _SMALL`` the steps cost microseconds
(the overhead of three operations) and ``_MANY_STEPS`` of them bring the iterate close to the
solution: the rows off their bound are nearly the final free set (real ``m = 64`` and ``256``
Gramians: 0-2 rows off per problem, one to three pivoting iterations instead of six to eleven).
Close to the solution the free rows have ``λ_j ≈ 0`` of either sign, so a row is kept unless a
few more steps at its current rate would bring it back to its bound.

For larger ``m`` a step costs as much as a product of the pivoting (26 ms at ``m = 1024`` on
one core): ``_FEW_STEPS`` are taken, and the early iterate overshoots: rows it has moved off
their bound but that no longer push against it (``λ_j >= 0``) mostly return to it, so only the
rows that still push are kept (on real ``m = 1024`` Gramians this halves the first blocks, for a
few more missing rows). Where the guess is still large, more steps pay: at initialisation the
per-sample gradients of a classifier conflict widely (on the digits MLP 64-256-256-10, B = 1024,
921 of 1024 rows conflict with each one), 16 steps leave ~393 rows per problem where ~132 are
free, and the first factorisations (``Σ|F|³/3`` multiply-adds) took 2.9 s. Steps continue by
``_CHUNK`` while those factorisations would cost more than the chunk's products, at most
``_MAX_STEPS``. Batched Cholesky runs ~15 times slower per operation than a float32 product here
(one core: 4.5-6.4 against 80 GFlop/s); ``_CHOLESKY_SLOWDOWN`` takes 10, since longer runs also
leave more rows missing (24 steps on the trained Gramians below made them slower). That
Gramian's weights: 9.3 → 4.3-4.9 s (one core, CPU time); the real Gramians of
``tests/_realdata.py`` (m = 1024, trained and not) stop at 16 steps as before. Where most rows
are free at the solution (the grid's CNN at initialisation: ~800 of 1024), the guess grows with
the steps instead (203 rows, then 472): the first guess whose cost does not fall ends the steps
and the previous one is kept (that Gramian: 8.5 s with the growing guess, 4.2 s with 16 steps).
"""

from __future__ import annotations

import torch
from torch import Tensor

_SMALL = 256  # Problems of up to this many rows take _MANY_STEPS.
_MANY_STEPS = 64
_FEW_STEPS = 16
_CHUNK = 8  # Larger problems: steps added at a time while the guess is large,
_MAX_STEPS = 48  # up to this many in all.
_CHOLESKY_SLOWDOWN = 10.0  # Batched Cholesky's cost per operation over a float32 product's.
_REACH = 16.0  # Small problems: a row is kept unless _REACH more steps would bring it back.
_POWER_STEPS = 30  # Power iterations for the step size,
_NORMALISE_EVERY = 5  # normalised every this many (λ_max^5 stays representable).


def _step_bound(gramian: Tensor) -> Tensor:
    """A Lipschitz constant for the starting guess: ``λ_max`` by power iteration, plus 5 %.

    Capped by ``‖G‖₁ >= λ_max``. On real m = 1024 Gramians ``λ_max`` is 0.67x ``‖G‖₁``: longer
    steps, a tighter start (161 rows per problem instead of 198 for as many correct ones).
    """
    x = torch.linspace(1.0, 2.0, gramian.shape[0], dtype=gramian.dtype, device=gramian.device)
    for step in range(_POWER_STEPS):
        x = torch.mv(gramian, x)
        if step % _NORMALISE_EVERY == 0:  # enough to keep x far from overflow and underflow
            x = x / x.norm().clamp_min(torch.finfo(x.dtype).tiny)
    x = x / x.norm().clamp_min(torch.finfo(x.dtype).tiny)
    return torch.minimum(1.05 * (x @ gramian @ x), torch.linalg.matrix_norm(gramian, 1))


def _starting_free_set(gramian: Tensor, targets: Tensor) -> Tensor:
    """Each problem's guessed free set: the rows a FISTA iterate has moved off their bound and
    keeps off it (see the module notes)."""
    small = gramian.shape[0] <= _SMALL
    steps = _MANY_STEPS if small else _FEW_STEPS
    step = (1.0 / _step_bound(gramian)).float()
    g = gramian.float()
    descent = g * -step  # v - step · v G as one addmm
    u = targets.float()
    v = y = u
    t = 1.0
    taken, best, best_cost = 0, None, float("inf")
    while True:
        for _ in range(steps - taken):
            v_next = torch.maximum(torch.addmm(y, y, descent), u)
            t_next = (1.0 + (1.0 + 4.0 * t * t) ** 0.5) / 2.0
            y = torch.lerp(v_next, v, (1.0 - t) / t_next)  # v_next + (t - 1)/t_next (v_next - v)
            v, t = v_next, t_next
        lam = v @ g
        if small:
            return (v - u) > _REACH * step * lam
        guess = (v > u) & (lam < 0)
        cost = _factorisation_cost(guess)
        if cost >= best_cost:  # the guess grows (most rows free at the solution): keep the last
            return best
        best, best_cost = guess, cost
        taken, steps = steps, steps + _CHUNK
        if taken >= _MAX_STEPS or cost <= _CHUNK * guess.shape[0] * guess.shape[1] ** 2:
            return guess


def _factorisation_cost(guess: Tensor) -> float:
    """The first factorisations of the faces of ``guess`` (``Σ|F|³/3``), in float32 product
    operations (see the module notes), to compare with ``_CHUNK`` more steps (``_CHUNK``
    products of ``[k, m] x [m, m]``)."""
    sizes = guess.sum(dim=1).to(torch.float64)
    return float(sizes.pow(3).sum()) / 3 * _CHOLESKY_SLOWDOWN
