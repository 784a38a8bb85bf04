"""``backward``: Jacobians of some tensors, accumulated into the ``.jac`` fields of the inputs."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

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
    initial_rows,
)
from jdoptim.autojac._jac import differentiate
from jdoptim.engine import JacobianEngine, reachable_leaves


def backward(
    tensors: Tensor | Sequence[Tensor],
    /,
    *,
    jac_tensors: Tensor | Sequence[Tensor] | None = None,
    inputs: Tensor | Iterable[Tensor] | None = None,
    retain_graph: bool = False,
    parallel_chunk_size: int | None = None,
) -> None:
    """Accumulate the Jacobian of ``tensors`` into the ``.jac`` field of each of ``inputs``.

    Every check runs before anything is written: a call that raises leaves every ``.jac``
    unchanged.

    Parameters
    ----------
    tensors:
        A tensor, or a non-empty sequence of distinct tensors computed from the inputs, of any
        shapes: their ``m`` values (flattened, concatenated) are the rows of the Jacobian.
    jac_tensors:
        Initial Jacobians to back-propagate instead of the identity, as in :func:`jac`.
    inputs:
        Leaf tensors (or tensors that retain grad) to differentiate w.r.t.; by default every leaf
        requiring grad that ``tensors`` reach. An input listed twice is counted once; an input
        that no tensor reaches gets a ``.jac`` of zeros.
    retain_graph, parallel_chunk_size:
        As in :func:`jac`.

    Notes
    -----
    A ``.jac`` already present is added to (like ``.grad``); it must have the same shape
    ``[m, *input.shape]``. NaN or inf in ``tensors`` or in the Jacobian raise a ``ValueError``.

    Examples
    --------
    >>> import torch
    >>> w = torch.tensor([1.0, -1.0], requires_grad=True)
    >>> backward([w @ w, w.sum()])
    >>> w.jac
    tensor([[ 2., -2.],
            [ 1.,  1.]])
    """
    tensors = as_tensors(tensors, "tensors")
    check_distinct(tensors, "tensors")
    check_has_graph(tensors, "tensors")
    engine = JacobianEngine(parallel_chunk_size)
    rows = initial_rows(tensors, jac_tensors, "tensors", "jac_tensors")
    if inputs is None:
        inputs = reachable_leaves(tensors)
        if not inputs:
            raise ValueError("`tensors` do not depend on any leaf tensor that requires grad")
    else:
        inputs = distinct(as_tensors(inputs, "inputs", allow_empty=True))
        check_fillable(inputs, "inputs", ".jac")
        if not inputs:
            return
    check_accumulable(inputs, rows[0].shape[0])
    check_finite(tensors, "`tensors` item")
    jacobians = differentiate(engine, tensors, rows, inputs, retain_graph)
    check_finite(jacobians, "the Jacobian w.r.t. input")
    accumulate_jacs(inputs, jacobians)
