"""What crosses ranks, and how: the collectives of a Jacobian step under ``torch.distributed``.

Every rank computes its local losses and their Jacobian (or, with the per-sample engine, the small
per-layer pieces of it). One exchange per optimizer step then gives every rank the same global
Jacobian (or Gramian), so every rank runs the same aggregation on the same numbers and writes the
same ``.grad``. Two ways to form the global loss vector:

``"mean"``
    The global losses are the means over ranks of the local loss vectors (each rank estimates the
    same ``m`` objectives, as DDP averages gradients). The global Jacobian is the mean of the
    local ones: one ``all_reduce`` of the ``m × n`` Jacobian blocks.
``"concat"``
    The global losses are the local vectors concatenated in rank order (one loss per sample of
    the global batch). The Jacobian path gathers every rank's rows (``all_gather``); the
    per-sample engine gathers only layer inputs and output gradients.

Micro-batches of gradient accumulation combine in the same way, before the ranks do: averaged
under ``"mean"``, rows stacked in call order under ``"concat"`` (see :mod:`jdoptim._path._combine`,
which drives these collectives).

Every collective runs over one process group: the optimizer's ``process_group`` (a
``ProcessGroup`` or a 1-D ``DeviceMesh``), the whole world by default. Under FSDP2 the ranks that
share the parameters' shards exchange (see :mod:`jdoptim._path._sharded`).

Collectives run in a fixed order on a fixed parameter list. Before any tensor crosses, the ranks
exchange a small signature (numbers of losses, which parameters the losses reach, shapes) and
any error raised locally, so that a failure on one rank raises on every rank instead of leaving
the others waiting in a collective.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

if dist.is_available():
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh
else:  # pragma: no cover - builds of torch without distributed support
    ProcessGroup = DeviceMesh = type("Unavailable", (), {})  # type: ignore[misc, assignment]

Group = Any  # a ProcessGroup, or None for the default group


class PeerRankError(RuntimeError):
    """Another rank failed during the local part of the step; this rank stops with it."""


def resolve_group(process_group: object) -> Group:
    """The ``ProcessGroup`` named by ``process_group``: ``None`` (the default group), a
    ``ProcessGroup``, or a 1-D ``DeviceMesh`` (its group); anything else is an error."""
    if isinstance(process_group, int) and process_group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(
            f"this process (global rank {dist.get_rank()}) is not a member of process_group: "
            "build the optimizer with a group this process belongs to"
        )
    if process_group is None or isinstance(process_group, ProcessGroup):
        return process_group
    if isinstance(process_group, DeviceMesh):
        if process_group.ndim != 1:
            raise ValueError(
                f"process_group must be a 1-D DeviceMesh, got one of shape "
                f"{tuple(process_group.shape)}: pass the mesh of the dimension the ranks "
                "replicate over (mesh['dp'])"
            )
        return process_group.get_group()
    raise TypeError(
        "process_group must be a torch.distributed ProcessGroup, a 1-D DeviceMesh or None, "
        f"got {type(process_group).__name__}"
    )


def current_exchange(group: Group = None) -> Exchange | None:
    """An :class:`Exchange` over ``group`` (``None``: the default group), or ``None`` outside of
    one.

    ``None`` when ``torch.distributed`` is unavailable, not initialised, or the group has one
    process.
    """
    if not dist.is_available() or not dist.is_initialized():
        return None
    return None if dist.get_world_size(group) <= 1 else Exchange(group)


class Exchange:
    """The collectives of one optimizer step over one process group.

    Parameters
    ----------
    group:
        The ``ProcessGroup`` (``None``: the default group).

    Attributes
    ----------
    rank, world_size:
        This process's rank in the group and the number of processes in it.
    bytes_sent:
        Payload bytes this rank contributed to the tensor collectives so far (padding included,
        the small signatures exchanged with ``all_gather_object`` excluded).
    """

    def __init__(self, group: Group = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.bytes_sent = 0

    def agree(self, signature: Any, error: BaseException | None) -> list[Any]:
        """Exchange every rank's ``signature`` (any picklable value) and local failure.

        Raises ``error`` on the rank where it happened and :class:`PeerRankError` on the others;
        otherwise returns the signatures in rank order.
        """
        message = None if error is None else f"{type(error).__name__}: {error}"
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, (message, signature), group=self.group)
        if error is not None:
            raise error
        for rank, (failure, _) in enumerate(gathered):
            if failure is not None:
                raise PeerRankError(f"rank {rank} failed during the step: {failure}")
        return [sig for _, sig in gathered]

    def sync_state(self, obj: Any) -> None:
        """Give ``obj`` (an aggregator) rank 0's state, as DDP gives every rank its parameters."""
        get = getattr(obj, "state_dict", None)
        state = {} if get is None else get()
        if not state:
            return
        box = [state]
        dist.broadcast_object_list(box, group=self.group, group_src=0)
        if self.rank != 0:
            obj.load_state_dict(box[0])

    def gather(self, tensors: Sequence[Tensor]) -> list[list[Tensor]]:
        """Every rank's ``tensors``, in rank order (same count and dtypes; shapes may differ).

        Tensors of one dtype travel as one flat buffer, padded to the longest rank's: one
        ``all_gather`` per dtype, after one ``all_gather_object`` of the shapes.
        """
        described = [(str(t.dtype), tuple(t.shape)) for t in tensors]
        shapes: list[Any] = [None] * self.world_size
        dist.all_gather_object(shapes, described, group=self.group)
        kinds = [[d for d, _ in rank] for rank in shapes]
        if any(k != kinds[0] for k in kinds):
            raise RuntimeError(
                "the ranks disagree on the tensors to exchange (count or dtypes): "
                f"{[len(k) for k in kinds]} tensors of dtypes {[sorted(set(k)) for k in kinds]}"
            )
        result: list[list[Tensor | None]] = [[None] * len(tensors) for _ in shapes]
        for dtype in sorted(set(kinds[0])):
            where = [i for i, d in enumerate(kinds[0]) if d == dtype]
            sizes = [[math.prod(rank[i][1]) for i in where] for rank in shapes]
            longest = max(sum(s) for s in sizes)
            local = torch.cat([tensors[i].reshape(-1) for i in where])
            buffer = local.new_zeros(longest)
            buffer[: local.numel()] = local
            received = [torch.empty_like(buffer) for _ in shapes]
            dist.all_gather(received, buffer, group=self.group)
            self.bytes_sent += buffer.numel() * buffer.element_size()
            for r, (flat, rank_sizes) in enumerate(zip(received, sizes, strict=True)):
                chunks = flat[: sum(rank_sizes)].split(rank_sizes)
                for i, chunk in zip(where, chunks, strict=True):
                    result[r][i] = chunk.view(shapes[r][i][1])
        return result  # type: ignore[return-value]

    def mean(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The mean over ranks of ``tensors`` (same shapes on every rank): one ``all_reduce``
        per dtype."""
        result: list[Tensor | None] = [None] * len(tensors)
        for dtype in sorted({str(t.dtype) for t in tensors}):
            where = [i for i, t in enumerate(tensors) if str(t.dtype) == dtype]
            buffer = torch.cat([tensors[i].reshape(-1) for i in where])
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group)
            self.bytes_sent += buffer.numel() * buffer.element_size()
            buffer /= self.world_size
            chunks = buffer.split([tensors[i].numel() for i in where])
            for i, chunk in zip(where, chunks, strict=True):
                result[i] = chunk.view(tensors[i].shape)
        return result  # type: ignore[return-value]

    def sum(self, tensor: Tensor) -> Tensor:
        """The sum over ranks of ``tensor`` (same shape and dtype on every rank): one
        ``all_reduce``."""
        buffer = tensor.clone()
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group)
        self.bytes_sent += buffer.numel() * buffer.element_size()
        return buffer

    def all_to_all(self, sent: Sequence[Tensor], sizes: Sequence[int]) -> list[Tensor]:
        """Send ``sent[r]`` (1-D, one dtype) to rank ``r``; receive ``sizes[r]`` values from each.

        One ``all_to_all_single``; the bytes counted are those that leave this rank.
        """
        received = sent[0].new_empty(sum(sizes))
        dist.all_to_all_single(
            received,
            torch.cat(list(sent)),
            output_split_sizes=list(sizes),
            input_split_sizes=[t.numel() for t in sent],
            group=self.group,
        )
        away = sum(t.numel() for r, t in enumerate(sent) if r != self.rank)
        self.bytes_sent += away * sent[0].element_size()
        return list(received.split(list(sizes)))
