"""The path of one ``backward``: collect → combine → weigh → write.

``collect`` (:mod:`._collect`)
    Differentiate this call's losses: Jacobian blocks, or the per-layer pieces of a Gramian
    engine, divided by the ``GradScaler``'s scale.
``combine`` (:mod:`._combine`)
    Keep the part while accumulating micro-batches; on the final call, combine the kept parts and
    the ranks into the global Jacobian (or Gramian).
``weigh`` (:mod:`._weigh`)
    The aggregator turns the global Gramian into weights (or the Jacobian into an update); a
    :class:`StepRecord` keeps what it saw.
``write`` (:mod:`._write`)
    Every parameter's update into ``.grad`` in its dtype, at the scaled level, all or nothing; an
    overflow under the ``GradScaler`` writes non-finite gradients so that the scaler skips.

The plain step is one micro-batch on one rank. The walk only goes down: optimizer → path →
engines, aggregators and collectives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from jdoptim._distributed import current_exchange
from jdoptim._fsdp import is_sharded, shard_group, unsharded
from jdoptim._path._collect import Setup, choose_route, collect
from jdoptim._path._combine import Parts, new_parts
from jdoptim._path._sharded import ShardedParts
from jdoptim._path._weigh import StepRecord, Weigh
from jdoptim._path._write import check_finite_updates, write, write_overflow
from jdoptim._validation import NonFiniteError, as_loss_vector
from jdoptim.engine import NonFiniteGramianError

__all__ = ["Path", "Setup", "StepRecord", "autocast_off"]


class Path:
    """One optimizer's path, and what it keeps between calls.

    Attributes
    ----------
    pending:
        The parts kept by ``backward(..., accumulate=True)``, or ``None``.
    bytes_sent:
        Bytes this rank sent in the last cross-rank exchange.
    record:
        The :class:`StepRecord` of the last call that weighed, or ``None``.
    observe:
        Whether the weigh stage also records ``J u`` (and ``J Jᵀ`` for an aggregator of the
        matrix): set while per-step diagnostics listen.
    """

    def __init__(self) -> None:
        self.pending: Parts | ShardedParts | None = None
        self.ranks_synced = False  # the aggregator state was given rank 0's
        self.bytes_sent = 0
        self.record: StepRecord | None = None
        self._weighed: Weigh | None = None  # the last call's weigh stage, for undo()
        self.observe = False

    def backward(
        self, losses: object, params: Sequence[Tensor], setup: Setup, accumulate: bool
    ) -> Tensor:
        """Run the path for ``losses``; return them flattened and detached.

        With ``accumulate``, keep this call's part and write nothing. A call that raises writes
        nothing, leaves the aggregator's state as it was and drops the kept parts.
        """
        params = list(params)
        sharded = is_sharded(params)  # FSDP2: exchange over the shards' mesh, by shards
        group = shard_group(params, setup.process_group) if sharded else setup.process_group
        leaves = unsharded(params) if sharded else None  # FSDP2: the graph's leaves, read once
        exchange = current_exchange(group)
        pending, self.pending = self.pending, None
        combined = exchange is not None or accumulate or pending is not None
        route = "sharded" if sharded else choose_route(setup, combined)
        summed_only = _summed_only(params, setup.shared)
        if pending is None and sharded:
            pending = ShardedParts(params, leaves, setup.cross_rank, summed_only, setup.aggregator)
        elif pending is None:
            pending = new_parts(route, setup.cross_rank, params, summed_only)
        elif pending.route != route:
            raise RuntimeError("the aggregator or the parameters changed during accumulation")
        scale = setup.scale()

        # collect
        vector, error = None, None
        try:
            with torch.enable_grad():
                # Under an enabled GradScaler, non-finite losses are an overflow: the scaler skips.
                vector = as_loss_vector(losses, check_finite=scale is None)
                if not sharded:
                    pending.add(collect(route, vector, params, setup, summed_only, scale, leaves))
        except Exception as e:
            if exchange is None or (accumulate and not sharded):
                raise
            error = e  # raised on every rank by the exchange below
        if sharded:  # FSDP2's backward all-gathers shards: every rank runs it, or none does
            if exchange is not None:
                exchange.agree(None, error)
            with torch.enable_grad():
                pending.add(collect(route, vector, params, setup, summed_only, scale, leaves))
        if accumulate:
            self.pending = pending
            return vector.detach()  # type: ignore[union-attr]
        if exchange is not None and not self.ranks_synced:
            exchange.sync_state(setup.aggregator)
            self.ranks_synced = True

        # combine, weigh, write
        weigh = Weigh(setup.aggregator, route, self.observe)
        try:
            updates = pending.weighed(weigh, exchange, error)
            check_finite_updates(params, updates)
        except (NonFiniteError, NonFiniteGramianError):
            weigh.rollback()
            if scale is None or error is not None:
                raise
            write_overflow(params)  # the GradScaler's overflow: it skips the step
            return vector.detach()  # type: ignore[union-attr]  # nothing weighed to record
        except BaseException:
            weigh.rollback()
            raise
        else:
            write(params, updates, scale)
        finally:
            if exchange is not None:
                self.bytes_sent = exchange.bytes_sent
        weigh.record.losses = vector.detach()  # type: ignore[union-attr]
        self.record, self._weighed = weigh.record, weigh
        return vector.detach()  # type: ignore[union-attr]

    def undo(self) -> None:
        """Give the aggregator the state it had before the last call weighed (the step failed
        after ``backward``: in the wrapped optimizer's ``step``)."""
        if self._weighed is not None:
            self._weighed.rollback()
            self._weighed = None


def _summed_only(params: Sequence[Tensor], shared: Sequence[Tensor] | None) -> frozenset[int]:
    """The ids of the parameters that get the summed gradient (outside ``shared_params``)."""
    if shared is None:
        return frozenset()
    return frozenset(id(p) for p in params) - {id(p) for p in shared}


@contextlib.contextmanager
def autocast_off() -> Iterator[None]:
    """Run the Jacobian and the aggregation in the parameters' dtypes, even inside an autocast
    region (Lightning's mixed precision runs the whole training step, ``step`` included, under
    autocast; the losses were already computed there)."""
    with contextlib.ExitStack() as stack:
        for device in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield
