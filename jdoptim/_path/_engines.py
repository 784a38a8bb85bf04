"""Which Gramian engine an optimizer's options call for, and over which parameters."""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import Tensor, nn
from torch.optim import Optimizer

from jdoptim.aggregation import GramianWeightedAggregator
from jdoptim.engine import LayerGramianEngine, PerSampleEngine
from jdoptim.scalarization import Scalarizer


def trainable(optimizer: Optimizer) -> list[Tensor]:
    """The parameters that require grad, each once (torch warns about a parameter listed twice
    in a group and keeps it twice; its Jacobian columns and its ``.grad`` are counted once)."""
    params = {
        id(p): p for group in optimizer.param_groups for p in group["params"] if p.requires_grad
    }
    return list(params.values())


def gramian_engine_for(
    optimizer: Optimizer,
    aggregator: Callable[[Tensor], Tensor],
    shared: list[Tensor] | None,
    batch_dim: int | None,
    path: str,
    parallel_chunk_size: int | None,
    mixing_check_every: int | None,
    module: nn.Module | None,
) -> PerSampleEngine | LayerGramianEngine | None:
    """The engine of ``path="auto"``/``"gramian"`` (options already checked); ``None``: the
    Jacobian engine alone.

    With ``batch_dim``, the per-sample engine over the trainable parameters (re-read at each
    ``refresh``); with ``shared_params`` and an aggregator of the Gramian, or ``path="gramian"``,
    the layer-Gramian engine over the shared (or all trainable) parameters. The engines hook
    the owners of those parameters among ``module``'s submodules, or found by a heap scan.
    """
    if path == "jacobian" or isinstance(aggregator, Scalarizer):
        return None
    params = functools.partial(trainable, optimizer)
    roots = None if module is None else [module]
    if batch_dim is not None:
        return PerSampleEngine(params, parallel_chunk_size, mixing_check_every, roots)
    if path == "gramian" or (
        shared is not None and isinstance(aggregator, GramianWeightedAggregator)
    ):
        aggregated = params if shared is None else functools.partial(list, shared)
        return LayerGramianEngine(aggregated, parallel_chunk_size, roots)
    return None
