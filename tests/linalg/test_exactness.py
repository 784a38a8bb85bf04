"""UPGrad, DualProj and ``project_weights`` against an independent float64 NNLS (issue 14).

Inputs: per-sample Jacobians captured from real trainings (early and late: condition → ∞), the
stationary families of the literature (rank 1-19, strongly and strictly weakly stationary), row
norms spread over 1e12, duplicated and zero rows, scales 1e-30…1e30, in float32 and float64.
The reference is ``tests/linalg/_reference.py`` (scipy NNLS on the unit-norm rows, float64).

Agreement: ``‖ours - ref‖ <= tol · max(‖ref‖, 1e-2 · mean row norm)`` with ``tol = 1e-6`` for
float64 and ``1e-4`` for float32 inputs (the floor keeps the vanishing updates of stationary
matrices meaningful: there ``ref = 0`` and ``ours`` is rounding).

Non-conflicting up to rounding: ``(J A)_i >= -‖J_i‖ · ρ`` with
``ρ = 2m · eps · S + 1e-7 · (‖A‖ + S)``, ``S = Σ_j |w_j| ‖J_j‖``. The first term bounds the
rounding of forming ``A = Jᵀw`` in ``J``'s dtype (``γ_m Σ_j |w_j| |J_j|`` per coordinate); the
second is what a float64 Gramian resolves (``√eps64 ≈ 1.5e-8``, with margin): the solver's
certificate accepts face residuals at that level on singular problems.

Every test here runs with quadprog forbidden (the ``no_quadprog`` fixture): the batched solver
must certify each problem itself.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jdoptim.aggregation import DualProj, UPGrad
from jdoptim.linalg import gramian, project_weights, trim_gramian
from tests.linalg import _reference as ref

F32, F64 = torch.float32, torch.float64
TOL = {F32: 1e-4, F64: 1e-6}


@pytest.fixture(autouse=True)
def no_quadprog(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the quadprog fallback ran")

    monkeypatch.setattr("jdoptim.linalg._active_set.project_weights_quadprog", forbidden)


def _error(ours: np.ndarray, expected: np.ndarray, matrix: np.ndarray) -> float:
    floor = 1e-2 * float(np.linalg.norm(matrix, axis=1).mean())
    return float(np.linalg.norm(ours - expected) / max(np.linalg.norm(expected), floor, 1e-300))


def _check(aggregator, matrix: torch.Tensor, expected: np.ndarray) -> torch.Tensor:
    """``aggregator(matrix)`` agrees with ``expected`` and conflicts with no row beyond ρ."""
    update = aggregator(matrix)
    assert update.dtype == matrix.dtype and bool(torch.isfinite(update).all())
    j = matrix.double().numpy()
    a = update.double().numpy()
    assert _error(a, expected, j) <= TOL[matrix.dtype]
    weights = aggregator.weights(matrix).double().numpy()
    norms = np.linalg.norm(j, axis=1)
    size = float(np.abs(weights) @ norms)
    eps = torch.finfo(matrix.dtype).eps
    rho = 2 * len(j) * eps * size + 1e-7 * (np.linalg.norm(a) + size)
    assert np.all(j @ a >= -norms * rho)
    return update


# --- Real training: per-sample Jacobians, early and late ------------------------------------


def _captures(large: bool) -> list[str]:
    from tests._realdata import CAPTURES

    names = []
    for dataset, kind, sizes, _ in CAPTURES:
        for b in sizes:
            if (b >= 128) == large:
                names += [f"{dataset}-{kind}-{phase}-B{b}" for phase in ("early", "late")]
    return names


def _real(realdata, name: str, aggregator_name: str) -> None:
    matrix = realdata[name].jacobian
    j = matrix.double().numpy()
    if aggregator_name == "UPGrad":
        _check(UPGrad(), matrix, ref.upgrad(j))
    else:
        _check(DualProj(), matrix, ref.dualproj(j))


@pytest.mark.parametrize("aggregator_name", ["UPGrad", "DualProj"])
@pytest.mark.parametrize("name", _captures(large=False))
def test_real_training(realdata, name, aggregator_name):
    """On main, late captures went to the quadprog fallback, 0.2-1.1 relative from NNLS."""
    _real(realdata, name, aggregator_name)


@pytest.mark.slow
@pytest.mark.parametrize("name", _captures(large=True))
def test_real_training_large_batches(realdata, name):
    """B = 128, 256: every row's projection computed, 16 of them checked against NNLS (and the
    DualProj update), to keep the reference's cost at a few seconds."""
    matrix = realdata[name].jacobian
    m = len(matrix)
    weights = project_weights(gramian(matrix), torch.eye(m, dtype=F64))
    j = matrix.double().numpy()
    for i in range(0, m, m // 16):
        expected = ref.project(j, j[i])
        assert _error((weights[i].to(F32) @ matrix).double().numpy(), expected, j) <= TOL[F32]
    _check(DualProj(), matrix, ref.dualproj(j))


def test_real_training_is_ill_conditioned(realdata):
    """The captures are the inputs the issue describes: late diagonals spread over > 1e9."""
    late = realdata["digits-mlp-late-B64"].gramian.diagonal()
    early = realdata["digits-mlp-early-B64"].gramian.diagonal()
    assert float(late.max() / late.min()) > 1e9 > 1e3 > float(early.max() / early.min())


@pytest.mark.parametrize("name", ["digits-mlp-late-B64", "breast_cancer-mlp-late-B64"])
def test_project_weights_float64_on_real_gramians(realdata, name):
    """The weights themselves, from the float64 Gramian, for every row as target."""
    j = realdata[name].jacobian.double()
    weights = project_weights(j @ j.T, torch.eye(len(j), dtype=F64))
    assert bool((weights >= torch.eye(len(j), dtype=F64)).all())
    jn = j.numpy()
    for i in range(0, len(j), 7):
        expected = ref.project(jn, jn[i])
        assert _error((weights[i] @ j).numpy(), expected, jn) <= 1e-6


# --- Stationary families --------------------------------------------------------------------

STATIONARY = [
    (n, rank, zeros)
    for n in (10, 100)
    for rank in (1, 5, 10, 19)
    for zeros in (0, 5)
    if rank <= n and (rank <= 20 - zeros - 1 or zeros == 0)
]


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize(("n", "rank", "zeros"), STATIONARY)
def test_stationary_families(dtype, n, rank, zeros):
    """On main, float32: updates with min(J·A(J)) ≈ -0.18 and weights up to 9e6."""
    matrix = ref.stationary(20, n, rank, zeros, seed=rank + n + zeros)
    if zeros == 0:  # strongly stationary: every row's projection is 0
        assert np.allclose(ref.upgrad(matrix), 0.0, atol=1e-8)
    j = torch.from_numpy(matrix).to(dtype)
    for aggregator, expected in (
        (UPGrad(), ref.upgrad(matrix)),
        (DualProj(), ref.dualproj(matrix)),
    ):
        _check(aggregator, j, expected)
        weights = aggregator.weights(j).double()
        size = float(weights.abs() @ j.double().norm(dim=1))
        assert size <= 100 * float(j.double().norm(dim=1).sum())  # small-norm weights


# --- Adversarial rows ------------------------------------------------------------------------


def test_small_row_is_exact():
    """The update is anti-parallel to the small row: exactly 0 (main: 0.5)."""
    matrix = torch.tensor([[1.0], [-1e-8]], dtype=F64)
    assert UPGrad()(matrix).item() == 0.0
    assert DualProj()(matrix).item() == 0.0


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize(("decades", "seed"), [(16, 0), (12, 1), (12, 2)])
def test_row_norms_spread(dtype, decades, seed):
    """Rows over 1e-8…1e8 (main: 1-3.5% error, cosine -0.46) and over 1e12."""
    matrix = ref.spread_rows(24, 30, decades, seed)
    j = torch.from_numpy(matrix).to(dtype)
    jd = j.double().numpy()
    _check(UPGrad(), j, ref.upgrad(jd))
    _check(DualProj(), j, ref.dualproj(jd))


@pytest.mark.parametrize("dtype", [F64, F32])
def test_duplicated_and_zero_rows(dtype):
    rng = np.random.default_rng(3)
    base = rng.normal(size=(10, 15))
    matrix = np.concatenate([base, base[:6], np.zeros((3, 15)), 1e-3 * base[6:9]])
    j = torch.from_numpy(matrix).to(dtype)
    _check(UPGrad(), j, ref.upgrad(matrix))
    _check(DualProj(), j, ref.dualproj(matrix))
    weights = project_weights(gramian(j), torch.eye(len(j), dtype=F64))
    zero = slice(16, 19)
    assert torch.equal(weights[:, zero], torch.eye(len(j), dtype=F64)[:, zero])  # never added


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e-10, 1e10, 1e20, 1e30])
@pytest.mark.parametrize("kind", ["conflicting", "stationary"])
def test_homogeneity(dtype, scale, kind):
    if kind == "conflicting":
        matrix = ref.spread_rows(12, 20, 4, seed=5)
    else:
        matrix = ref.stationary(12, 20, 6, 0, seed=5)
    base = torch.from_numpy(matrix).to(dtype)
    for aggregator in (UPGrad(), DualProj()):
        expected = aggregator(base).double()
        scaled = aggregator(base * scale).double() / scale
        floor = 1e-2 * float(base.double().norm(dim=1).mean())
        error = float((scaled - expected).norm()) / max(float(expected.norm()), floor)
        assert error <= TOL[dtype]


