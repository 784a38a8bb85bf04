"""Aggregation of per-tensor Jacobian blocks without concatenating them when possible."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from jdoptim.aggregation._bases import GramianWeightedAggregator


def total(tensors: Sequence[Tensor]) -> Tensor:
    """Return the sum of a non-empty sequence of tensors of one shape."""
    result = tensors[0]
    for t in tensors[1:]:
        result = result + t
    return result


def gramian(jacobians: Sequence[Tensor]) -> Tensor:
    """Return ``G = Σ_k J_k J_kᵀ`` for blocks ``J_k`` of shape ``[m, *shape_k]``."""
    blocks = [j.reshape(j.shape[0], -1) for j in jacobians]
    result = blocks[0] @ blocks[0].T
    for block in blocks[1:]:
        result = result.addmm_(block, block.T)
    return result


def aggregate_jacobians(
    jacobians: Sequence[Tensor], aggregator: Callable[[Tensor], Tensor]
) -> list[Tensor]:
    """Aggregate the Jacobian whose column blocks are ``jacobians`` and split the result back.

    A :class:`~jdoptim.aggregation.GramianWeightedAggregator` only sees the Gramian, computed block
    by block, and the update ``Jᵀ w`` is formed block by block too; any other aggregator gets the
    concatenated ``[m, n]`` matrix.
    """
    if isinstance(aggregator, GramianWeightedAggregator) and not aggregator.observes_matrix:
        weights = aggregator.weights_from_gramian(gramian(jacobians))
        return [torch.tensordot(weights, j, dims=1) for j in jacobians]
    matrix = torch.cat([j.reshape(j.shape[0], -1) for j in jacobians], dim=1)
    update = aggregator(matrix)
    if not isinstance(update, Tensor) or update.shape != (matrix.shape[1],):
        raise ValueError(
            f"the aggregator must return a vector of shape [{matrix.shape[1]}], got "
            f"{tuple(update.shape) if isinstance(update, Tensor) else type(update).__name__}"
        )
    return [
        u.view_as(j[0])
        for u, j in zip(update.split([j[0].numel() for j in jacobians]), jacobians, strict=True)
    ]
