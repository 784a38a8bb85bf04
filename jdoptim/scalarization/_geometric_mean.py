"""GeometricMean: the geometric mean of the values (GLS, Chennupati et al., 2019)."""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.scalarization._base import Scalarizer


class GeometricMean(Scalarizer):
    r"""The geometric mean of the values, :math:`\big(\prod_{i=1}^m L_i\big)^{1/m}`.

    The geometric loss strategy (GLS) of *MultiNet++: Multi-Stream Feature Aggregation and
    Geometric Loss Strategy for Multi-Task Learning*, Chennupati, Sistu, Yogamani & Rawashdeh,
    CVPR Workshops 2019 (https://arxiv.org/abs/1904.08492). Computed as
    :math:`\exp(\frac1m \sum_i \log L_i)`, which neither overflows nor underflows where the product
    would. Its gradient :math:`\partial / \partial L_i = \frac{GM}{m L_i}` weighs each loss by the
    inverse of its value: a loss-scale-invariant balance.

    Defined for non-negative values (a ``ValueError`` names a negative one). When a value is 0
    the result is 0 and its gradient with respect to that value is unbounded (``inf``/``nan``):
    keep the losses strictly positive (e.g. add a small constant) to train with it.

    Examples
    --------
    >>> import torch
    >>> GeometricMean()(torch.tensor([1.0, 4.0, 16.0]))
    tensor(4.)
    """

    def forward(self, values: Tensor, /) -> Tensor:
        if bool((values < 0).any()):
            raise ValueError(
                f"GeometricMean needs non-negative values, got a minimum of {float(values.min())}"
            )
        return torch.exp(torch.log(values).mean())
