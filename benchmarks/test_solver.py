"""UPGrad's weights (targets = identity): ``project_weights`` (batched) vs one-by-one quadprog.

Run with ``python -m pytest benchmarks/test_solver.py -o addopts="" -p no:cacheprovider
--benchmark-only``. Gramians of random ``J`` (``m × 2000``), 2 threads.
"""

from __future__ import annotations

import pytest
import torch

from jdoptim.linalg import project_weights, project_weights_quadprog

SIZES = [16, 64, 128, 512]
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _gramian(m: int, dtype: torch.dtype) -> torch.Tensor:
    jacobian = torch.randn(m, 2000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return (jacobian @ jacobian.T).to(dtype)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("m", SIZES)
def test_active_set(benchmark, m: int, dtype_name: str) -> None:
    torch.set_num_threads(2)
    benchmark.group = f"upgrad-weights-m{m}"
    gramian = _gramian(m, DTYPES[dtype_name])
    targets = torch.eye(m, dtype=gramian.dtype)
    rounds = 3 if m == 512 else 20
    benchmark.pedantic(project_weights, (gramian, targets), rounds=rounds, warmup_rounds=1)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("m", SIZES)
def test_quadprog_one_by_one(benchmark, m: int, dtype_name: str) -> None:
    torch.set_num_threads(2)
    benchmark.group = f"upgrad-weights-m{m}"
    gramian = _gramian(m, DTYPES[dtype_name])
    targets = torch.eye(m, dtype=gramian.dtype)
    rounds = 1 if m == 512 else (3 if m == 128 else 10)
    benchmark.pedantic(project_weights_quadprog, (gramian, targets), rounds=rounds, warmup_rounds=0)
