"""``AGGREGATORS_UNDER_TEST``: every aggregator with the properties its docstring claims.

Adding a method is one line: an :class:`Entry` with a factory ``m -> Aggregator`` (``m`` is the
number of rows of the matrices it will see, for methods whose arguments depend on it) and the
flags of the properties that its docstring states. ``tests/aggregation/test_battery.py`` runs
every entry through the shared battery (shapes, dtypes, edge cases, and each claimed property).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from jdoptim.aggregation import (
    IMTLG,
    MGDA,
    PCD,
    Aggregator,
    AlignedMTL,
    CAGrad,
    ConFIG,
    Constant,
    CRMOGMWeighting,
    DualProj,
    ExcessMTL,
    FairGrad,
    GradDrop,
    GradVac,
    GramianWeightedAggregator,
    Krum,
    Mean,
    MGDAWeighting,
    MoDoWeighting,
    NashMTL,
    PCGrad,
    Random,
    SDMGradWeighting,
    Sum,
    TrimmedMean,
    UPGrad,
)


@dataclass(frozen=True)
class Entry:
    """One aggregator under test and the properties it claims.

    ``conflict_tol`` is the allowed conflict ``min_i (J A(J))_i`` in units of ``max_i ‖J_i‖²``
    on top of the rounding allowance of the dtype (a method that stops early, such as MGDA's
    Frank–Wolfe, states its own bound). ``rtol`` likewise loosens the equality checks
    (homogeneity, permutation invariance) for methods that are exact only up to their stopping
    rule. ``solves_on_gramian`` marks methods that solve a problem on ``G = J Jᵀ`` (condition
    number ``κ(J)²``): they are compared up to ``sqrt(m · eps)``, the order of the singular values
    that rounding erases from a Gramian (``project_weights_quadprog`` drops eigenvalues below
    ``eps · λ_max``), with a ``sqrt(m)`` margin.
    """

    name: str
    make: Callable[[int], Aggregator]
    non_conflicting: bool = False
    homogeneous: bool = False
    permutation_invariant: bool = False
    linear: bool = False
    stateless: bool = True
    deterministic: bool = True
    conflict_tol: float = 0.0
    rtol: float = 0.0
    solves_on_gramian: bool = False
    min_rows: int = 1  # fewer rows: the method must raise a ValueError

    def __str__(self) -> str:
        return self.name


def _ramp(m: int) -> torch.Tensor:
    """A non-uniform preference / weight vector of length ``m`` (``1, 2, ..., m`` normalised)."""
    weights = torch.arange(1, m + 1, dtype=torch.float64)
    return weights / weights.sum()


# Flag bundles shared by several entries.
SOLVER = {"non_conflicting": True, "homogeneous": True, "solves_on_gramian": True}
LINEAR = {"homogeneous": True, "linear": True}
# Frank–Wolfe stops when its step γ < ε: then min_t ⟨d, J_t⟩ > ‖d‖² - ε‖d - J_t‖² >= -4εR², and
# its path (hence the update) is exact only up to that stopping rule.
MGDA_DEFAULT = {"conflict_tol": 4 * 1e-3, "rtol": 1e-2}

AGGREGATORS_UNDER_TEST: list[Entry] = [
    Entry("UPGrad", lambda m: UPGrad(), permutation_invariant=True, **SOLVER),
    Entry("UPGrad-pref", lambda m: UPGrad(_ramp(m)), **SOLVER),
    Entry("DualProj", lambda m: DualProj(), permutation_invariant=True, **SOLVER),
    Entry("DualProj-pref", lambda m: DualProj(_ramp(m)), **SOLVER),
    Entry("MGDA", lambda m: MGDA(), permutation_invariant=True, **SOLVER, **MGDA_DEFAULT),
    Entry("Mean", lambda m: Mean(), permutation_invariant=True, **LINEAR),
    Entry("Sum", lambda m: Sum(), permutation_invariant=True, **LINEAR),
    Entry("Constant", lambda m: Constant(_ramp(m) - 0.5 / m), **LINEAR),
    Entry(
        "Krum",
        lambda m: Krum(max((m - 3) // 4, 0), max(m // 4, 1)),
        homogeneous=True,
        permutation_invariant=True,
        min_rows=3,
    ),
    Entry(
        "TrimmedMean",
        lambda m: TrimmedMean((m - 1) // 4),
        homogeneous=True,
        permutation_invariant=True,
    ),
    Entry(
        "CRMOGM-MGDA",
        lambda m: GramianWeightedAggregator(CRMOGMWeighting(MGDAWeighting())),
        homogeneous=True,
        permutation_invariant=True,
        stateless=False,
        rtol=1e-2,
    ),
    Entry(
        "MoDo",
        lambda m: GramianWeightedAggregator(MoDoWeighting()),
        permutation_invariant=True,
        stateless=False,
    ),
    Entry(
        "SDMGrad",
        lambda m: GramianWeightedAggregator(SDMGradWeighting()),
        homogeneous=True,
        permutation_invariant=True,
        stateless=False,
    ),
    Entry(
        "AlignedMTL",
        lambda m: AlignedMTL(),
        homogeneous=True,
        permutation_invariant=True,
        solves_on_gramian=True,
    ),
    Entry(
        "AlignedMTL-pref-median",
        lambda m: AlignedMTL(_ramp(m), scale_mode="median"),
        homogeneous=True,
        solves_on_gramian=True,
    ),
    Entry(
        "CAGrad",
        lambda m: CAGrad(c=0.5),
        homogeneous=True,
        permutation_invariant=True,
        solves_on_gramian=True,
    ),
    Entry("CAGrad-c1", lambda m: CAGrad(c=1.0), permutation_invariant=True, **SOLVER),
    Entry(
        "ConFIG",
        lambda m: ConFIG(),
        homogeneous=True,
        permutation_invariant=True,
        solves_on_gramian=True,
    ),
    Entry("ConFIG-pref", lambda m: ConFIG(_ramp(m)), homogeneous=True, solves_on_gramian=True),
    Entry(
        "ExcessMTL",
        lambda m: ExcessMTL(),
        homogeneous=True,
        permutation_invariant=True,
        stateless=False,
    ),
    Entry(
        "FairGrad",
        lambda m: FairGrad(alpha=1.0),
        non_conflicting=True,
        permutation_invariant=True,
        solves_on_gramian=True,
    ),
    Entry(
        "GradDrop",
        lambda m: GradDrop(seed=0),
        homogeneous=True,
        stateless=False,
        deterministic=False,
    ),
    Entry(
        "GradVac",
        lambda m: GradVac(seed=0),
        homogeneous=True,
        stateless=False,
        deterministic=False,
        solves_on_gramian=True,
    ),
    Entry(
        "IMTLG",
        lambda m: IMTLG(),
        homogeneous=True,
        permutation_invariant=True,
        solves_on_gramian=True,
    ),
    Entry(
        "NashMTL",
        lambda m: NashMTL(n_tasks=m, max_norm=0.0),
        # optim_niter=20 Newton steps: exact only up to that stopping rule when 0 is in the hull.
        rtol=1e-2,
        homogeneous=True,
        permutation_invariant=True,
        stateless=False,
        solves_on_gramian=True,
    ),
    Entry("PCD", lambda m: PCD(), stateless=False, solves_on_gramian=True),
    Entry(
        "PCGrad",
        lambda m: PCGrad(seed=0),
        homogeneous=True,
        stateless=False,
        deterministic=False,
        solves_on_gramian=True,
    ),
    Entry("Random", lambda m: Random(seed=0), stateless=False, deterministic=False, **LINEAR),
]
