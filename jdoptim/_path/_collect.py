"""Collect: what one call's losses contribute to the global Jacobian, on this rank.

This module is the only place where the path talks to the engines (it also runs the per-sample
engine's combination of parts, :func:`combine_samples`). Four routes, chosen per call:

``"jacobian"``
    The Jacobian engine's rows ``[m, *p.shape]`` per parameter (batched VJPs); the parameters
    outside ``shared_params`` keep only their summed gradient ``[1, *p.shape]``.
``"samples"``
    The per-sample engine (``batch_dim=0``): recorded layer inputs and output gradients, the
    rows of the parameters without a closed form, the summed gradients (a ``SamplePart``).
``"sharded"``
    FSDP2: the Jacobian engine's full-width rows w.r.t. the unsharded parameters that the
    forward used (:mod:`jdoptim._fsdp`); :mod:`jdoptim._path._sharded` combines them by shards.
``"layers"``
    The layer-Gramian engine (``shared_params`` with a Gramian aggregator): the inputs and
    output gradients of the exact ``nn.Linear`` calls and the rows of the other parameters (a
    ``LayerPieces``); :mod:`jdoptim._path._layers` averages them over micro-batches and ranks.

Every part is already divided by the ``GradScaler``'s scale, so that the stages after this one
work at the fp32 level.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from jdoptim._validation import check_dense_gradients
from jdoptim.aggregation import GramianWeightedAggregator
from jdoptim.engine import JacobianEngine, PerSampleEngine
from jdoptim.engine._per_sample import SamplePart, combine_parts

Route = Literal["jacobian", "samples", "layers", "sharded"]
Mode = Literal["mean", "concat"]


@dataclass(frozen=True)
class Setup:
    """What the optimizer configured, as the path reads it for one call."""

    engine: JacobianEngine
    gramian_engine: Any  # PerSampleEngine, LayerGramianEngine or None
    aggregator: Callable[[Tensor], Tensor]
    shared: list[Tensor] | None
    cross_rank: Mode
    scaler: torch.amp.GradScaler | None
    process_group: Any = None  # the ProcessGroup of the collectives (None: the default group)

    def scale(self) -> float | None:
        """The scale of an enabled ``GradScaler``; ``None`` without one (one host read)."""
        scaler = self.scaler
        return scaler.get_scale() if scaler is not None and scaler.is_enabled() else None


def choose_route(setup: Setup, combined: bool) -> Route:
    """The route of a call; ``combined``: several micro-batches or ranks meet in this step.

    A Gramian engine serves only an aggregator that needs only the Gramian. The per-sample
    engine's pieces combine in both modes (under ``"mean"`` through the Gramian of the
    concatenation: see :class:`~jdoptim._path._combine.SampleParts`), the layer-Gramian
    engine's pieces under ``"mean"`` only (:mod:`jdoptim._path._layers`).
    """
    engine = setup.gramian_engine
    if engine is None or not isinstance(setup.aggregator, GramianWeightedAggregator):
        return "jacobian"
    if isinstance(engine, PerSampleEngine):
        return "samples"
    return "jacobian" if combined and setup.cross_rank == "concat" else "layers"


@dataclass
class JacobianPart:
    """``m`` losses' Jacobian blocks, per parameter (``None``: not reached)."""

    m: int
    blocks: list[Tensor | None]


def collect(
    route: Route,
    losses: Tensor,
    params: list[Tensor],
    setup: Setup,
    summed_only: frozenset[int],
    scale: float | None,
    leaves: list[Tensor] | None,
) -> Any:
    """Differentiate ``losses`` along ``route``: a ``JacobianPart``, ``SamplePart`` or
    ``LayerPieces``, divided by ``scale``; under FSDP2, w.r.t. ``leaves`` (the unsharded
    parameters the forward used, one per parameter)."""
    engine = setup.gramian_engine
    unscale = 1.0 if scale is None else scale
    if route == "samples":
        return engine.collect(losses, params, summed_only=summed_only, unscale=unscale)
    inputs = params if leaves is None else leaves
    check_dense_gradients(losses, inputs)
    if route == "layers":
        return engine.pieces(losses, params, summed_only=summed_only, unscale=unscale)
    blocks = setup.engine.jacobians(losses, inputs)
    for k, (p, j) in enumerate(zip(params, blocks, strict=True)):
        if j is not None:
            j = j.sum(dim=0, keepdim=True) if id(p) in summed_only else j
            blocks[k] = j if scale is None else j / scale
    return JacobianPart(losses.shape[0], blocks)


def combine_samples(
    parts: list[SamplePart],
    params: list[Tensor],
    weights: Callable[[Tensor], Tensor],
    summed_only: frozenset[int],
    gather: Callable[[list[Tensor]], list[list[Tensor]]] | None,
    signatures: list[Any] | None,
) -> list[Tensor | None]:
    """The per-sample engine's updates for the concatenated losses of ``parts`` (then ranks).

    The engine forms the global Gramian from the parts' pieces and calls ``weights`` on it.
    """
    updates, _ = combine_parts(
        parts, params, weights, summed_only, gather=gather, signatures=signatures
    )
    return updates
