"""The claims table: what each aggregator is, where it comes from, and which properties it has.

One :class:`Claims` record per method (its aggregator class and/or its weighting class). The
documentation generates a page per method from it, and the property tests
(``tests/aggregation``) check every property it states on adversarial inputs, so both read the
same source. The properties hold with the default hyper-parameters unless ``conditions`` says
otherwise; stateful methods state them for a fresh instance (the same state history).

Examples
--------
>>> from jdoptim.aggregation import UPGrad
>>> claims = claims_of(UPGrad)
>>> claims.non_conflicting, claims.gramian_only, claims.paper.year
(True, True, 2024)
"""

from __future__ import annotations

from dataclasses import dataclass

from jdoptim.aggregation._aligned_mtl import AlignedMTL, AlignedMTLWeighting
from jdoptim.aggregation._bases import Aggregator, Weighting
from jdoptim.aggregation._cagrad import CAGrad, CAGradWeighting
from jdoptim.aggregation._config import ConFIG, ConFIGWeighting
from jdoptim.aggregation._constant import (
    Constant,
    ConstantWeighting,
    Mean,
    MeanWeighting,
    Sum,
    SumWeighting,
)
from jdoptim.aggregation._crmogm import CRMOGMWeighting
from jdoptim.aggregation._dualproj import DualProj, DualProjWeighting
from jdoptim.aggregation._excess_mtl import ExcessMTL, ExcessMTLWeighting
from jdoptim.aggregation._fairgrad import FairGrad, FairGradWeighting
from jdoptim.aggregation._graddrop import GradDrop
from jdoptim.aggregation._gradvac import GradVac, GradVacWeighting
from jdoptim.aggregation._imtl_g import IMTLG, IMTLGWeighting
from jdoptim.aggregation._krum import Krum, KrumWeighting
from jdoptim.aggregation._mgda import MGDA, MGDAWeighting
from jdoptim.aggregation._modo import MoDoWeighting
from jdoptim.aggregation._nash_mtl import NashMTL, NashMTLWeighting
from jdoptim.aggregation._pcd import PCD, PCDWeighting
from jdoptim.aggregation._pcgrad import PCGrad, PCGradWeighting
from jdoptim.aggregation._random_weighting import Random, RandomWeighting
from jdoptim.aggregation._sdmgrad import SDMGradWeighting
from jdoptim.aggregation._trimmed_mean import TrimmedMean
from jdoptim.aggregation._upgrad import UPGrad, UPGradWeighting

__all__ = ["CLAIMS", "Claims", "HyperParameter", "Paper", "claims_of"]


@dataclass(frozen=True)
class Paper:
    """The publication that defines a method."""

    title: str
    authors: tuple[str, ...]
    year: int
    venue: str
    url: str


@dataclass(frozen=True)
class HyperParameter:
    """One constructor argument: its name, default (as written in code) and meaning."""

    name: str
    default: str
    meaning: str


@dataclass(frozen=True)
class Claims:
    """What a method is and which properties it has (see the module docstring).

    ``aggregator`` / ``weighting`` are the public classes (either may be ``None``: a weighting
    used through :class:`~jdoptim.aggregation.GramianWeightedAggregator`, an aggregator that is
    not ``Jᵀw``). The flags describe the aggregator ``A``: ``non_conflicting`` (``J A(J) >= 0``
    up to rounding), ``homogeneous`` (``A(sJ) = s A(J)`` for ``s > 0``),
    ``permutation_invariant`` (``A(PJ) = A(J)``), ``linear``, ``stateless`` (no state carried
    between calls), ``deterministic`` (the same input gives the same output, without a seed),
    ``gramian_only`` (the weights need only ``G = J Jᵀ``; otherwise the method needs ``J``).
    """

    name: str
    summary: str
    aggregator: type[Aggregator] | None
    weighting: type[Weighting] | None
    paper: Paper | None
    hyperparameters: tuple[HyperParameter, ...] = ()
    non_conflicting: bool = False
    homogeneous: bool = False
    permutation_invariant: bool = False
    linear: bool = False
    stateless: bool = True
    deterministic: bool = True
    gramian_only: bool = True
    conditions: str = ""


