"""Scalarizers: combine a tensor of losses into one scalar, then one ordinary backward pass.

They are the loss-combining baselines of the gradient-combining
:mod:`jdoptim.aggregation` methods, with TorchJD 0.18's names, parameters and semantics. Use one
directly (``scalarizer(losses).backward()``) or pass it to :class:`~jdoptim.JacobianOptimizer`
in place of an aggregator, so that the same training loop compares both families.

>>> import torch
>>> from jdoptim.scalarization import Mean
>>> Mean()(torch.tensor([1.0, 2.0, 3.0]))
tensor(2.)
"""

from jdoptim.scalarization._base import Scalarizer
from jdoptim.scalarization._constant import Constant
from jdoptim.scalarization._cosmos import COSMOS
from jdoptim.scalarization._dwa import DWA
from jdoptim.scalarization._famo import FAMO
from jdoptim.scalarization._geometric_mean import GeometricMean
from jdoptim.scalarization._imtl_l import IMTLL
from jdoptim.scalarization._mean import Mean
from jdoptim.scalarization._pbi import PBI
from jdoptim.scalarization._random import Random
from jdoptim.scalarization._stch import STCH
from jdoptim.scalarization._sum import Sum
from jdoptim.scalarization._uw import UW

__all__ = [
    "COSMOS",
    "DWA",
    "FAMO",
    "IMTLL",
    "PBI",
    "STCH",
    "UW",
    "Constant",
    "GeometricMean",
    "Mean",
    "Random",
    "Scalarizer",
    "Sum",
]
