"""Combine under FSDP2: the global Jacobian by shards, its Gramian by one ``m × m`` all-reduce.

Each rank collects the full-width Jacobian of its own losses w.r.t. the unsharded parameters
(:mod:`jdoptim._fsdp`). Rank ``s`` owns the columns of its shards, so one ``all_to_all`` gives it
the rows of every rank restricted to those columns: ``J[:, shard_s]`` of the global loss vector
(rows concatenated in rank order under ``"concat"``, averaged under ``"mean"``: then the
exchange is a reduce-scatter of the ``m`` rows, as FSDP2 reduce-scatters one gradient). Since
``J Jᵀ = Σ_s J_s J_sᵀ``, one all-reduce of the shards' ``m × m`` Gramians gives every rank the same
Gramian, hence the same weights, and rank ``s`` writes ``J_sᵀ w`` into its shards' ``.grad``
(``DTensor`` gradients placed like the parameters).

An aggregator that needs ``J`` itself works on the shards only when it acts column by column
and deterministically (:class:`~jdoptim.aggregation.TrimmedMean`); the others raise (GradDrop is
column-wise but random: its shard-local draws would differ from one process's). Non-finite
Jacobian entries and updates are agreed on by all ranks (a flag in an all-reduce), so every rank
raises or none does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from jdoptim._distributed import Exchange
from jdoptim._fsdp import as_shard, local, shard_sizes
from jdoptim._path._collect import JacobianPart, Mode
from jdoptim._path._combine import Failure, JacobianParts, Updates, filled
from jdoptim._path._weigh import Weigh
from jdoptim._validation import NonFiniteError
from jdoptim.aggregation import GramianWeightedAggregator, TrimmedMean
from jdoptim.engine._reduce import gramian, total, weighted_blocks
from jdoptim.linalg._finite import all_finite

COLUMN_WISE = (TrimmedMean,)  # aggregators whose update column k depends on column k of J only


class ShardedParts:
    """The full-width Jacobian blocks of micro-batches on this rank, combined by shards.

    Parameters
    ----------
    params:
        The sharded parameters (``DTensor``), in the order of the blocks.
    leaves:
        Their unsharded parameters, which FSDP2's forward used (:func:`jdoptim._fsdp.unsharded`).
    mode:
        ``"mean"`` or ``"concat"``.
    summed_only:
        The ids of the parameters that get the summed gradient (outside ``shared_params``).
    aggregator:
        The optimizer's aggregator: Gramian-weighted or column-wise, else an error.
    """

    route = "sharded"

    def __init__(
        self,
        params: Sequence[Tensor],
        leaves: Sequence[Tensor],
        mode: Mode,
        summed_only: frozenset[int],
        aggregator: Callable[[Tensor], Tensor],
    ) -> None:
        if not isinstance(aggregator, (GramianWeightedAggregator, *COLUMN_WISE)):
            raise NotImplementedError(
                f"{type(aggregator).__name__} works on the Jacobian matrix itself, which FSDP2 "
                "keeps in shards: use an aggregator that needs only the Gramian (UPGrad, MGDA, "
                "...), a column-wise one (TrimmedMean), or DDP without sharding"
            )
        self.params = list(params)
        self.mode = mode
        self.summed = [id(p) in summed_only for p in self.params]
        self.local = JacobianParts(leaves, mode, self.summed)

    def add(self, part: JacobianPart) -> None:
        """Keep the blocks of one micro-batch."""
        self.local.add(part)

    def weighed(self, weigh: Weigh, exchange: Exchange | None, error: Failure) -> Updates:
        """This rank's shards of the update, as ``DTensor`` s placed like the parameters."""
        gramian_based = isinstance(weigh.aggregator, GramianWeightedAggregator)
        if exchange is None and error is not None:
            raise error
        blocks, ms, wanted = self.local.agreed(exchange, error)
        if not any(wanted):
            raise ValueError("the losses do not depend on any parameter of the wrapped optimizer")
        shards = self._exchange(blocks, ms, wanted, exchange)
        rows = [b for b, w, s in zip(shards, wanted, self.summed, strict=True) if w and not s]
        if not rows:
            raise ValueError("the losses do not depend on any of the shared_params")
        bad = torch.tensor([0.0 if all_finite(rows) else 1.0], dtype=torch.float64)
        if gramian_based:
            g = gramian(rows).to(torch.float64)
            summed = _sum(torch.cat([g.reshape(-1), bad]), exchange)
            _raise_if(summed[-1], "the Jacobian holds NaN or inf")
            weights = weigh.weights(summed[:-1].view(g.shape))  # float64, whatever J's dtype
            updates = iter(weighted_blocks(weights, rows))
        else:
            _raise_if(_sum(bad, exchange)[0], "the Jacobian holds NaN or inf")
            updates = iter(weigh.jacobian(rows, [False] * len(rows)))
        out = [
            None if not w else b.sum(dim=0) if s else next(updates)  # type: ignore[union-attr]
            for b, w, s in zip(shards, wanted, self.summed, strict=True)
        ]
        reached = [u for u in out if u is not None]
        bad = torch.tensor([0.0 if all_finite(reached) else 1.0], dtype=torch.float64)
        _raise_if(_sum(bad, exchange)[0], "the update holds NaN or inf (the gradients overflow)")
        pairs = zip(out, self.params, strict=True)
        return [None if u is None else as_shard(u, p) for u, p in pairs]

    def _exchange(
        self,
        blocks: list[Tensor | None],
        ms: list[int],
        wanted: list[bool],
        exchange: Exchange | None,
    ) -> list[Tensor | None]:
        """Per parameter, the rows of the global losses restricted to this rank's shard."""
        world = 1 if exchange is None else exchange.world_size
        rank = 0 if exchange is None else exchange.rank
        leaves = self.local.params
        rows = [[1 if s else m for m in ms] for s in self.summed]  # per parameter, per rank
        sent: list[list[Tensor]] = [[] for _ in range(world)]  # per destination rank
        for k, p in enumerate(self.params):
            if wanted[k]:
                block = filled(blocks[k], rows[k][rank], leaves[k])
                dim = p.placements[0].dim + 1  # type: ignore[attr-defined]
                for r, piece in enumerate(block.split(shard_sizes(p, world), dim=dim)):
                    sent[r].append(piece.reshape(-1))
        if exchange is None:
            received = [torch.cat(sent[0])] if sent[0] else []
        else:
            sizes = [
                sum(local(p).numel() * rows[k][r] for k, p in enumerate(self.params) if wanted[k])
                for r in range(world)
            ]
            received = exchange.all_to_all([torch.cat(t) for t in sent], sizes)
        out: list[Tensor | None] = []
        offsets = [0] * world
        for k, p in enumerate(self.params):
            if not wanted[k]:
                out.append(None)
                continue
            shape = local(p).shape
            pieces = []
            for r in range(world):
                count = rows[k][r] * shape.numel()
                pieces.append(received[r][offsets[r] : offsets[r] + count].view(rows[k][r], *shape))
                offsets[r] += count
            if self.mode == "mean":
                out.append(total(pieces) / world)
            else:
                out.append(total(pieces) if self.summed[k] else torch.cat(pieces))
        return out


def _sum(tensor: Tensor, exchange: Exchange | None) -> Tensor:
    return tensor if exchange is None else exchange.sum(tensor)


def _raise_if(flag: Tensor, message: str) -> None:
    if bool(flag > 0):
        raise NonFiniteError(f"{message} on some rank: no rank writes .grad")
