"""``AGGREGATORS_UNDER_TEST``: configurations of every method, with the properties it claims.

The properties come from the package's claims table (``jdoptim/aggregation/_claims.py``, which
the documentation also reads); this file adds only what is test-specific: a factory
``m -> Aggregator`` (``m`` is the number of rows of the matrices it will see, for methods whose
arguments depend on it), tolerances, and the claims that change with the hyper-parameters chosen
here. ``tests/aggregation/test_battery.py`` runs every entry through the shared battery (shapes,
dtypes, edge cases, and each claimed property).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

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
from jdoptim.aggregation._claims import Claims, claims_of


@dataclass(frozen=True)
class Entry:
    """One configuration under test: the method's :class:`Claims` and the test-only knobs.

    ``claims`` is the package's table entry (``jdoptim/aggregation/_claims.py``), adjusted only
    where this configuration's hyper-parameters differ from the defaults and the entry's
    ``conditions`` say the property changes (e.g. CAGrad with ``c >= 1`` is non-conflicting).

    ``conflict_tol`` is the allowed conflict ``min_i (J A(J))_i`` in units of ``max_i ‖J_i‖²``
    on top of the rounding allowance of the dtype (a method that stops early, such as MGDA's
    Frank–Wolfe, states its own bound). ``rtol`` likewise loosens the equality checks
    (homogeneity, permutation invariance) for methods that are exact only up to their stopping
    rule. ``solves_on_gramian`` marks methods that solve a problem on ``G = J Jᵀ`` (condition
    number ``κ(J)²``): they are compared up to ``sqrt(m · eps)``, the order of the singular values
    that rounding erases from a Gramian, with a ``sqrt(m)`` margin.
    """

    name: str
    claims: Claims
    make: Callable[[int], Aggregator]
    conflict_tol: float = 0.0
    rtol: float = 0.0
    solves_on_gramian: bool = False
    min_rows: int = 1  # fewer rows: the method must raise a ValueError
    # Non-conflicting is claimed only where 0 is not in the convex hull of the rows (the claims'
    # conditions: there the method's own problem has no solution).
    off_hull_only: bool = False

    @property
    def non_conflicting(self) -> bool:
        return self.claims.non_conflicting

    @property
    def homogeneous(self) -> bool:
        return self.claims.homogeneous

    @property
    def permutation_invariant(self) -> bool:
        return self.claims.permutation_invariant

    @property
    def linear(self) -> bool:
        return self.claims.linear

    @property
    def stateless(self) -> bool:
        return self.claims.stateless

    @property
    def deterministic(self) -> bool:
        return self.claims.deterministic

    def __str__(self) -> str:
        return self.name


_KNOBS = {"conflict_tol", "rtol", "solves_on_gramian", "min_rows", "off_hull_only"}


def entry(name: str, cls: type, make: Callable[[int], Aggregator], **kwargs) -> Entry:
    """An :class:`Entry` for ``cls``: claim overrides and test knobs are told apart by name."""
    knobs = {k: v for k, v in kwargs.items() if k in _KNOBS}
    overrides = {k: v for k, v in kwargs.items() if k not in _KNOBS}
    return Entry(name, replace(claims_of(cls), **overrides), make, **knobs)


def _ramp(m: int) -> torch.Tensor:
    """A non-uniform preference / weight vector of length ``m`` (``1, 2, ..., m`` normalised)."""
    weights = torch.arange(1, m + 1, dtype=torch.float64)
    return weights / weights.sum()


# Test knobs shared by several entries.
GRAMIAN = {"solves_on_gramian": True}
# Frank–Wolfe stops when its step γ < ε: then min_t ⟨d, J_t⟩ > ‖d‖² - ε‖d - J_t‖² >= -4εR², and
# its path (hence the update) is exact only up to that stopping rule.
MGDA_DEFAULT = {"conflict_tol": 4 * 1e-3, "rtol": 1e-2}
# A preference vector other than uniform: permutation invariance is claimed only without one.
PREF = {"permutation_invariant": False}

AGGREGATORS_UNDER_TEST: list[Entry] = [
    entry("UPGrad", UPGrad, lambda m: UPGrad(), **GRAMIAN),
    entry("UPGrad-pref", UPGrad, lambda m: UPGrad(_ramp(m)), **PREF, **GRAMIAN),
    entry("DualProj", DualProj, lambda m: DualProj(), **GRAMIAN),
    entry("DualProj-pref", DualProj, lambda m: DualProj(_ramp(m)), **PREF, **GRAMIAN),
    entry("MGDA", MGDA, lambda m: MGDA(), **GRAMIAN, **MGDA_DEFAULT),
    entry("Mean", Mean, lambda m: Mean()),
    entry("Sum", Sum, lambda m: Sum()),
    entry("Constant", Constant, lambda m: Constant(_ramp(m) - 0.5 / m)),
    entry("Krum", Krum, lambda m: Krum(max((m - 3) // 4, 0), max(m // 4, 1)), min_rows=3),
    entry("TrimmedMean", TrimmedMean, lambda m: TrimmedMean((m - 1) // 4)),
    entry(
        "CRMOGM-MGDA",
        CRMOGMWeighting,
        lambda m: GramianWeightedAggregator(CRMOGMWeighting(MGDAWeighting())),
        rtol=1e-2,
    ),
    entry("MoDo", MoDoWeighting, lambda m: GramianWeightedAggregator(MoDoWeighting())),
    entry("SDMGrad", SDMGradWeighting, lambda m: GramianWeightedAggregator(SDMGradWeighting())),
    entry("AlignedMTL", AlignedMTL, lambda m: AlignedMTL(), **GRAMIAN),
    entry(
        "AlignedMTL-pref-median",
        AlignedMTL,
        lambda m: AlignedMTL(_ramp(m), scale_mode="median"),
        **PREF,
        **GRAMIAN,
    ),
    entry("CAGrad", CAGrad, lambda m: CAGrad(c=0.5), **GRAMIAN),
    # c >= 1: non-conflicting (the claims' conditions).
    entry("CAGrad-c1", CAGrad, lambda m: CAGrad(c=1.0), non_conflicting=True, **GRAMIAN),
    entry("ConFIG", ConFIG, lambda m: ConFIG(), **GRAMIAN),
    entry("ConFIG-pref", ConFIG, lambda m: ConFIG(_ramp(m)), **PREF, **GRAMIAN),
    entry("ExcessMTL", ExcessMTL, lambda m: ExcessMTL()),
    entry("FairGrad", FairGrad, lambda m: FairGrad(alpha=1.0), off_hull_only=True, **GRAMIAN),
    entry("GradDrop", GradDrop, lambda m: GradDrop(seed=0)),
    entry("GradVac", GradVac, lambda m: GradVac(seed=0), **GRAMIAN),
    entry("IMTLG", IMTLG, lambda m: IMTLG(), **GRAMIAN),
    entry(
        "NashMTL",
        NashMTL,
        lambda m: NashMTL(n_tasks=m, max_norm=0.0),
        homogeneous=True,  # max_norm=0 (the claims' conditions)
        # optim_niter=20 Newton steps: exact only up to that stopping rule when 0 is in the hull.
        rtol=1e-2,
        **GRAMIAN,
    ),
    entry("PCD", PCD, lambda m: PCD(), **GRAMIAN),
    entry("PCGrad", PCGrad, lambda m: PCGrad(seed=0), **GRAMIAN),
    entry("Random", Random, lambda m: Random(seed=0)),
]
