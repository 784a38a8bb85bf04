"""Weigh: the single place where the global Gramian (or Jacobian) becomes weights or an update.

Every route of the path goes through :class:`Weigh`: the Jacobian route calls
:meth:`Weigh.jacobian` on the combined blocks; the Gramian engines call :meth:`Weigh.weights`
on the Gramian they form. What the aggregator saw and returned is kept in a :class:`StepRecord`,
which per-step diagnostics read; a failed step restores the aggregator's state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from jdoptim._aggregator_state import snapshot
from jdoptim._validation import check_finite_jacobians
from jdoptim.aggregation import GramianWeightedAggregator
from jdoptim.engine._reduce import concat_rows, gramian, split_update, weighted_blocks


@dataclass
class StepRecord:
    """What the weigh stage of one step saw and returned.

    Attributes
    ----------
    losses:
        This rank's loss vector of the call that weighed (detached; still scaled under a
        ``GradScaler``).
    m:
        The number of global losses (micro-batches and ranks combined), the size of the Gramian.
    gramian:
        The global Gramian ``[m, m]`` the weights came from (unscaled), or ``None`` when the
        aggregator received the Jacobian matrix itself.
    weights:
        The weights ``[m]`` (``None`` for an aggregator that is not weight-based).
    route:
        How the Jacobian was differentiated: ``"jacobian"`` (batched VJPs), ``"samples"`` (the
        per-sample engine) or ``"layers"`` (the layer-Gramian engine).
    """

    route: str
    losses: Tensor | None = None
    m: int = 0
    gramian: Tensor | None = None
    weights: Tensor | None = None


class Weigh:
    """Turn the global Jacobian (or its Gramian) into weights and per-parameter updates.

    Parameters
    ----------
    aggregator:
        The optimizer's aggregator: any callable ``[m, n] -> [n]``; a
        :class:`~jdoptim.aggregation.GramianWeightedAggregator` only sees the Gramian.
    route:
        The route of the path (kept in the record).
    """

    def __init__(self, aggregator: Callable[[Tensor], Tensor], route: str) -> None:
        self.aggregator = aggregator
        self.record = StepRecord(route)
        self._saved: dict[str, Any] | None = None

    def weights(self, gramian: Tensor) -> Tensor:
        """The aggregator's weights ``[m]`` for the global ``gramian`` (engines call this).

        The weights come in the Gramian's dtype (the promotion of the blocks' dtypes: float64
        when float32 and float64 parameters meet); a caller casts them to each block's dtype.
        """
        self._save_state()
        weights = self.aggregator.weights_from_gramian(gramian)  # type: ignore[attr-defined]
        self.record.m, self.record.gramian, self.record.weights = gramian.shape[0], gramian, weights
        return weights

    def jacobian(
        self, blocks: Sequence[Tensor | None], summed: Sequence[bool]
    ) -> list[Tensor | None]:
        """Per parameter, its update from the global Jacobian ``blocks``.

        ``blocks[k]`` is ``None`` (no loss reaches parameter ``k``), its rows ``[m, *shape]``, or,
        where ``summed[k]``, the summed gradient ``[1, *shape]`` (a parameter outside
        ``shared_params``: it gets that sum, not an aggregation).
        """
        if all(b is None for b in blocks):
            raise ValueError("the losses do not depend on any parameter of the wrapped optimizer")
        check_finite_jacobians(blocks)
        rows = [b for b, s in zip(blocks, summed, strict=True) if b is not None and not s]
        if not rows:
            raise ValueError("the losses do not depend on any of the shared_params")
        self.record.m = rows[0].shape[0]
        if isinstance(self.aggregator, GramianWeightedAggregator):
            updates = iter(weighted_blocks(self.weights(gramian(rows)), rows))
        else:
            self._save_state()
            updates = iter(split_update(self.aggregator(concat_rows(rows)), rows))
        return [
            None if b is None else b.sum(dim=0) if s else next(updates)
            for b, s in zip(blocks, summed, strict=True)
        ]

    def rollback(self) -> None:
        """Give the aggregator back the state it had before this step weighed (a failed step)."""
        if self._saved is not None:
            self.aggregator.load_state_dict(self._saved)  # type: ignore[attr-defined]

    def _save_state(self) -> None:
        self._saved = snapshot(self.aggregator)
