"""The one place where autogram reaches into the per-sample engine (:mod:`jdoptim.engine`).

Autogram needs only the Gramian of per-sample losses, with the graph kept for the user's
``losses.backward(weights)``; the per-sample engine computes it from one backward pass of the
summed losses and the recorded layer inputs and output gradients (closed forms), differentiating
the parameters it cannot explain by batched VJPs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from jdoptim.engine import PerSampleEngine
from jdoptim.engine._assembly import combine_parts


class PerSampleGramian:
    """Gramians of per-sample losses w.r.t. ``params()``, from the per-sample engine.

    Constructing it installs the engine's forward hooks on the modules that own the parameters
    (found among ``modules`` and their submodules);
    each recorded call lives in the graph of its output, so nothing outlives that graph.
    """

    def __init__(self, params: Callable[[], list[Tensor]], modules: Sequence[nn.Module]) -> None:
        self._engine = PerSampleEngine(params, modules=modules)

    def gramian(self, losses: Tensor, params: Sequence[Tensor]) -> Tensor:
        """The ``[m, m]`` Gramian of the ``m`` losses (loss ``i`` depends on sample ``i`` only)."""
        part = self._engine.collect(losses, params, retain_graph=True)
        captured: list[Tensor] = []

        def capture(gram: Tensor) -> Tensor:
            captured.append(gram)
            return torch.zeros(gram.shape[0], dtype=gram.dtype, device=gram.device)

        combine_parts([part], params, capture)
        # The engine accumulates in float64; the peer's users weigh and back-propagate in the
        # losses' dtype (``losses.backward(weights)`` needs it).
        return captured[0].to(losses.dtype)
