"""Write: the updates into ``.grad``, all or nothing, at the level a ``GradScaler`` expects."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from jdoptim._fsdp import local
from jdoptim._validation import NonFiniteError
from jdoptim.engine._scaled import as_dtype
from jdoptim.linalg._finite import all_finite


def check_finite_updates(params: Sequence[Tensor], updates: Sequence[Tensor | None]) -> None:
    """Raise a :class:`NonFiniteError` naming the first update that holds NaN or inf."""
    reached = [(k, local(u)) for k, u in enumerate(updates) if u is not None]  # FSDP2: shards
    if all_finite([u for _, u in reached]):
        return
    k = next(k for k, u in reached if not bool(torch.isfinite(u).all()))
    raise NonFiniteError(
        f"the update of parameter {k} (shape {tuple(params[k].shape)}) holds NaN or inf: the "
        "gradients overflow or hold NaN or inf"
    )


def write(params: Sequence[Tensor], updates: Sequence[Tensor | None], scale: float | None) -> None:
    """Add each update (times ``scale``) to its parameter's ``.grad``, in the parameter's dtype.

    Every new ``.grad`` is formed before the first is assigned: a failure writes nothing.
    """
    with torch.no_grad():
        grads = []
        for p, u in zip(params, updates, strict=True):
            if u is None:
                continue
            u = as_dtype(u if scale is None else u * scale, p.dtype)
            grads.append((p, u if p.grad is None else p.grad + u))
    for p, g in grads:
        p.grad = g


def write_overflow(params: Sequence[Tensor]) -> None:
    """Make every ``.grad`` non-finite, so that ``GradScaler.step`` skips the step."""
    write(params, [torch.full_like(p, float("inf")) for p in params], None)
