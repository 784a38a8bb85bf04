"""Mean: the average of the values."""

from __future__ import annotations

from torch import Tensor

from jdoptim.scalarization._base import Scalarizer


class Mean(Scalarizer):
    r"""The average of the values, :math:`\frac1m \sum_i L_i` (``m`` values of any shape).

    What ``losses.mean().backward()`` optimises; the loss-side twin of
    :class:`jdoptim.aggregation.Mean`.

    Examples
    --------
    >>> import torch
    >>> Mean()(torch.tensor([1.0, 2.0, 6.0]))
    tensor(3.)
    """

    def forward(self, values: Tensor, /) -> Tensor:
        return values.mean()
