"""Sum: the sum of the values."""

from __future__ import annotations

from torch import Tensor

from jdoptim.scalarization._base import Scalarizer


class Sum(Scalarizer):
    r"""The sum of the values, :math:`\sum_i L_i` (``m`` values of any shape).

    Examples
    --------
    >>> import torch
    >>> Sum()(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    tensor(10.)
    """

    def forward(self, values: Tensor, /) -> Tensor:
        return values.sum()
