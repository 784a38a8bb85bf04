"""``jac``: the Jacobians of some outputs w.r.t. some inputs, returned as a tuple."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from jdoptim.autojac._checks import (
    as_tensors,
    check_differentiable,
    check_distinct,
    distinct,
    initial_rows,
)
from jdoptim.engine import JacobianEngine, reachable_leaves


def differentiate(
    engine: JacobianEngine,
    outputs: Sequence[Tensor],
    rows: Sequence[Tensor],
    inputs: Sequence[Tensor],
    retain_graph: bool,
) -> list[Tensor]:
    """``Σ_k rows[k] · ∂outputs[k]/∂x`` for each ``x`` of ``inputs`` (zeros when unreached).

    A repeated input is differentiated once and its Jacobian returned at each position.
    """
    unique = distinct(inputs)
    m = rows[0].shape[0]
    result = engine.vjps(outputs, rows, unique, retain_graph=retain_graph)
    by_id = {
        id(x): torch.zeros((m, *x.shape), dtype=x.dtype, device=x.device) if j is None else j
        for x, j in zip(unique, result, strict=True)
    }
    return [by_id[id(x)] for x in inputs]


def jac(
    outputs: Tensor | Sequence[Tensor],
    inputs: Tensor | Iterable[Tensor] | None = None,
    *,
    jac_outputs: Tensor | Sequence[Tensor] | None = None,
    retain_graph: bool = False,
    parallel_chunk_size: int | None = None,
) -> tuple[Tensor, ...]:
    """Return the Jacobian of ``outputs`` w.r.t. each of ``inputs``.

    Parameters
    ----------
    outputs:
        A tensor, or a non-empty sequence of distinct tensors, of any shapes: their ``m`` values
        (each tensor flattened, then concatenated) are the rows of the Jacobian.
    inputs:
        A tensor or an iterable of tensors that require grad (leaves or not). By default, the leaf
        tensors requiring grad that ``outputs`` depend on, in the order the graph reaches them.
        An empty iterable gives an empty tuple.
    jac_outputs:
        Initial Jacobians to back-propagate instead of the identity (the chain rule): one tensor
        per output, of shape ``[k, *output.shape]``, all with the same number ``k`` of rows.
    retain_graph:
        Keep the graph for later differentiation.
    parallel_chunk_size:
        Rows differentiated per batched backward pass (``None``: all at once; ``1``: one at a
        time, without ``torch.vmap``).

    Returns
    -------
    tuple[Tensor, ...]
        One Jacobian of shape ``[m, *input.shape]`` per input, in the order of ``inputs`` (a
        repeated input appears twice); zeros for an input that no output reaches.

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> h = x**2
    >>> jac([h.sum(), torch.stack([x.prod(), x[0]])], x)
    (tensor([[2., 4.],
            [2., 1.],
            [1., 0.]]),)

    The chain rule, in two steps:

    >>> (j_h,) = jac(h.sum() * x.sum(), h, retain_graph=True)
    >>> jac(h, x, jac_outputs=j_h)
    (tensor([[ 6., 12.]]),)
    """
    outputs = as_tensors(outputs, "outputs")
    check_distinct(outputs, "outputs")
    check_differentiable(outputs, "outputs")
    engine = JacobianEngine(parallel_chunk_size)
    rows = initial_rows(outputs, jac_outputs, "outputs", "jac_outputs")
    if inputs is None:
        inputs = reachable_leaves(outputs)
    else:
        inputs = as_tensors(inputs, "inputs", allow_empty=True)
        check_differentiable(inputs, "inputs")
    if not inputs:
        return ()
    return tuple(differentiate(engine, outputs, rows, inputs, retain_graph))
