"""Models, data and a peak-memory probe shared by the benchmarks."""

from __future__ import annotations

import gc
import json
import os
import tempfile
import tracemalloc
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def mlp(seed: int = 0) -> nn.Module:
    """The per-sample case: an MLP 784-256-256-10."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def cnn(seed: int = 0) -> nn.Module:
    """The per-sample convolutional case: 1x28x28 -> conv 8 -> conv 16 (stride 2) -> 10."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 12 * 12, 10),
    )


def classification_batch(batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g)


class MultiTaskModel(nn.Module):
    """The multi-task case: a trunk 784-512-512 and ``n_tasks`` linear heads 512 -> 1."""

    def __init__(self, n_tasks: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(512, 1) for _ in range(n_tasks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        return torch.cat([head(h) for head in self.heads], dim=1)


def regression_batch(batch: int, n_tasks: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 784, generator=g), torch.randn(batch, n_tasks, generator=g)


def record_peak_memory(benchmark: Any, step: Callable[[], Any]) -> None:
    """Run ``step`` once and store its peak memory in ``benchmark.extra_info``.

    Two allocators are measured, because neither sees the other:

    * ``peak_torch_mib``: the peak of live bytes allocated by torch's CPU allocator during the
      call, relative to its start (tensors that already existed, such as the parameters, are not
      counted), from the ``torch.profiler`` memory events;
    * ``peak_python_mib``: the peak of ``tracemalloc`` (Python objects and NumPy arrays, e.g. the
      quadprog solver's inputs), relative to its start.
    """
    gc.collect()
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    tracemalloc.start()
    try:
        with (
            warnings.catch_warnings(),
            torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
            ) as prof,
        ):
            warnings.simplefilter("ignore")
            step()
        _, python_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        if os.path.exists(path):
            os.remove(path)
    memory = sorted(
        (e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
        key=lambda e: e["ts"],
    )
    # "Total Allocated" is a process-wide counter that drifts across profiling sessions: measure
    # from the level just before the first event of this one.
    start = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"] if memory else 0
    peak = max((e["args"]["Total Allocated"] - start for e in memory), default=0)
    benchmark.extra_info["peak_torch_mib"] = round(peak / 2**20, 2)
    benchmark.extra_info["peak_python_mib"] = round(python_peak / 2**20, 2)


WARMUP_STEPS = 2


def run_step(benchmark: Any, step: Callable[[], Any]) -> None:
    """Warm up, record one step's peak memory, then time the step."""
    for _ in range(WARMUP_STEPS):
        step()
    record_peak_memory(benchmark, step)
    benchmark(step)
