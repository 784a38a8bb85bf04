"""Aggregators (``[m, n]`` Jacobian → ``[n]`` update) and their weightings (→ ``[m]`` weights)."""

from jdoptim.aggregation._aligned_mtl import AlignedMTL, AlignedMTLWeighting
from jdoptim.aggregation._bases import (
    Aggregator,
    GramianWeightedAggregator,
    WeightedAggregator,
    Weighting,
)
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
from jdoptim.aggregation._double_sampling import (
    DoubleSamplingWeighting,
    cross_gramian,
    jac_pair_to_grad,
)
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

__all__ = [
    "IMTLG",
    "MGDA",
    "PCD",
    "Aggregator",
    "AlignedMTL",
    "AlignedMTLWeighting",
    "CAGrad",
    "CAGradWeighting",
    "CRMOGMWeighting",
    "ConFIG",
    "ConFIGWeighting",
    "Constant",
    "ConstantWeighting",
    "DoubleSamplingWeighting",
    "DualProj",
    "DualProjWeighting",
    "ExcessMTL",
    "ExcessMTLWeighting",
    "FairGrad",
    "FairGradWeighting",
    "GradDrop",
    "GradVac",
    "GradVacWeighting",
    "GramianWeightedAggregator",
    "IMTLGWeighting",
    "Krum",
    "KrumWeighting",
    "MGDAWeighting",
    "Mean",
    "MeanWeighting",
    "MoDoWeighting",
    "NashMTL",
    "NashMTLWeighting",
    "PCDWeighting",
    "PCGrad",
    "PCGradWeighting",
    "Random",
    "RandomWeighting",
    "SDMGradWeighting",
    "Sum",
    "SumWeighting",
    "TrimmedMean",
    "UPGrad",
    "UPGradWeighting",
    "WeightedAggregator",
    "Weighting",
    "cross_gramian",
    "jac_pair_to_grad",
]
