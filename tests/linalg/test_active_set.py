"""``project_weights`` (batched active set) vs an independent float64 primal projection (NNLS)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import nnls

from jdoptim.linalg import project_weights, project_weights_quadprog


def _jacobian(kind: str, m: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    if kind == "random":
        return torch.randn(m, 2000 if m >= 64 else 3 * m + 2, generator=gen, dtype=f64)
    if kind == "rank_deficient":  # m > n
        return torch.randn(m, m // 2, generator=gen, dtype=f64)
    if kind == "duplicated":
        base = torch.randn(m // 2, 3 * m, generator=gen, dtype=f64)
        return torch.cat([base, base[: m - m // 2]])
    if kind == "mostly_conflicting":  # pairwise conflicts: nearly every row is added
        base = torch.eye(m, dtype=f64) - 1.5 / m
        return torch.cat([base, 1e-3 * torch.randn(m, 2 * m, generator=gen, dtype=f64)], dim=1)
    if kind == "ill_conditioned":  # condition number of G: 1e8
        q1, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=f64))
        q2, _ = torch.linalg.qr(torch.randn(3 * m, m, generator=gen, dtype=f64))
        return (q1 * torch.logspace(0, -4, m, dtype=f64)) @ q2.T
    raise ValueError(kind)


def _reference_projections(jacobian: torch.Tensor, rows: list[int]) -> np.ndarray:
    """Projections of rows of J onto {x : J x >= 0}: g + Jᵀμ with μ = nnls(Jᵀ, -g)."""
    j = jacobian.numpy()
    out = []
    for i in rows:
        mu, _ = nnls(j.T, -j[i], maxiter=100 * j.shape[0])
        out.append(j[i] + j.T @ mu)
    return np.stack(out)


def _error(jacobian: torch.Tensor, weights: torch.Tensor, rows: list[int]) -> float:
    """Relative error of the aggregated (mean) projection; floor: 1e-3 of the largest gradient."""
    reference = _reference_projections(jacobian, rows).mean(axis=0)
    ours = (weights.double().mean(dim=0) @ jacobian).numpy()
    floor = 1e-3 * float(jacobian.norm(dim=1).max())
    return float(np.linalg.norm(ours - reference) / max(np.linalg.norm(reference), floor))


CASES = [
    ("random", 1),
    ("random", 2),
    ("random", 8),
    ("random", 64),
    ("random", 128),
    ("rank_deficient", 64),
    ("duplicated", 32),
    ("ill_conditioned", 64),
    ("mostly_conflicting", 64),
]


@pytest.mark.parametrize(("kind", "m"), CASES)
def test_float64_matches_nnls(kind: str, m: int) -> None:
    jacobian = _jacobian(kind, m)
    weights = project_weights(jacobian @ jacobian.T, torch.eye(m, dtype=torch.float64))
    assert (weights >= torch.eye(m, dtype=torch.float64)).all()
    assert _error(jacobian, weights, list(range(m))) < 1e-6


@pytest.mark.parametrize(("kind", "m"), CASES)
def test_float32_matches_nnls(kind: str, m: int) -> None:
    jacobian = _jacobian(kind, m)
    gramian = (jacobian @ jacobian.T).float()
    weights = project_weights(gramian, torch.eye(m))
    assert weights.dtype == torch.float32
    assert _error(jacobian, weights, list(range(m))) < 1e-4


def test_m_512_subset_of_targets() -> None:
    jacobian = _jacobian("random", 512)
    rows = [0, 100, 200, 300, 400, 511]
    targets = torch.eye(512, dtype=torch.float64)[rows]
    weights = project_weights(jacobian @ jacobian.T, targets)
    assert _error(jacobian, weights, rows) < 1e-6


@pytest.mark.parametrize(("kind", "m"), CASES)
def test_agrees_with_quadprog_path(kind: str, m: int) -> None:
    jacobian = _jacobian(kind, m, seed=1)
    gramian, targets = jacobian @ jacobian.T, torch.rand(m, m, dtype=torch.float64)
    ours = project_weights(gramian, targets) @ jacobian
    theirs = project_weights_quadprog(gramian, targets) @ jacobian
    floor = 1e-3 * float(jacobian.norm(dim=1).max())
    denominator = theirs.norm(dim=1).clamp_min(floor)
    assert ((ours - theirs).norm(dim=1) / denominator).max() < 1e-6


def test_zero_matrix_and_zero_rows() -> None:
    targets = torch.rand(3, 5, dtype=torch.float64)
    assert torch.equal(project_weights(torch.zeros(5, 5, dtype=torch.float64), targets), targets)
    jacobian = _jacobian("random", 8)
    jacobian[3] = 0.0
    weights = project_weights(jacobian @ jacobian.T, torch.eye(8, dtype=torch.float64))
    assert (weights[:, 3] == torch.eye(8, dtype=torch.float64)[:, 3]).all()  # never added
    assert _error(jacobian, weights, list(range(8))) < 1e-6


@pytest.mark.parametrize("scale", [1e-8, 1e8])
def test_scale_invariance(scale: float) -> None:
    jacobian = _jacobian("random", 64)
    gramian, targets = jacobian @ jacobian.T, torch.eye(64, dtype=torch.float64)
    weights = project_weights(gramian, targets)
    scaled = project_weights(gramian * scale, targets)
    torch.testing.assert_close(scaled, weights, rtol=1e-10, atol=1e-12)
    assert torch.equal(project_weights(gramian * 2.0**-30, targets), weights)
    assert _error(jacobian * scale**0.5, scaled, list(range(64))) < 1e-6


def test_fallback_is_exact() -> None:
    jacobian = _jacobian("random", 64)
    gramian, targets = jacobian @ jacobian.T, torch.eye(64, dtype=torch.float64)
    for max_iter in (0, 1):  # every problem, or those one iteration leaves, go to quadprog
        weights = project_weights(gramian, targets, max_iter=max_iter)
        assert _error(jacobian, weights, list(range(64))) < 1e-6


@pytest.mark.parametrize("kind", ["random", "rank_deficient", "duplicated", "ill_conditioned"])
def test_no_quadprog_even_for_singular_gramians(monkeypatch, kind: str) -> None:
    """Every problem is certified by the batched solvers (main sent singular ones to quadprog)."""
    calls = []

    def spy(gramian: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls.append(targets.shape[0])
        return project_weights_quadprog(gramian, targets)

    monkeypatch.setattr("jdoptim.linalg._active_set.project_weights_quadprog", spy)
    jacobian = _jacobian(kind, 64)
    weights = project_weights(jacobian @ jacobian.T, torch.eye(64, dtype=torch.float64))
    assert not calls
    assert _error(jacobian, weights, list(range(64))) < 1e-6


@pytest.mark.parametrize("fista_steps", [0, 12])
def test_device_path_on_cpu(monkeypatch, fista_steps: int) -> None:
    """The path used off CPU (full-size blocks, convergence read every few iterations).

    Without the FISTA start, the iteration needs several exchanges (and convergence checks).
    """
    monkeypatch.setattr("jdoptim.linalg._active_set._reads_are_free", lambda device: False)
    monkeypatch.setattr("jdoptim.linalg._start._MANY_STEPS", fista_steps)
    jacobian = _jacobian("random", 64)
    for dtype, tol in ((torch.float64, 1e-6), (torch.float32, 1e-4)):
        gramian = (jacobian @ jacobian.T).to(dtype)
        weights = project_weights(gramian, torch.eye(64, dtype=dtype))
        assert weights.dtype == dtype
        assert _error(jacobian, weights, list(range(64))) < tol


def test_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="square"):
        project_weights(torch.zeros(3, 4), torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"\[k, 3\]"):
        project_weights(torch.eye(3), torch.zeros(3))


def test_empty() -> None:
    assert project_weights(torch.zeros(0, 0), torch.zeros(2, 0)).shape == (2, 0)
    assert project_weights(torch.eye(3), torch.zeros(0, 3)).shape == (0, 3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(dtype: torch.dtype) -> None:
    jacobian = _jacobian("random", 64)
    gramian, targets = (jacobian @ jacobian.T).to(dtype), torch.eye(64, dtype=dtype)
    cpu = project_weights(gramian, targets)
    cuda = project_weights(gramian.cuda(), targets.cuda())
    assert cuda.device.type == "cuda" and cuda.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    assert _error(jacobian, cuda.cpu(), list(range(64))) < tol
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", ["duplicated", "rank_deficient"])
def test_device_path_on_cpu_singular(monkeypatch, kind: str) -> None:
    """The off-CPU path (no reads in pivoting) on singular Gramians, quadprog forbidden."""

    def forbidden(*args: object) -> torch.Tensor:
        raise AssertionError("the quadprog fallback ran")

    monkeypatch.setattr("jdoptim.linalg._active_set._reads_are_free", lambda device: False)
    monkeypatch.setattr("jdoptim.linalg._active_set.project_weights_quadprog", forbidden)
    jacobian = _jacobian(kind, 32)
    weights = project_weights(jacobian @ jacobian.T, torch.eye(32, dtype=torch.float64))
    assert _error(jacobian, weights, list(range(32))) < 1e-6


@pytest.mark.parametrize(("m", "rank"), [(64, 4), (256, 8)])
def test_rank_deficient_blocks_stay_small(monkeypatch, m: int, rank: int) -> None:
    """``m`` rows of rank ``r``: no factorised block is larger than ``r + 1`` (the entering row
    with an independent passive set), so the cost does not grow like ``m⁴`` (projected Newton
    factorised blocks of size ~m: 36 s at m = 256, r = 8)."""
    import jdoptim.linalg._blocks as blocks
    import jdoptim.linalg._lawson_hanson as lawson_hanson

    sizes = []
    for module, name in ((blocks, "_block_solve_chunk"), (lawson_hanson, "_face_solve")):
        original = getattr(module, name)

        def spy(matrix, rhs, select, *args, original=original):
            sizes.append(int(select.sum(dim=1).max()))
            return original(matrix, rhs, select, *args)

        monkeypatch.setattr(module, name, spy)
    jacobian = torch.randn(m, rank, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    weights = project_weights(jacobian @ jacobian.T, torch.eye(m, dtype=torch.float64))
    assert max(sizes) <= rank + 1
    assert _error(jacobian, weights, list(range(0, m, 8))) < 1e-6


@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.5, 1.0])
def test_product_matches_dense(monkeypatch, compact: bool, density: float) -> None:
    """``_product`` (sparse below 10 % non-zeros, on CPU) equals the dense ``x @ g``."""
    import jdoptim.linalg._blocks as blocks
    from jdoptim.linalg._blocks import _product

    monkeypatch.setattr(blocks, "_SPARSE_ROWS", 0)  # sparse at this size too

    gen = torch.Generator().manual_seed(3)
    g = torch.randn(200, 200, generator=gen, dtype=torch.float64)
    x = torch.randn(50, 200, generator=gen, dtype=torch.float64)
    x = x * (torch.rand(50, 200, generator=gen) < density)
    torch.testing.assert_close(_product(x, g, compact), x @ g, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("kind", ["random", "ill_conditioned", "mostly_conflicting"])
def test_sparse_products_everywhere(monkeypatch, kind: str) -> None:
    """Pivoting with every product of a point or correction taken sparse stays exact."""
    import jdoptim.linalg._blocks as blocks

    calls = []
    original = torch.sparse.mm
    monkeypatch.setattr(blocks, "_SPARSE", 1.0)
    monkeypatch.setattr(blocks, "_SPARSE_ROWS", 0)
    monkeypatch.setattr(torch.sparse, "mm", lambda *a: calls.append(1) or original(*a))
    jacobian = _jacobian(kind, 64)
    weights = project_weights(jacobian @ jacobian.T, torch.eye(64, dtype=torch.float64))
    assert calls
    assert _error(jacobian, weights, list(range(64))) < 1e-6


@pytest.mark.parametrize("kind", ["random", "ill_conditioned", "mostly_conflicting"])
def test_step_bound_brackets_largest_eigenvalue(kind: str) -> None:
    """The starting guess's Lipschitz constant: at least ``λ_max`` (eigvalsh: FISTA's steps are
    stable) and at most ``‖G‖₁`` (the previous, looser constant)."""
    from jdoptim.linalg._start import _step_bound

    jacobian = _jacobian(kind, 64)
    gramian = jacobian @ jacobian.T
    largest = float(torch.linalg.eigvalsh(gramian)[-1])
    bound = float(_step_bound(gramian))
    assert largest <= bound <= float(torch.linalg.matrix_norm(gramian, 1)) * (1 + 1e-12)


def test_nearly_full_rank_gramians_are_certified_by_proximal_pivoting(monkeypatch):
    """More losses than parameters by a few (160 rows of rank 150): the Gramian is singular,
    but Lawson & Hanson would add its ~100 free rows per problem one by one (300 x 280 took
    26 s); proximal pivoting from the start certifies every problem (it is never called), and
    the UPGrad update equals the mean of scipy NNLS projections."""
    from jdoptim.aggregation import UPGradWeighting
    from jdoptim.linalg import _active_set
    from tests.linalg._reference import relative_error, upgrad

    def forbidden(*args, **kwargs):
        raise AssertionError("Lawson & Hanson ran on a nearly full-rank Gramian")

    monkeypatch.setattr(_active_set, "_lawson_hanson", forbidden)
    rng = np.random.default_rng(7)
    jacobian = rng.normal(size=(160, 150))
    weights = UPGradWeighting()(torch.from_numpy(jacobian @ jacobian.T)).numpy()
    assert relative_error(weights @ jacobian, upgrad(jacobian), jacobian) < 1e-6
