"""The one place where autogram reaches into the per-sample engine (:mod:`jdoptim.engine`).

Autogram needs only the Gramian of per-sample losses, with the graph kept for the user's
``losses.backward(weights)``; the per-sample engine computes it from one backward pass of the
summed losses and the recorded layer inputs and output gradients (closed forms), differentiating
the parameters it cannot explain by batched VJPs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from jdoptim.engine import JacobianEngine, PerSampleEngine
from jdoptim.engine._per_sample import combine_parts


class _RetainingJacobianEngine(JacobianEngine):
    """Batched VJPs that always keep the graph (the caller back-propagates through it later)."""

    def vjps(
        self,
        outputs: Sequence[Tensor],
        rows: Sequence[Tensor],
        inputs: Sequence[Tensor],
        *,
        retain_graph: bool = False,
    ) -> list[Tensor | None]:
        return super().vjps(outputs, rows, inputs, retain_graph=True)


class PerSampleGramian:
    """Gramians of per-sample losses w.r.t. ``params()``, from the per-sample engine.

    Constructing it installs the engine's forward hook, which records the calls of the layers
    that own the parameters while grad is enabled; each :meth:`gramian` forgets the records.
    """

    def __init__(self, params: Callable[[], list[Tensor]]) -> None:
        self._engine = PerSampleEngine(params)
        self._engine._fallback = _RetainingJacobianEngine()

    def gramian(self, losses: Tensor, params: Sequence[Tensor]) -> Tensor:
        """The ``[m, m]`` Gramian of the ``m`` losses (loss ``i`` depends on sample ``i`` only)."""
        part = self._engine.collect(losses, params)
        captured: list[Tensor] = []

        def capture(gram: Tensor) -> Tensor:
            captured.append(gram)
            return torch.zeros(gram.shape[0], dtype=gram.dtype, device=gram.device)

        combine_parts([part], params, capture)
        return captured[0]

    def clear(self) -> None:
        """Forget the recorded layer calls."""
        self._engine.clear()
