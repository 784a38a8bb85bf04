"""Benchmark set-up: every benchmark runs with the same intra-op thread count.

The suite is not part of the main test run (``setup.cfg``'s ``testpaths`` is ``tests jdoptim``).
Run it with::

    python -m pytest benchmarks -p no:cacheprovider --benchmark-only
"""

import os

import pytest
import torch

# On a loaded machine, run with one thread and CPU time (``JDOPTIM_BENCH_THREADS=1`` and
# ``--benchmark-timer=time.process_time``): descheduling then does not enter the figures.
NUM_THREADS = int(os.environ.get("JDOPTIM_BENCH_THREADS", "2"))


@pytest.fixture(autouse=True)
def _fixed_threads():
    """Every benchmark runs with the same intra-op thread count, so ratios can be read."""
    previous = torch.get_num_threads()
    torch.set_num_threads(NUM_THREADS)
    yield
    torch.set_num_threads(previous)