# --- Hypothesis fuzzing: UPGrad and DualProj vs NNLS -----------------------------------------

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")


@hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
@hypothesis.given(
    m=st.integers(1, 12),
    n=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
    spread=st.sampled_from([0.0, 6.0, 12.0]),
    scale=st.sampled_from([1e-30, 1e-8, 1.0, 1e8, 1e30]),
    duplicates=st.integers(0, 3),
    zero_rows=st.integers(0, 2),
    dtype=st.sampled_from([F64, F32]),
)
def test_fuzz_against_nnls(m, n, seed, spread, scale, duplicates, zero_rows, dtype):
    matrix = ref.spread_rows(m, n, spread, seed)
    matrix = np.concatenate([matrix, matrix[:duplicates], np.zeros((zero_rows, n))])
    j = torch.from_numpy(matrix * scale).to(dtype)
    jd = j.double().numpy() / scale
    for aggregator, expected in ((UPGrad(), ref.upgrad(jd)), (DualProj(), ref.dualproj(jd))):
        update = aggregator(j).double().numpy() / scale
        assert _error(update, expected, jd) <= TOL[dtype]


# --- trim_gramian ---------------------------------------------------------------------------


def test_trim_removes_rounding_rank_only_below_float64():
    matrix = ref.stationary(20, 100, 19, 5, seed=4)  # exactly rank 19
    j32 = torch.from_numpy(matrix).float()
    g = gramian(j32)
    assert torch.equal(trim_gramian(g, torch.finfo(F64).eps), g)  # a no-op for float64 data
    well = gramian(torch.randn(8, 30))
    assert torch.equal(trim_gramian(well, torch.finfo(F32).eps), well)  # nothing to remove
    trimmed = trim_gramian(g, torch.finfo(F32).eps)
    d = trimmed.diagonal().sqrt()
    scaled = trimmed / d.unsqueeze(1) / d.unsqueeze(0)
    assert float(torch.linalg.eigvalsh(scaled)[0]) < 1e-13
    torch.testing.assert_close(trimmed, g, rtol=1e-6, atol=1e-6 * float(g.diagonal().max()))


