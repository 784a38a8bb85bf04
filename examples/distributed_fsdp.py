"""Jacobian descent on a model sharded by FSDP2 (``fully_shard``), on CPU (gloo).

Run it with ``torchrun --nproc_per_node=2 examples/distributed_fsdp.py`` (or plainly, in one
process, without sharding).

Each rank holds half of every parameter (``DTensor`` shards) and computes one loss per sample of
its shard of the global batch. At each step the ranks exchange the rows of the Jacobian on each
other's shards and one ``m × m`` Gramian; every rank then has the Gramian of all the samples of
the global batch, the same UPGrad weights, and writes ``J_sᵀ w`` into its own shards. At the
end, rank 0 retrains an unsharded copy on the whole global batch, alone in its own process group
(``process_group=``), and compares: the sharded run is the same Jacobian descent.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from jdoptim import JacobianOptimizer
from jdoptim.aggregation import UPGrad

GLOBAL_BATCH, STEPS = 32, 10


def model() -> nn.Module:
    torch.manual_seed(0)  # the same initial model on every rank
    return nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 1)).double()


def train(net: nn.Module, rank: int, world: int, group: object = None) -> list[float]:
    """``STEPS`` steps of UPGrad on this rank's shard of each global batch; the mean losses."""
    opt = JacobianOptimizer(
        torch.optim.SGD(net.parameters(), lr=0.005, momentum=0.9),
        UPGrad(),
        cross_rank="concat",  # one loss per sample of the global batch
        process_group=group,
    )
    generator = torch.Generator().manual_seed(1)  # the same data stream on every rank
    target = torch.randn(20, 1, generator=generator, dtype=torch.float64)
    means = []
    for step in range(STEPS):
        x = torch.randn(GLOBAL_BATCH, 20, generator=generator, dtype=torch.float64)
        y = x @ target + 0.1 * torch.randn(GLOBAL_BATCH, 1, generator=generator).double()
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]

        def closure(xs: torch.Tensor = xs, ys: torch.Tensor = ys) -> torch.Tensor:
            opt.zero_grad()
            return (net(xs) - ys).pow(2).squeeze(1)  # this rank's per-sample losses

        means.append(opt.step(closure).mean().item())
        if rank == 0 and group is None and step % 3 == 0:
            print(f"step {step}  local loss {means[-1]:.4f}  bytes sent {opt.cross_rank_bytes}")
    return means


def main() -> None:
    if "RANK" not in os.environ:  # one process: nothing to shard
        train(model(), 0, 1)
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    sharded = model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in (sharded[0], sharded[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    train(sharded, rank, world)
    full = [p.full_tensor() for p in sharded.parameters()]  # a collective: every rank

    alone = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    if rank == 0:
        reference = model()
        train(reference, 0, 1, group=alone[0])  # the whole global batch, no exchange
        pairs = zip(full, reference.parameters(), strict=True)
        gap = max((a - b).abs().max().item() for a, b in pairs)
        print(f"largest difference from one process on the global batch: {gap:.1e}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
