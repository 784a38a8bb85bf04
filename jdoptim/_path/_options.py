"""What a :class:`~jdoptim.JacobianOptimizer` keeps: its arguments, checked, turned into engines.

``configure`` checks the constructor's arguments and builds the engines and the exchange group
(:data:`CONFIGURATION`, kept by copies and pickles); ``fresh`` is the state of one instance's
steps, which a copy or an unpickled optimizer starts afresh; ``setup_of`` is the configuration
as the path reads it for one call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from jdoptim._distributed import resolve_group
from jdoptim._path._collect import Setup
from jdoptim._path._engines import gramian_engine_for
from jdoptim._scalarized import check_scalarizer_options, path_for
from jdoptim._validation import check_options
from jdoptim.aggregation import UPGrad
from jdoptim.diagnostics import StepRecordHooks
from jdoptim.engine import JacobianEngine
from jdoptim.scalarization import Scalarizer

CONFIGURATION = (
    "optimizer",
    "aggregator",
    "shared_params",
    "grad_scaler",
    "engine",
    "gramian_engine",
    "cross_rank",
    "process_group",
)


def configure(
    optimizer: Optimizer,
    aggregator: Callable[[Tensor], Tensor] | None,
    shared_params: Iterable[Tensor] | None,
    grad_scaler: torch.amp.GradScaler | None,
    parallel_chunk_size: int | None,
    batch_dim: int | None,
    path: str,
    cross_rank: str | None,
    mixing_check_every: int | None,
    module: torch.nn.Module | None,
    process_group: object,
) -> dict[str, Any]:
    """The optimizer's configuration (the names of :data:`CONFIGURATION`), then its
    :func:`fresh` state; raises on the first invalid argument, before any hook is installed."""
    aggregator = UPGrad() if aggregator is None else aggregator
    if isinstance(aggregator, Scalarizer):
        check_scalarizer_options(shared_params, batch_dim, path)
    shared, cross_rank = check_options(
        optimizer,
        aggregator,
        shared_params,
        grad_scaler,
        batch_dim,
        path,
        cross_rank,
        mixing_check_every,
        module,
    )
    group = resolve_group(process_group)
    gramian_engine = gramian_engine_for(
        optimizer,
        aggregator,
        shared,
        batch_dim,
        path,
        parallel_chunk_size,
        mixing_check_every,
        module,
    )
    engine = JacobianEngine(parallel_chunk_size)
    kept = (optimizer, aggregator, shared, grad_scaler, engine, gramian_engine, cross_rank, group)
    return {**dict(zip(CONFIGURATION, kept, strict=True)), **fresh(aggregator)}


def fresh(aggregator: object) -> dict[str, Any]:
    """What a new optimizer, a copy and an unpickled one start from: no kept micro-batches, no
    step-record hooks, no ``.grad`` written."""
    return {
        "_path": path_for(aggregator),  # kept micro-batches, the last step's record
        "_step_record_hooks": StepRecordHooks(),
        "_grad_written": False,  # by backward(), since the last step or zero_grad
    }


def setup_of(optimizer: Any) -> Setup:
    """The configuration of ``optimizer`` (a ``JacobianOptimizer``) as the path reads it."""
    return Setup(
        engine=optimizer.engine,
        gramian_engine=optimizer.gramian_engine,
        aggregator=optimizer.aggregator,
        shared=optimizer.shared_params,
        cross_rank=optimizer.cross_rank,
        scaler=optimizer.grad_scaler,
        process_group=optimizer.process_group,
    )