def _p(title: str, authors: str, year: int, venue: str, url: str) -> Paper:
    return Paper(title, tuple(a.strip() for a in authors.split(",")), year, venue, url)


def _h(*triples: tuple[str, str, str]) -> tuple[HyperParameter, ...]:
    return tuple(HyperParameter(*t) for t in triples)


_PREF = ("pref_vector", "None", "preference over the rows (None: uniform)")
_SEED = ("seed", "None", "seed of the method's own random generator")
_PROJECTOR = (
    "projector",
    "None",
    "dual-cone projector; None: the exact ExactProjector() (QuadprogProjector() reproduces "
    "TorchJD's regularised answers)",
)

CLAIMS: tuple[Claims, ...] = (
    Claims(
        "UPGrad",
        "Project every gradient onto the dual cone of all of them, then average.",
        UPGrad,
        UPGradWeighting,
        _p(
            "Jacobian Descent for Multi-Objective Optimization",
            "Pierre Quinton, Valérian Rey",
            2024,
            "arXiv",
            "https://arxiv.org/abs/2406.16232",
        ),
        _h(_PREF, _PROJECTOR),
        non_conflicting=True,
        homogeneous=True,
        permutation_invariant=True,
        conditions="permutation invariant with the default pref_vector",
    ),
    Claims(
        "DualProj",
        "Project the averaged gradient onto the dual cone of the gradients.",
        DualProj,
        DualProjWeighting,
        _p(
            "Gradient Episodic Memory for Continual Learning",
            "David Lopez-Paz, Marc'Aurelio Ranzato",
            2017,
            "NeurIPS",
            "https://arxiv.org/abs/1706.08840",
        ),
        _h(_PREF, _PROJECTOR),
        non_conflicting=True,
        homogeneous=True,
        permutation_invariant=True,
        conditions="permutation invariant with the default pref_vector",
    ),
    Claims(
        "MGDA",
        "The minimum-norm point of the convex hull of the gradients.",
        MGDA,
        MGDAWeighting,
        _p(
            "Multiple-gradient descent algorithm (MGDA) for multiobjective optimization",
            "Jean-Antoine Désidéri",
            2012,
            "Comptes Rendus Mathematique",
            "https://doi.org/10.1016/j.crma.2012.03.014",
        ),
        _h(
            ("epsilon", "0.001", "Frank-Wolfe stops when its step is below epsilon"),
            ("max_iters", "100", "maximum number of Frank-Wolfe iterations"),
        ),
        non_conflicting=True,
        homogeneous=True,
        permutation_invariant=True,
        conditions="exact up to the Frank-Wolfe stopping rule (epsilon)",
    ),
    Claims(
        "Mean",
        "The average of the gradients.",
        Mean,
        MeanWeighting,
        None,
        homogeneous=True,
        permutation_invariant=True,
        linear=True,
    ),
    Claims(
        "Sum",
        "The sum of the gradients (what loss.sum().backward() computes).",
        Sum,
        SumWeighting,
        None,
        homogeneous=True,
        permutation_invariant=True,
        linear=True,
    ),
    Claims(
        "Constant",
        "A fixed linear combination of the gradients.",
        Constant,
        ConstantWeighting,
        None,
        _h(("weights", "(required)", "the [m] weights")),
        homogeneous=True,
        linear=True,
    ),
    Claims(
        "Krum",
        "Average the gradients closest to their nearest neighbours (Byzantine-robust).",
        Krum,
        KrumWeighting,
        _p(
            "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent",
            "Peva Blanchard, El Mahdi El Mhamdi, Rachid Guerraoui, Julien Stainer",
            2017,
            "NeurIPS",
            "https://arxiv.org/abs/1703.02757",
        ),
        _h(
            ("n_byzantine", "(required)", "number f of adversarial rows tolerated"),
            ("n_selected", "1", "number of rows averaged (1: Krum, more: Multi-Krum)"),
        ),
        homogeneous=True,
        permutation_invariant=True,
    ),
    Claims(
        "TrimmedMean",
        "Coordinate-wise mean after dropping the largest and smallest entries.",
        TrimmedMean,
        None,
        _p(
            "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
            "Dong Yin, Yudong Chen, Kannan Ramchandran, Peter Bartlett",
            2018,
            "ICML",
            "https://arxiv.org/abs/1803.01498",
        ),
        _h(("trim_number", "(required)", "number of entries dropped at each end of a column")),
        homogeneous=True,
        permutation_invariant=True,
        gramian_only=False,
    ),
    Claims(
        "CR-MOGM",
        "An exponential moving average of the weights of any weighting.",
        None,
        CRMOGMWeighting,
        _p(
            "On the Convergence of Stochastic Multi-Objective Gradient Manipulation and Beyond",
            "Shiji Zhou, Wenpeng Zhang, Jiyan Jiang, Wenliang Zhong, Jinjie Gu, Wenwu Zhu",
            2022,
            "NeurIPS",
            "https://proceedings.neurips.cc/paper_files/paper/2022/hash/"
            "f91bd64a3620aad8e70a27ad9cb3ca57-Abstract-Conference.html",
        ),
        _h(
            ("weighting", "(required)", "the weighting whose weights are averaged"),
            ("alpha", "0.9", "weight of the previous average"),
            ("initial_weights", "None", "the average before the first call (None: uniform)"),
        ),
        homogeneous=True,
        permutation_invariant=True,
        stateless=False,
        conditions="homogeneous and permutation invariant when the wrapped weighting is "
        "(claims stated for MGDA's)",
    ),
    Claims(
        "MoDo",
        "One stochastic projected-gradient step on the MGDA weights per call (double sampling).",
        None,
        MoDoWeighting,
        _p(
            "Three-Way Trade-Off in Multi-Objective Learning: Optimization, Generalization and "
            "Conflict-Avoidance",
            "Lisha Chen, Heshan Fernando, Yiming Ying, Tianyi Chen",
            2023,
            "NeurIPS",
            "https://arxiv.org/abs/2305.20057",
        ),
        _h(
            ("gamma", "0.1", "step size of the weights, in units of 1/|g|^2"),
            ("rho", "0.1", "L2 regularisation of the weights"),
        ),
        permutation_invariant=True,
        stateless=False,
    ),
    Claims(
        "SDMGrad",
        "MGDA weights pulled towards a preferred direction by projected momentum steps.",
        None,
        SDMGradWeighting,
        _p(
            "Direction-oriented Multi-objective Learning: Simple and Provable Stochastic "
            "Algorithms",
            "Peiyao Xiao, Hao Ban, Kaiyi Ji",
            2023,
            "NeurIPS",
            "https://arxiv.org/abs/2305.18409",
        ),
        _h(
            ("lr", "10.0", "step size of the inner weight iterations"),
            ("momentum", "0.5", "momentum of the inner iterations"),
            ("n_iter", "20", "inner iterations per call"),
            ("lambda_", "0.3", "pull towards the preferred direction"),
            _PREF,
        ),
        homogeneous=True,
        permutation_invariant=True,
        stateless=False,
        conditions="permutation invariant with the default pref_vector",
    ),
    Claims(
        "AlignedMTL",
        "Align the principal components of the gradients to equal norm, then combine.",
        AlignedMTL,
        AlignedMTLWeighting,
        _p(
            "Independent Component Alignment for Multi-Task Learning",
            "Dmitry Senushkin, Nikolay Patakin, Arseny Kuznetsov, Anton Konushin",
            2023,
            "CVPR",
            "https://arxiv.org/abs/2305.19000",
        ),
        _h(_PREF, ("scale_mode", "'min'", "singular value the components are scaled to")),
        homogeneous=True,
        permutation_invariant=True,
        conditions="permutation invariant with the default pref_vector",
    ),
    Claims(
        "CAGrad",
        "The direction near the mean gradient that most improves the worst loss.",
        CAGrad,
        CAGradWeighting,
        _p(
            "Conflict-Averse Gradient Descent for Multi-task Learning",
            "Bo Liu, Xingchao Liu, Xiaojie Jin, Peter Stone, Qiang Liu",
            2021,
            "NeurIPS",
            "https://arxiv.org/abs/2110.14048",
        ),
        _h(
            ("c", "(required)", "radius of the ball around the mean gradient, relative to it"),
            ("norm_eps", "0.0001", "relative norm below which the mean gradient counts as 0"),
        ),
        homogeneous=True,
        permutation_invariant=True,
        conditions="non-conflicting when c >= 1",
    ),
    Claims(
        "ConFIG",
        "The direction with equal cosine to every gradient, scaled by their projections.",
        ConFIG,
        ConFIGWeighting,
        _p(
            "ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks",
            "Qiang Liu, Mengyu Chu, Nils Thuerey",
            2024,
            "arXiv",
            "https://arxiv.org/abs/2408.11104",
        ),
        _h(_PREF),
        homogeneous=True,
        permutation_invariant=True,
        conditions="non-conflicting when the non-zero unit gradients are linearly independent; "
        "permutation invariant with the default pref_vector",
    ),
    Claims(
        "ExcessMTL",
        "Weights on the simplex that follow each task's estimated excess risk.",
        ExcessMTL,
        ExcessMTLWeighting,
        _p(
            "Robust Multi-Task Learning with Excess Risks",
            "Yifei He, Shiji Zhou, Guojun Zhang, Hyokun Yun, Yi Xu, Belinda Zeng, "
            "Trishul Chilimbi, Han Zhao",
            2024,
            "ICML",
            "https://arxiv.org/abs/2402.02009",
        ),
        _h(
            ("robust_step_size", "1.0", "step size of the exponentiated-gradient update"),
            ("n_warmup_steps", "0", "calls that only estimate the reference risks"),
        ),
        homogeneous=True,
        permutation_invariant=True,
        stateless=False,
        gramian_only=False,
    ),
    Claims(
        "FairGrad",
        "alpha-fair weights: maximise the alpha-fair utility of the per-loss improvements.",
        FairGrad,
        FairGradWeighting,
        _p(
            "Fair Resource Allocation in Multi-Task Learning",
            "Hao Ban, Kaiyi Ji",
            2024,
            "ICML",
            "https://arxiv.org/abs/2402.15638",
        ),
        _h(
            ("alpha", "(required)", "fairness parameter (1: proportional fairness)"),
            ("max_iters", "None", "iterations of the weight solver (None: until converged)"),
        ),
        non_conflicting=True,
        permutation_invariant=True,
        conditions="scale-invariant for alpha = 1, A(sJ) = s^((1-alpha)/(1+alpha)) A(J); "
        "non-conflicting when 0 is not in the convex hull of the rows (the paper's utility "
        "maximisation then has a solution, with g_i^T d = w_i^(-1/alpha) > 0; at a Pareto-"
        "stationary J it has none, and the limit direction returned is exact only up to rounding)",
    ),
    Claims(
        "GradDrop",
        "Keep, per coordinate, only the gradients of a randomly chosen sign.",
        GradDrop,
        None,
        _p(
            "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout",
            "Zhao Chen, Jiquan Ngiam, Yanping Huang, Thang Luong, Henrik Kretzschmar, "
            "Yuning Chai, Dragomir Anguelov",
            2020,
            "NeurIPS",
            "https://arxiv.org/abs/2010.06808",
        ),
        _h(
            ("f", "identity", "function applied to the sign purity"),
            ("leak", "None", "per-row leak of the dropped part"),
            _SEED,
        ),
        homogeneous=True,
        stateless=False,
        deterministic=False,
        gramian_only=False,
    ),
    Claims(
        "GradVac",
        "Move each gradient towards an adaptive target cosine with the others, then sum.",
        GradVac,
        GradVacWeighting,
        _p(
            "Gradient Vaccine: Investigating and Improving Multi-task Optimization in Massively "
            "Multilingual Models",
            "Zirui Wang, Yulia Tsvetkov, Orhan Firat, Yuan Cao",
            2021,
            "ICLR",
            "https://arxiv.org/abs/2010.05874",
        ),
        _h(
            ("beta", "0.5", "EMA decay of the target cosines"),
            ("eps", "1e-08", "added to sqrt(1 - target^2) in the update's denominator"),
            _SEED,
        ),
        homogeneous=True,
        stateless=False,
        deterministic=False,
    ),
    Claims(
        "IMTL-G",
        "The update with equal projections on every unit gradient.",
        IMTLG,
        IMTLGWeighting,
        _p(
            "Towards Impartial Multi-task Learning",
            "Liyang Liu, Yi Li, Zhanghui Kuang, Jing-Hao Xue, Yimin Chen, Wenming Yang, "
            "Qingmin Liao, Wayne Zhang",
            2021,
            "ICLR",
            "https://openreview.net/forum?id=IMPnRXEWpvr",
        ),
        homogeneous=True,
        permutation_invariant=True,
    ),
    Claims(
        "NashMTL",
        "The Nash bargaining solution of the tasks: J d proportional to 1/w.",
        NashMTL,
        NashMTLWeighting,
        _p(
            "Multi-Task Learning as a Bargaining Game",
            "Aviv Navon, Aviv Shamsian, Idan Achituve, Haggai Maron, Kenji Kawaguchi, "
            "Gal Chechik, Ethan Fetaya",
            2022,
            "ICML",
            "https://arxiv.org/abs/2202.01017",
        ),
        _h(
            ("n_tasks", "(required)", "number of rows m"),
            ("max_norm", "1.0", "clip the update to this norm (0: no clipping)"),
            ("update_weights_every", "1", "recompute the weights every this many calls"),
            ("optim_niter", "20", "iterations of the weight solver"),
        ),
        permutation_invariant=True,
        stateless=False,
        conditions="positively homogeneous with max_norm=0; non-conflicting at convergence",
    ),
    Claims(
        "PCD",
        "The direction nearest the primary gradient that makes progress on every other one.",
        PCD,
        PCDWeighting,
        _p(
            "Not All Objectives Are Born Equal: Priority-Constrained Descent for Hierarchical "
            "Multi-Objective Optimization",
            "Dara Varam, Mohamed I. AlHajri",
            2026,
            "arXiv",
            "https://arxiv.org/abs/2606.29521",
        ),
        _h(
            ("tau", "0.02", "fraction of progress required on every secondary loss"),
            ("beta", "0.999", "EMA decay of the squared gradient norms"),
            ("eps", "1e-08", "relative floor of the normalisers"),
        ),
        homogeneous=True,
        stateless=False,
        conditions="for a fresh instance (the same state history); steps on g_1 when the "
        "constraints are infeasible",
    ),
    Claims(
        "PCGrad",
        "Project each gradient off the others it conflicts with, in random order, then sum.",
        PCGrad,
        PCGradWeighting,
        _p(
            "Gradient Surgery for Multi-Task Learning",
            "Tianhe Yu, Saurabh Kumar, Abhishek Gupta, Sergey Levine, Karol Hausman, Chelsea Finn",
            2020,
            "NeurIPS",
            "https://arxiv.org/abs/2001.06782",
        ),
        _h(_SEED),
        homogeneous=True,
        stateless=False,
        deterministic=False,
    ),
    Claims(
        "Random",
        "A random convex combination of the gradients (softmax of Gaussian draws).",
        Random,
        RandomWeighting,
        _p(
            "Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task Learning",
            "Baijiong Lin, Feiyang Ye, Yu Zhang, Ivor W. Tsang",
            2022,
            "TMLR",
            "https://arxiv.org/abs/2111.10603",
        ),
        _h(_SEED),
        homogeneous=True,
        linear=True,
        stateless=False,
        deterministic=False,
        conditions="linear and homogeneous for given draws; permutation invariant in "
        "distribution only",
    ),
)
"""Every method of :mod:`jdoptim.aggregation`, in the order the documentation lists them."""


def claims_of(cls: type) -> Claims:
    """Return the :class:`Claims` of a public aggregator or weighting class.

    Raises
    ------
    KeyError
        If ``cls`` is not a method of the table.
    """
    for claims in CLAIMS:
        if cls in (claims.aggregator, claims.weighting):
            return claims
    raise KeyError(f"{getattr(cls, '__name__', cls)!r} has no entry in the claims table")
