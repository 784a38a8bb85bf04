"""Jacobian descent with DistributedDataParallel, on CPU (gloo) or GPUs (nccl).

Run it with ``torchrun --nproc_per_node=2 examples/ddp_train.py`` (or plainly, in one process).

Every step, each rank takes its shard of a global batch, splits it into two micro-batches and
computes one loss per sample. ``backward(..., accumulate=True)`` keeps the first micro-batch;
``step(closure)`` adds the second, the ranks exchange their per-layer pieces (the per-sample engine,
``batch_dim=0``, with the default ``cross_rank="concat"``), and every rank applies UPGrad to the
Jacobian of all the samples of the global batch: the same update a single process would make.
"""

from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist
from torch import nn

from jdoptim import JacobianOptimizer
from jdoptim.aggregation import UPGrad

GLOBAL_BATCH, STEPS, MICRO_BATCHES = 32, 20, 2


def main() -> None:
    distributed = "RANK" in os.environ  # set by torchrun
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    device = torch.device("cpu")
    if distributed and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same model and the same data stream on every rank
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 1)).to(device)
    net = nn.parallel.DistributedDataParallel(model) if distributed else model
    opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.02), UPGrad(), batch_dim=0)
    target = torch.randn(20, 1, device=device)

    for step in range(STEPS):
        x = torch.randn(GLOBAL_BATCH, 20, device=device)
        y = x @ target + 0.1 * torch.randn(GLOBAL_BATCH, 1, device=device)
        xs, ys = (
            x.chunk(world)[rank].chunk(MICRO_BATCHES),
            y.chunk(world)[rank].chunk(MICRO_BATCHES),
        )
        for i in range(MICRO_BATCHES - 1):
            opt.backward((net(xs[i]) - ys[i]).pow(2).squeeze(1), accumulate=True)

        def closure(x: torch.Tensor = xs[-1], y: torch.Tensor = ys[-1]) -> torch.Tensor:
            opt.zero_grad()  # keeps the accumulated micro-batches
            return (net(x) - y).pow(2).squeeze(1)  # one loss per sample

        losses = opt.step(closure)  # this rank's losses of its last micro-batch
        mean = losses.mean()
        if distributed:
            dist.all_reduce(mean)
            mean /= world
        if rank == 0 and (step % 5 == 0 or step == STEPS - 1):
            print(f"step {step:2d}  loss {mean.item():.4f}  bytes sent {opt.cross_rank_bytes}")

    if distributed:  # every rank holds the same parameters
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        copies = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(copies, flat)
        if rank == 0:
            same = all(torch.equal(copies[0], c) for c in copies)
            print(f"ranks hold identical parameters: {same}")
        # Free DDP (it sits in reference cycles) before its process group: a DDP reducer that
        # outlives the group can abort the process at exit ("terminate called without an
        # active exception", seen with torch 2.13 and gloo).
        del net
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