# --- The quadprog reference (public alternative) --------------------------------------------


@pytest.mark.parametrize("name", ["digits-mlp-late-B32", "breast_cancer-mlp-late-B16"])
def test_quadprog_reference_on_real_gramians(realdata, name):
    """On main its eigenvalue and row cuts dropped the fitted samples' constraints."""
    from jdoptim.linalg import project_weights_quadprog

    j = realdata[name].jacobian.double()
    weights = project_weights_quadprog(j @ j.T, torch.eye(len(j), dtype=F64))
    jn = j.numpy()
    assert _error((weights.mean(dim=0) @ j).numpy(), ref.upgrad(jn), jn) <= 1e-6


def test_quadprog_reference_small_and_spread_rows():
    from jdoptim.linalg import project_weights_quadprog

    j = torch.tensor([[1.0], [-1e-8]], dtype=F64)
    assert (project_weights_quadprog(j @ j.T, torch.eye(2, dtype=F64)).mean(0) @ j).item() == 0
    matrix = ref.spread_rows(16, 20, 16, seed=7)
    j = torch.from_numpy(matrix)
    weights = project_weights_quadprog(j @ j.T, torch.eye(16, dtype=F64))
    assert _error((weights.mean(dim=0) @ j).numpy(), ref.upgrad(matrix), matrix) <= 1e-6
