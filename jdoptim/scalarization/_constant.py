"""Constant: a fixed weighted sum of the values."""

from __future__ import annotations

from torch import Tensor

from jdoptim.scalarization._base import Scalarizer, as_like, check_same_shape, tensor_setting


class Constant(Scalarizer):
    r"""A fixed linear combination of the values, :math:`\sum_i w_i L_i`.

    Parameters
    ----------
    weights:
        ``w``, a finite floating-point tensor of the shape of the values passed at call time.

    Examples
    --------
    >>> import torch
    >>> Constant(torch.tensor([1.0, 0.5]))(torch.tensor([2.0, 4.0]))
    tensor(4.)
    """

    weights = tensor_setting("weights")

    def __init__(self, weights: Tensor) -> None:
        super().__init__()
        self.weights = weights

    def forward(self, values: Tensor, /) -> Tensor:
        check_same_shape("weights", self.weights, values)
        return (as_like(self.weights, values) * values).sum()

    def extra_repr(self) -> str:
        return f"weights={self.weights!r}"
