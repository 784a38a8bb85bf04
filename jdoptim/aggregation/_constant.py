"""Fixed weightings: Mean, Sum and Constant."""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting
from jdoptim.aggregation._hyper import Hyper


def _check_weights(weights: Tensor) -> Tensor:
    if not isinstance(weights, Tensor):
        raise TypeError(f"weights must be a Tensor, got {type(weights).__name__}")
    if weights.ndim != 1:
        raise ValueError(f"weights must be 1-D, got shape {tuple(weights.shape)}")
    if not weights.is_floating_point() or not bool(torch.isfinite(weights).all()):
        raise ValueError("weights must hold finite floating-point values")
    return weights.detach().clone()


class ConstantWeighting(Weighting):
    """Return the same ``weights`` whatever the input; their length must equal ``m``.

    Examples
    --------
    >>> import torch
    >>> ConstantWeighting(torch.tensor([1.0, 2.0]))(torch.eye(2))
    tensor([1., 2.])
    """

    weights = Hyper(_check_weights)

    def __init__(self, weights: Tensor) -> None:
        super().__init__()
        self.weights = weights

    def forward(self, stat: Tensor, /) -> Tensor:
        m = stat.shape[0]
        if self.weights.shape[0] != m:
            raise ValueError(f"Constant has {self.weights.shape[0]} weights but got {m} rows")
        return self.weights.to(dtype=stat.dtype, device=stat.device)

    def extra_repr(self) -> str:
        return f"weights={self.weights!r}"


class MeanWeighting(Weighting):
    """Return ``1/m`` for each of the ``m`` rows.

    Examples
    --------
    >>> import torch
    >>> MeanWeighting()(torch.eye(4))
    tensor([0.2500, 0.2500, 0.2500, 0.2500])
    """

    def forward(self, stat: Tensor, /) -> Tensor:
        m = stat.shape[0]
        return torch.full((m,), 1.0 / m, dtype=stat.dtype, device=stat.device)


class SumWeighting(Weighting):
    """Return ``1`` for each row.

    Examples
    --------
    >>> import torch
    >>> SumWeighting()(torch.eye(3))
    tensor([1., 1., 1.])
    """

    def forward(self, stat: Tensor, /) -> Tensor:
        return torch.ones(stat.shape[0], dtype=stat.dtype, device=stat.device)


class Constant(GramianWeightedAggregator):
    r"""A fixed linear combination of the rows: ``A(J) = Jᵀ w`` for given ``weights``.

    Properties: linear (so positively homogeneous), not non-conflicting, not permutation
    invariant, stateless, deterministic.

    Examples
    --------
    >>> import torch
    >>> from jdoptim.aggregation import Constant
    >>> Constant(torch.tensor([1.0, 2.0]))(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    tensor([1., 2.])
    """

    def __init__(self, weights: Tensor) -> None:
        super().__init__(ConstantWeighting(weights))
        # ``weights(matrix)`` stays the method of every weighted aggregator (TorchJD's Constant
        # has no ``weights`` attribute either): the vector is ``gramian_weighting.weights``.


class Mean(GramianWeightedAggregator):
    r"""The average of the rows, ``A(J) = Jᵀ 1 / m``: what ``losses.mean().backward()`` gives.

    Properties: linear, permutation invariant, not non-conflicting, stateless, deterministic.

    Examples
    --------
    >>> import torch
    >>> from jdoptim.aggregation import Mean
    >>> Mean()(torch.tensor([[1.0, 0.0], [-1.0, 2.0]]))
    tensor([0., 1.])
    """

    def __init__(self) -> None:
        super().__init__(MeanWeighting())


class Sum(GramianWeightedAggregator):
    r"""The sum of the rows, ``A(J) = Jᵀ \mathbf 1``: what ``losses.sum().backward()`` gives.

    Properties: linear, permutation invariant, not non-conflicting, stateless, deterministic.

    Examples
    --------
    >>> import torch
    >>> from jdoptim.aggregation import Sum
    >>> Sum()(torch.tensor([[1.0, 0.0], [-1.0, 2.0]]))
    tensor([0., 2.])
    """

    def __init__(self) -> None:
        super().__init__(SumWeighting())
