"""What FSDP2 (``torch.distributed.fsdp.fully_shard``) holds, as a Jacobian step needs it.

Under FSDP2 the optimizer holds the *sharded* parameters: ``DTensor`` shards placed ``Shard(d)``
on a 1-D mesh. The forward does not use them: FSDP2 all-gathers each module's shards into an
*unsharded* ``nn.Parameter`` of the full shape, swaps it into the module for the forward, frees
its storage afterwards (``reshard_after_forward``) and all-gathers it again in a hook that runs
before the module's backward. Those unsharded parameters are the leaves of the losses' graph, so
the Jacobian is taken w.r.t. them (``torch.autograd.grad`` does not fill ``.grad``, so FSDP2's
post-backward reduce-scatter has nothing to send): each rank gets the full-width Jacobian of its
own losses, ``[m_r, *p.shape]`` per parameter, as FSDP2 gets full-width gradients.

FSDP2 exposes no public map from a shard to its unsharded parameter: it is read from FSDP2's
module states (``torch.distributed._composable_state``), here and nowhere else, with an error
that says so if a torch release changes them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def _dtensor_type() -> type | None:
    """``DTensor``, if it was imported (no DTensor can exist otherwise): importing it costs."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def is_sharded(params: Sequence[Tensor]) -> bool:
    """Whether some parameter is a ``DTensor`` (sharded by ``fully_shard``)."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in params)


def shard_group(params: Sequence[Tensor], process_group: Any) -> Any:
    """The ``ProcessGroup`` of the sharded parameters' mesh, checked against ``process_group``.

    Every parameter must be a ``DTensor`` placed ``Shard(d)`` on one 1-D mesh.
    """
    meshes = []
    for k, p in enumerate(params):
        if not isinstance(p, _dtensor_type()):  # type: ignore[arg-type]
            raise NotImplementedError(
                f"parameter {k} (shape {tuple(p.shape)}) is a plain tensor while others are "
                "sharded by fully_shard: shard every module whose parameters the optimizer holds "
                "(fully_shard the root module too)"
            )
        mesh = p.device_mesh
        if mesh.ndim != 1:
            raise NotImplementedError(
                f"parameter {k} is sharded on a {mesh.ndim}-D mesh {tuple(mesh.shape)} (HSDP): "
                "jdoptim supports FSDP2 on a 1-D mesh, or DDP without sharding"
            )
        placement = p.placements[0]
        if not placement.is_shard():
            raise NotImplementedError(
                f"parameter {k} is placed {placement} on its mesh: jdoptim supports the "
                "Shard(d) placements of fully_shard"
            )
        meshes.append(mesh)
    if any(m != meshes[0] for m in meshes):
        raise NotImplementedError("the parameters are sharded on different meshes")
    group = meshes[0].get_group()
    if process_group is not None and process_group is not group:
        raise ValueError(
            "under FSDP2 the ranks of the parameters' mesh exchange: process_group must be that "
            "mesh (or its group), or None"
        )
    return group


def unsharded(params: Sequence[Tensor]) -> list[Tensor]:
    """For each sharded parameter, the unsharded ``nn.Parameter`` that FSDP2's forward uses."""
    owners = _fsdp_params()
    leaves = []
    for k, p in enumerate(params):
        owner = owners.get(id(p))
        leaf = getattr(owner, "_unsharded_param", None)
        if owner is None or leaf is None:
            raise NotImplementedError(
                f"parameter {k} (shape {tuple(p.shape)}) is a DTensor that fully_shard does not "
                "manage, or whose module has not run a forward yet (tensor parallelism and "
                "DTensors built by hand are not supported)"
            )
        leaves.append(leaf)
    return leaves


def shard_sizes(param: Tensor, world_size: int) -> list[int]:
    """How FSDP2 splits the sharded dimension of ``param`` over ``world_size`` ranks: chunks of
    ``ceil(size / world_size)``, the last ones shorter or empty (as ``torch.chunk``, padded)."""
    size = param.shape[param.placements[0].dim]  # type: ignore[attr-defined]
    chunk = -(-size // world_size)
    return [max(0, min(chunk, size - r * chunk)) for r in range(world_size)]


def as_shard(update: Tensor, param: Tensor) -> Tensor:
    """``update`` (this rank's shard, local shape) as a ``DTensor`` placed like ``param``."""
    dtensor = _dtensor_type()
    return dtensor.from_local(  # type: ignore[union-attr]
        update.reshape(param.to_local().shape),  # type: ignore[attr-defined]
        param.device_mesh,  # type: ignore[attr-defined]
        param.placements,  # type: ignore[attr-defined]
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )


def local(tensor: Tensor) -> Tensor:
    """This rank's part of ``tensor`` (itself unless it is a ``DTensor``)."""
    dtensor = _dtensor_type()
    return tensor.to_local() if dtensor is not None and isinstance(tensor, dtensor) else tensor


def _fsdp_params() -> dict[int, Any]:
    """FSDP2's parameter records (``FSDPParam``), by the id of their sharded parameter."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError as e:  # pragma: no cover - a torch release that moved FSDP2's internals
        raise NotImplementedError(
            f"this torch release ({torch.__version__}) keeps FSDP2's state elsewhere: {e}"
        ) from e
    owners = {}
    for ref in list(_module_state_mapping.values()):
        state = ref()
        group = getattr(state, "_fsdp_param_group", None)
        if isinstance(state, FSDPState) and group is not None:
            for record in group.fsdp_params:
                owners[id(record.sharded_param)] = record
    return owners
