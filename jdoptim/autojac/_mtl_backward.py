"""``mtl_backward``: task gradients into ``.grad``, Jacobians into the trunk's ``.jac``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from jdoptim.autojac._checks import (
    accumulate_jacs,
    as_tensors,
    check_accumulable,
    check_distinct,
    check_fillable,
    check_finite,
    check_has_graph,
    distinct,
)
from jdoptim.autojac._jac import differentiate
from jdoptim.engine import JacobianEngine, reachable_leaves


def _grad_tensors(tensors: list[Tensor], grad_tensors: object) -> list[Tensor]:
    if grad_tensors is None:
        for i, t in enumerate(tensors):
            if t.numel() != 1:
                raise ValueError(
                    f"`tensors[{i}]` has shape {tuple(t.shape)}: non-scalar tensors need "
                    "`grad_tensors`"
                )
        return [torch.ones_like(t) for t in tensors]
    grads = as_tensors(grad_tensors, "grad_tensors")
    if len(grads) != len(tensors):
        raise ValueError(
            f"`grad_tensors` should have the same length as `tensors` (got {len(grads)} and "
            f"{len(tensors)})"
        )
    for i, (g, t) in enumerate(zip(grads, tensors, strict=True)):
        if g.shape != t.shape:
            raise ValueError(
                f"`grad_tensors[{i}]` has shape {tuple(g.shape)}, `tensors[{i}]` {tuple(t.shape)}"
            )
    return grads


def _params(
    tensors: list[Tensor],
    features: list[Tensor],
    tasks_params: Sequence[Iterable[Tensor]] | None,
    shared_params: Iterable[Tensor] | None,
) -> tuple[list[list[Tensor]], list[Tensor]]:
    if tasks_params is None:
        tasks = [reachable_leaves([t], stop_at=features) for t in tensors]
    else:
        tasks = [distinct(as_tensors(p, "tasks_params", allow_empty=True)) for p in tasks_params]
        if len(tasks) != len(tensors):
            raise ValueError(
                f"`tasks_params` should have one entry per tensor (got {len(tasks)} for "
                f"{len(tensors)} tensors)"
            )
    if shared_params is None:
        shared = reachable_leaves(features)
    else:
        shared = distinct(as_tensors(shared_params, "shared_params", allow_empty=True))
    for params in tasks:
        check_fillable(params, "tasks_params", ".grad")
    check_fillable(shared, "shared_params", ".jac")
    shared_ids = {id(p) for p in shared}
    for i, params in enumerate(tasks):
        common = [p for p in params if id(p) in shared_ids]
        if common:
            raise ValueError(
                f"a parameter of shape {tuple(common[0].shape)} is both in the parameters of "
                f"task {i} and in the shared parameters: `tasks_params` and `shared_params` "
                "must not overlap"
            )
    return tasks, shared


def mtl_backward(
    tensors: Tensor | Sequence[Tensor],
    /,
    features: Tensor | Sequence[Tensor],
    *,
    grad_tensors: Sequence[Tensor] | None = None,
    tasks_params: Sequence[Iterable[Tensor]] | None = None,
    shared_params: Iterable[Tensor] | None = None,
    retain_graph: bool = False,
    parallel_chunk_size: int | None = None,
) -> None:
    """Backward pass of multi-task learning: task gradients into ``.grad``, shared ``.jac``.

    Each task parameter gets the gradient of its task's tensor (added to ``.grad``; a parameter
    of several tasks gets the sum, one its task does not reach gets zeros). Each shared parameter
    gets (added to ``.jac``) the Jacobian of the task tensors, one row per task, computed from
    their gradients w.r.t. ``features``: one backward per task through its head, then one batched
    pass through the shared trunk. Every check runs first: a call that raises writes nothing.

    Parameters
    ----------
    tensors:
        One tensor per task (a single tensor: one task), distinct; scalars unless
        ``grad_tensors`` is given.
    features:
        The last shared representation(s), read by every task head (distinct tensors).
    grad_tensors:
        One gradient per task tensor, of its shape (as ``torch.autograd.backward``); by default
        ones, for scalar tensors.
    tasks_params:
        For each task, its own parameters; by default the leaves its tensor reaches without
        going through ``features``.
    shared_params:
        The parameters of the shared trunk; by default the leaves that ``features`` reach. They
        must not overlap with the task parameters; one that no task reaches gets zeros.
    retain_graph, parallel_chunk_size:
        As in :func:`jac`.

    Examples
    --------
    >>> import torch
    >>> from jdoptim.aggregation import UPGrad
    >>> from jdoptim.autojac import jac_to_grad
    >>> trunk, heads = torch.nn.Linear(3, 4), [torch.nn.Linear(4, 1) for _ in range(2)]
    >>> h = trunk(torch.randn(8, 3))
    >>> losses = [head(h).pow(2).mean() for head in heads]
    >>> mtl_backward(losses, features=h)
    >>> trunk.weight.jac.shape, heads[0].weight.grad.shape
    (torch.Size([2, 4, 3]), torch.Size([1, 4]))
    >>> weights = jac_to_grad(trunk.parameters(), UPGrad())
    """
    tensors = as_tensors(tensors, "tensors")
    check_distinct(tensors, "tensors")
    check_has_graph(tensors, "tensors")
    features = as_tensors(features, "features")
    check_distinct(features, "features")
    check_has_graph(features, "features")
    engine = JacobianEngine(parallel_chunk_size)
    grads = _grad_tensors(tensors, grad_tensors)
    tasks, shared = _params(tensors, features, tasks_params, shared_params)
    check_accumulable(shared, len(tensors))
    check_finite(tensors, "`tensors` item")
    # One backward per task through its head: its parameters' gradient and its feature rows.
    task_grads, feature_rows = [], []
    for t, g, params in zip(tensors, grads, tasks, strict=True):
        wrt = [*params, *features]
        got = torch.autograd.grad(t, wrt, g, retain_graph=True, allow_unused=True)
        got = [torch.zeros_like(x) if d is None else d for d, x in zip(got, wrt, strict=True)]
        task_grads.append(got[: len(params)])
        feature_rows.append(got[len(params) :])
    rows = [torch.stack([r[k] for r in feature_rows]) for k in range(len(features))]
    check_finite([g for gs in task_grads for g in gs], "the gradient w.r.t. a task parameter")
    check_finite(rows, "the Jacobian w.r.t. feature")
    jacobians = differentiate(engine, features, rows, shared, retain_graph) if shared else []
    check_finite(jacobians, "the Jacobian w.r.t. shared parameter")
    for params, gs in zip(tasks, task_grads, strict=True):
        for p, g in zip(params, gs, strict=True):
            p.grad = g if p.grad is None else p.grad + g
    accumulate_jacs(shared, jacobians)
