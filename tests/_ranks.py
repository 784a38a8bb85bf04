"""Run a worker on several gloo processes (127.0.0.1), bounded: every collective has a timeout
and the processes are killed if they outlive the deadline. Each worker saves
``folder / f"rank{rank}.pt"``; :func:`run_ranks` returns what they saved, in rank order."""

from __future__ import annotations

import datetime
import gc
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(rank: int, worker: Callable[..., None], world: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        results = worker(rank, world, folder)
        torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
        gc.collect()  # free DDP wrappers before their process group (see examples/ddp_train.py)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_torchrun(script: Path, world: int, deadline_s: float) -> str:
    """Run ``torchrun --standalone --nproc_per_node=world script``; return its stdout.

    Skips when torchrun is unavailable; fails (after killing it and its workers) past the
    deadline or on a non-zero exit."""
    if importlib.util.find_spec("torch.distributed.run") is None:
        pytest.skip("torchrun (torch.distributed.run) is unavailable")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc_per_node={world}", str(script)]
    process = subprocess.Popen(
        command,
        cwd=script.parents[1],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: killed with its workers on timeout
    )
    try:
        out, err = process.communicate(timeout=deadline_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"torchrun did not finish within {deadline_s} s")
    assert process.returncode == 0, out + err
    return out


def run_ranks(
    worker: Callable[[int, int, str], dict[str, object]],
    world: int,
    folder: Path,
    deadline_s: float,
) -> list[dict[str, object]]:
    """Run ``worker(rank, world, folder)`` in ``world`` processes of one gloo group and return
    the dictionaries they return, in rank order."""
    context = mp.start_processes(
        _start,
        args=(worker, world, _free_port(), str(folder)),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + deadline_s
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world} processes did not finish within {deadline_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world)]


class Collectives:
    """Records the ``group`` argument of every collective run through ``torch.distributed``
    while installed (``None``: the default group)."""

    NAMES = ("all_gather", "all_gather_object", "all_reduce", "all_to_all_single")
    NAMES += ("broadcast_object_list",)

    def __init__(self) -> None:
        self.groups: list[object] = []
        self._saved = {n: getattr(dist, n) for n in self.NAMES}

    def __enter__(self) -> Collectives:
        for n, f in self._saved.items():
            setattr(dist, n, self._recorded(f))
        return self

    def _recorded(self, f: Callable[..., object]) -> Callable[..., object]:
        def wrapper(*args: object, **kwargs: object) -> object:
            self.groups.append(kwargs.get("group"))
            return f(*args, **kwargs)

        return wrapper

    def __exit__(self, *exc: object) -> None:
        for n, f in self._saved.items():
            setattr(dist, n, f)
