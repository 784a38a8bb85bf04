"""Combine: the parts of several micro-batches (then ranks) into one global step.

The kept parts of one optimizer step form one of three containers, one per route of
:mod:`jdoptim._path._collect`; :meth:`weighed` combines them over micro-batches and ranks and hands
the global Jacobian (or Gramian) to the weigh stage. Under ``"mean"`` the losses are the mean of
the micro-batches' (and ranks') loss vectors, under ``"concat"`` their concatenation in call
order, rank by rank. A failure of this rank's local part (``error``) is raised on every rank by
the exchange, so that no rank waits in a collective.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from jdoptim._distributed import Exchange
from jdoptim._path._collect import JacobianPart, Mode, Route, combine_samples
from jdoptim._path._layers import LayerParts
from jdoptim._path._weigh import Weigh
from jdoptim.engine._reduce import total

Updates = list[Tensor | None]
Failure = BaseException | None  # this rank's local failure, raised on every rank


class JacobianParts:
    """Jacobian blocks of micro-batches: averaged (``"mean"``, a running sum) or stacked.

    Parameters
    ----------
    params:
        The parameters, in the order of the blocks.
    mode:
        ``"mean"`` or ``"concat"``.
    summed:
        Per parameter, whether it only gets the summed gradient (blocks ``[1, *p.shape]``).
    """

    route: Route = "jacobian"

    def __init__(self, params: Sequence[Tensor], mode: Mode, summed: Sequence[bool]) -> None:
        self.params = list(params)
        self.mode = mode
        self.summed = list(summed)
        self.count = 0
        self._m: list[int] = []
        self._parts: list[list[Tensor | None]] = []  # concat: every part; mean: the running sum

    def add(self, part: JacobianPart) -> None:
        """Keep the blocks of one micro-batch."""
        if len(part.blocks) != len(self.summed):
            raise ValueError(
                f"got {len(part.blocks)} Jacobian blocks for {len(self.summed)} parameters: the "
                "parameters changed during gradient accumulation"
            )
        if self.mode == "mean" and self._m and part.m != self._m[0]:
            raise ValueError(
                f"cross_rank='mean' averages micro-batches with the same number of losses: got "
                f"{part.m} losses after {self._m[0]} (use cross_rank='concat' for per-sample "
                "losses)"
            )
        self.count += 1
        self._m.append(part.m)
        if self.mode == "concat" or not self._parts:
            self._parts.append(list(part.blocks))
            return
        running = self._parts[0]
        for k, b in enumerate(part.blocks):
            if b is not None:
                running[k] = b if running[k] is None else running[k] + b

    def weighed(self, weigh: Weigh, exchange: Exchange | None, error: Failure) -> Updates:
        """The updates from the global Jacobian blocks."""
        return weigh.jacobian(self.result(exchange, error), self.summed)

    def result(self, exchange: Exchange | None, error: Failure) -> list[Tensor | None]:
        """The global blocks, after the exchange over ranks (``None``: single process)."""
        if exchange is None and error is not None:
            raise error
        params = self.params
        blocks, ms, wanted = self.agreed(exchange, error)
        if exchange is None:
            return blocks
        m = ms[exchange.rank]
        rows = [1 if self.summed[k] else m for k in range(len(params))]
        sent = [filled(blocks[k], rows[k], params[k]) for k in range(len(params)) if wanted[k]]
        if self.mode == "mean":
            received = iter(exchange.mean(sent))
            return [next(received) if w else None for w in wanted]
        per_rank = exchange.gather(sent)
        out: list[Tensor | None] = []
        position = 0
        for k, w in enumerate(wanted):
            if not w:
                out.append(None)
                continue
            pieces = [rank[position] for rank in per_rank]
            position += 1
            out.append(total(pieces) if self.summed[k] else torch.cat(pieces))
        return out

    def agreed(
        self, exchange: Exchange | None, error: Failure
    ) -> tuple[list[Tensor | None], list[int], list[bool]]:
        """This rank's combined blocks, every rank's number of losses, and per parameter
        whether some rank's losses reach it (one small exchange; ``error`` raised on every
        rank)."""
        blocks = self._local() if error is None else []
        m = sum(self._m) if self.mode == "concat" else (self._m[0] if self._m else 0)
        if exchange is None:
            return blocks, [m], [b is not None for b in blocks]
        signatures = exchange.agree((m, tuple(b is not None for b in blocks)), error)
        ms = [sig[0] for sig in signatures]
        if self.mode == "mean" and len(set(ms)) != 1:
            raise ValueError(
                f"cross_rank='mean' averages loss vectors of the same length on every rank, got "
                f"{ms} losses on ranks 0..{len(ms) - 1} (use cross_rank='concat' for per-sample "
                "losses)"
            )
        return blocks, ms, [any(sig[1][k] for sig in signatures) for k in range(len(self.params))]

    def _local(self) -> list[Tensor | None]:
        if self.count == 1:  # the plain step: nothing to combine, nothing copied
            return self._parts[0]
        if self.mode == "mean":
            return [None if b is None else b / self.count for b in self._parts[0]]
        out: list[Tensor | None] = []
        for k, p in enumerate(self.params):
            column = [part[k] for part in self._parts]
            if all(b is None for b in column):
                out.append(None)
            elif self.summed[k]:
                out.append(total([b for b in column if b is not None]))
            else:
                out.append(
                    torch.cat([filled(b, m, p) for b, m in zip(column, self._m, strict=True)])
                )
        return out


class SampleParts:
    """The per-sample engine's parts of micro-batches, concatenated (then over ranks).

    Under ``"mean"`` the global Jacobian is ``J̄ = P J`` with ``J`` the concatenated rows of the
    ``c`` parts (micro-batches and ranks, ``m`` losses each) and ``P = (1/c) [I_m … I_m]``: its
    Gramian is ``P G Pᵀ`` (the mean of the ``c × c`` blocks of ``G``, times ``1/c``) and its
    update ``J̄ᵀ w = Jᵀ (Pᵀ w)``. So the engine forms the Gramian of the concatenation from the
    same layer pieces as under ``"concat"`` (no ``m × n`` Jacobian crosses ranks), and the weights
    of ``P G Pᵀ`` are spread back over the parts.
    """

    route: Route = "samples"

    def __init__(self, params: Sequence[Tensor], summed_only: frozenset[int], mode: Mode) -> None:
        self.params = list(params)
        self.summed_only = summed_only
        self.mode = mode
        self.parts: list[Any] = []  # the engine's SamplePart objects

    def add(self, part: Any) -> None:
        """Keep the pieces of one micro-batch."""
        self.parts.append(part)

    def weighed(self, weigh: Weigh, exchange: Exchange | None, error: Failure) -> Updates:
        """The updates from the Gramian of the concatenated losses (the engine forms it)."""
        gather = signatures = None
        if exchange is not None:
            local = None if error is not None else [p.signature(self.params) for p in self.parts]
            signatures = exchange.agree(local, error)
            gather = exchange.gather
        elif error is not None:
            raise error
        weights, count = weigh.weights, 1
        if self.mode == "mean":
            ms = [sig[0] for rank in signatures or [[(p.m,) for p in self.parts]] for sig in rank]
            if len(set(ms)) != 1:
                raise ValueError(
                    f"cross_rank='mean' averages loss vectors of the same length, got {ms} losses "
                    "in the micro-batches of ranks 0.. (use cross_rank='concat' for per-sample "
                    "losses)"
                )
            weights, count = _of_the_mean(weigh.weights, len(ms)), len(ms)
        updates = combine_samples(
            self.parts, self.params, weights, self.summed_only, gather, signatures
        )
        summed = [id(p) in self.summed_only for p in self.params]
        return [
            u / count if u is not None and s else u for u, s in zip(updates, summed, strict=True)
        ]


def _of_the_mean(weights: Callable[[Tensor], Tensor], count: int) -> Callable[[Tensor], Tensor]:
    """``G ↦ Pᵀ W(P G Pᵀ)`` for ``P = (1/count) [I … I]``: the weights of the mean Jacobian, on
    the rows of the concatenation of ``count`` equal-sized parts."""

    def of_concatenated(gramian: Tensor) -> Tensor:
        m = gramian.shape[0] // count
        mean = gramian.view(count, m, count, m).sum(dim=(0, 2)) / count**2
        return (weights(mean) / count).repeat(count)

    return of_concatenated


Parts = JacobianParts | SampleParts | LayerParts


def new_parts(
    route: Route, mode: Mode, params: Sequence[Tensor], summed_only: frozenset[int]
) -> Parts:
    """An empty container for the parts of ``route``."""
    if route == "samples":
        return SampleParts(params, summed_only, mode)
    if route == "layers":
        return LayerParts(params, summed_only)
    return JacobianParts(params, mode, [id(p) in summed_only for p in params])


def filled(block: Tensor | None, rows: int, param: Tensor) -> Tensor:
    """``block``, or zeros of its shape when this part does not reach the parameter."""
    return param.new_zeros((rows, *param.shape)) if block is None else block
