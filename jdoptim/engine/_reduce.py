"""Aggregation of per-tensor Jacobian blocks without concatenating them when possible.

Blocks may differ in dtype (a model with float32 and float64 parameters): the Gramian is then
accumulated in the promoted dtype, each block's update is formed in the block's own dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import reduce

import torch
from torch import Tensor

from jdoptim.aggregation._bases import GramianWeightedAggregator


def total(tensors: Sequence[Tensor]) -> Tensor:
    """Return the sum of a non-empty sequence of tensors of one shape.

    After the first addition the sum is accumulated in place, into the tensor that addition
    created (no input is modified; one allocation instead of one per term: the terms of a
    per-sample Gramian at B = 1024 are 8 MB each).
    """
    result = tensors[0]
    for k, t in enumerate(tensors[1:]):
        same = t.dtype == result.dtype  # spares the dispatched promote_types in the usual case
        if k > 0 and (same or result.dtype == torch.promote_types(result.dtype, t.dtype)):
            result += t
        else:
            result = result + t
    return result


def gramian(jacobians: Sequence[Tensor]) -> Tensor:
    """Return ``G = Σ_k J_k J_kᵀ`` for blocks ``J_k`` of shape ``[m, *shape_k]``.

    Each product is formed in its block's dtype and summed in the dtypes' promotion (``float64``
    when float32 and float64 blocks meet).

    Examples
    --------
    >>> import torch
    >>> gramian([torch.ones(2, 3), torch.ones(2, 1, dtype=torch.float64)])
    tensor([[4., 4.],
            [4., 4.]], dtype=torch.float64)
    """
    blocks = [j.reshape(j.shape[0], -1) for j in jacobians]
    dtype = reduce(torch.promote_types, [b.dtype for b in blocks])
    result: Tensor | None = None
    for block in blocks:
        if block.dtype != dtype:
            product = (block @ block.T).to(dtype)
            result = product if result is None else result.add_(product)
        else:
            result = block @ block.T if result is None else result.addmm_(block, block.T)
    return result  # type: ignore[return-value]


def weighted_blocks(weights: Tensor, jacobians: Sequence[Tensor]) -> list[Tensor]:
    """Return ``Σ_i w_i J_k[i]`` for each block ``J_k``, in the block's dtype."""
    return [torch.tensordot(weights.to(j.dtype), j, dims=1) for j in jacobians]


def concat_rows(jacobians: Sequence[Tensor]) -> Tensor:
    """Return the ``[m, n]`` matrix whose column blocks are ``jacobians`` (dtypes promoted)."""
    return torch.cat([j.reshape(j.shape[0], -1) for j in jacobians], dim=1)


def split_update(update: object, jacobians: Sequence[Tensor]) -> list[Tensor]:
    """Split an aggregator's ``[n]`` update into one tensor per block, checking its shape."""
    n = sum(j[0].numel() for j in jacobians)
    if not isinstance(update, Tensor) or update.shape != (n,):
        raise ValueError(
            f"the aggregator must return a vector of shape [{n}], got "
            f"{tuple(update.shape) if isinstance(update, Tensor) else type(update).__name__}"
        )
    return [
        u.view(j.shape[1:])
        for u, j in zip(update.split([j[0].numel() for j in jacobians]), jacobians, strict=True)
    ]


def aggregate_jacobians(
    jacobians: Sequence[Tensor], aggregator: Callable[[Tensor], Tensor]
) -> list[Tensor]:
    """Aggregate the Jacobian whose column blocks are ``jacobians`` and split the result back.

    A :class:`~jdoptim.aggregation.GramianWeightedAggregator` only sees the Gramian, computed block
    by block, and the update ``Jᵀ w`` is formed block by block too; any other aggregator gets the
    concatenated ``[m, n]`` matrix.
    """
    if isinstance(aggregator, GramianWeightedAggregator) and not aggregator.observes_matrix:
        return weighted_blocks(aggregator.weights_from_gramian(gramian(jacobians)), jacobians)
    return split_update(aggregator(concat_rows(jacobians)), jacobians)
