"""``jac_to_grad``: aggregate the ``.jac`` fields of some tensors into their ``.grad`` fields."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from jdoptim.aggregation import GramianWeightedAggregator, WeightedAggregator
from jdoptim.autojac._checks import as_tensors, check_distinct, check_finite
from jdoptim.engine._reduce import gramian


def _jacobians(tensors: list[Tensor]) -> list[Tensor]:
    missing = [i for i, t in enumerate(tensors) if getattr(t, "jac", None) is None]
    if missing:
        raise ValueError(
            f"the tensors at positions {missing[:10]} hold no .jac field: call backward() or "
            "mtl_backward() on them first"
        )
    for i, t in enumerate(tensors):
        if t.jac.ndim == 0 or t.jac.shape[1:] != t.shape:
            raise ValueError(
                f"tensor {i} has shape {tuple(t.shape)} but its .jac has shape "
                f"{tuple(t.jac.shape)}: expected [m, *tensor.shape]"
            )
    rows = sorted({t.jac.shape[0] for t in tensors})
    if len(rows) != 1:
        raise ValueError(f"the .jac fields have different numbers of rows: {rows}")
    return [t.jac.detach() for t in tensors]


def _aggregate(
    aggregator: Callable[[Tensor], Tensor], matrix: Tensor
) -> tuple[Tensor, Tensor | None]:
    """``aggregator(matrix)`` (its forward hooks run), and the weights it used if it has some."""
    weighting = getattr(aggregator, "weighting", None)
    if isinstance(aggregator, WeightedAggregator) and not hasattr(
        weighting, "register_forward_hook"
    ):
        check_finite([matrix], "the Jacobian")  # a weighting that is no nn.Module: no hooks
        weights = aggregator.weights(matrix)
        return weights.to(matrix.dtype) @ matrix, weights
    captured: list[Tensor] = []
    handle = None
    if isinstance(aggregator, WeightedAggregator):
        handle = weighting.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        update = aggregator(matrix)
    finally:
        if handle is not None:
            handle.remove()
    if not isinstance(update, Tensor) or update.shape != (matrix.shape[1],):
        raise ValueError(
            f"the aggregator must return a vector of shape [{matrix.shape[1]}], got "
            f"{tuple(update.shape) if isinstance(update, Tensor) else update!r}"
        )
    return update, (captured[-1] if captured else None)


def jac_to_grad(
    tensors: Tensor | Iterable[Tensor],
    /,
    aggregator: Callable[[Tensor], Tensor],
    *,
    retain_jac: bool = False,
    optimize_gramian_computation: bool = False,
) -> Tensor | None:
    """Aggregate the ``.jac`` fields of ``tensors`` into their ``.grad`` fields.

    The ``.jac`` fields (each ``[m, *tensor.shape]``) are the column blocks of one ``[m, n]``
    Jacobian ``J``; the aggregator turns it into one update, split back and added to each
    ``.grad``. Blocks of different dtypes are aggregated in the widest one; each ``.grad`` gets
    its tensor's dtype.

    Parameters
    ----------
    tensors:
        Distinct tensors that all hold a ``.jac`` with the same number of rows (usually
        ``model.parameters()`` after :func:`backward`).
    aggregator:
        An :class:`~jdoptim.aggregation.Aggregator`, or any callable ``[m, n] -> [n]``.
    retain_jac:
        Keep the ``.jac`` fields (they are deleted by default).
    optimize_gramian_computation:
        With a :class:`~jdoptim.aggregation.GramianWeightedAggregator`, never concatenate ``J``:
        sum the Gramians of the blocks, take the weights from the aggregator's
        ``weights_from_gramian`` and form ``Jᵀ w`` block by block (less memory). The aggregator
        itself is then not called, so only the hooks of its Gramian weighting run. By default
        the aggregator is called on the concatenated ``J`` (its forward hooks run).

    Returns
    -------
    Tensor or None
        The weights ``w`` (shape ``[m]``) when the aggregator is a
        :class:`~jdoptim.aggregation.WeightedAggregator` (the update is then ``Jᵀ w``), else
        ``None``.

    Examples
    --------
    >>> import torch
    >>> from jdoptim.aggregation import UPGrad
    >>> from jdoptim.autojac import backward
    >>> w = torch.tensor([1.0, -1.0], requires_grad=True)
    >>> backward([w @ w, w.sum()])
    >>> jac_to_grad([w], UPGrad())  # the two gradients are orthogonal: no conflict
    tensor([0.5000, 0.5000])
    >>> w.grad
    tensor([ 1.5000, -0.5000])
    """
    tensors = as_tensors(tensors, "tensors")
    check_distinct(tensors, "tensors")
    if not callable(aggregator):
        raise TypeError(f"aggregator must be callable, got {type(aggregator).__name__}")
    jacobians = _jacobians(tensors)
    dtype = functools.reduce(torch.promote_types, [j.dtype for j in jacobians])
    with torch.no_grad():
        if optimize_gramian_computation and isinstance(aggregator, GramianWeightedAggregator):
            weights = aggregator.weights_from_gramian(gramian([j.to(dtype) for j in jacobians]))
            updates = [torch.tensordot(weights.to(j.dtype), j, dims=1) for j in jacobians]
        else:  # one [m, n] matrix, in the widest dtype of the blocks
            matrix = torch.cat([j.reshape(j.shape[0], -1).to(dtype) for j in jacobians], dim=1)
            update, weights = _aggregate(aggregator, matrix)
            sizes = [t.numel() for t in tensors]
            updates = [
                u.view_as(t).to(t.dtype) for u, t in zip(update.split(sizes), tensors, strict=True)
            ]
    for t, g in zip(tensors, updates, strict=True):
        t.grad = g if t.grad is None else t.grad + g
        if not retain_jac:
            del t.jac
    return weights
