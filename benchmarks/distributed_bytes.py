"""Bytes each rank sends per optimizer step, Jacobian descent against plain DDP and FSDP2.

Run ``python benchmarks/distributed_bytes.py`` (two gloo processes on the CPU, about a minute).
The benchmark MLP 784-256-256-10 (``n = 269,322``), float32, ``B = 64`` samples per rank.
jdoptim's bytes are ``opt.cross_rank_bytes`` (what this rank contributes to its collectives);
FSDP2's own all-gathers and reduce-scatters are counted by wrapping ``all_gather_single`` and
``reduce_scatter_single`` (the input each rank contributes). Plain DDP all-reduces its summed
gradient in C++ buckets: ``4 n`` bytes, from the tensor sizes. The signatures exchanged with
``all_gather_object`` are not counted (under 1 KB).
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from jdoptim import JacobianOptimizer
from jdoptim.aggregation import UPGrad

B, WORLD = 64, 2

# name: (losses, jdoptim options, FSDP2)
RUNS = {
    "DDP mean, per-sample losses, Jacobian path": ("sample", {"cross_rank": "mean"}, False),
    "DDP mean, per-sample engine": ("sample", {"cross_rank": "mean", "batch_dim": 0}, False),
    "DDP concat, Jacobian path": ("sample", {"cross_rank": "concat", "path": "jacobian"}, False),
    "DDP concat, per-sample engine": ("sample", {"batch_dim": 0}, False),
    "DDP mean, 10 task losses, Jacobian path": ("task", {"cross_rank": "mean"}, False),
    "DDP mean, 10 task losses, layer-Gramian engine": ("task", {"path": "gramian"}, False),
    "FSDP2 concat, per-sample losses": ("sample", {"cross_rank": "concat"}, True),
    "FSDP2 mean, 10 task losses": ("task", {"cross_rank": "mean"}, True),
    "plain FSDP2 step (loss.backward())": ("plain", {}, True),
}


class _FsdpCounter:
    """Counts the bytes of FSDP2's all-gathers and reduce-scatters (the inputs)."""

    def __init__(self) -> None:
        self.bytes = 0
        for name in ("all_gather_single", "reduce_scatter_single"):
            setattr(dist, name, self._counted(getattr(dist, name)))

    def _counted(self, f):
        def wrapper(output, input, *args, **kwargs):
            self.bytes += input.numel() * input.element_size()
            return f(output, input, *args, **kwargs)

        return wrapper


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def _run(rank: int, name: str, counter: _FsdpCounter) -> tuple[int, int]:
    kind, options, sharded = RUNS[name]
    model = _model()
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        for i in (0, 2, 4):
            fully_shard(model[i], mesh=mesh)
        fully_shard(model, mesh=mesh)
    net = model if sharded else nn.parallel.DistributedDataParallel(model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.01)
    opt = None if kind == "plain" else JacobianOptimizer(sgd, UPGrad(), **options)
    generator = torch.Generator().manual_seed(rank)
    x, y = torch.randn(B, 784, generator=generator), torch.randn(B, 10, generator=generator)
    for _ in range(2):
        counter.bytes = 0
        squared = (net(x) - y) ** 2
        if opt is None:
            sgd.zero_grad()
            squared.sum().backward()
            sgd.step()
        else:
            opt.zero_grad()
            opt.backward(squared.sum(dim=1) if kind == "sample" else squared.mean(dim=0))
            opt.step()
    del net
    return (0 if opt is None else opt.cross_rank_bytes), counter.bytes


def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(60))
    counter = _FsdpCounter()
    try:
        n = sum(p.numel() for p in _model().parameters())
        if rank == 0:
            print(f"n = {n:,} parameters; plain DDP all-reduces 4 n = {4 * n:,} bytes per step")
            print(f"{'run':50s} {'jdoptim':>12s} {'FSDP2 own':>12s}")
        for name in RUNS:
            jd, fsdp = _run(rank, name, counter)
            if rank == 0:
                print(f"{name:50s} {jd:12,d} {fsdp:12,d}", flush=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    mp.start_processes(_worker, args=(free,), nprocs=WORLD, start_method="spawn")
