"""UW: uncertainty weighting with learned log-variances (Kendall, Gal & Cipolla, CVPR 2018)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from jdoptim.scalarization._base import Scalarizer, check_same_shape, check_shape


class UW(Scalarizer):
    r"""Weigh each loss by a learned precision, with a log-variance penalty.

    *Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and Semantics*,
    Kendall, Gal & Cipolla, CVPR 2018 (https://arxiv.org/abs/1705.07115), Equation 7 written with
    the learned log-variances ``s_i = log σ_i²`` (their Section 3.2: the form that is stable to
    learn):

    .. math::

        \sum_i \tfrac12 e^{-s_i} L_i + \tfrac12 s_i.

    Minimising over ``s_i`` gives ``e^{s_i} = L_i``: each loss is weighed by the inverse of its
    own scale. The ``s_i`` (``log_var``, zeros at first: uniform weights) are an
    ``nn.Parameter``: give them to the optimizer with the model's parameters (their gradient is
    ``½ - ½ e^{-s_i} L_i``). ``reset()`` sets them back to 0.

    Parameters
    ----------
    shape:
        The shape of the values (an ``int`` ``n`` means ``(n,)``): one log-variance per value.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Linear(3, 2)
    >>> uw = UW(2)
    >>> opt = torch.optim.SGD([*model.parameters(), *uw.parameters()], lr=0.1)
    >>> loss = uw(model(torch.randn(8, 3)).pow(2).mean(dim=0))
    >>> loss.backward()
    >>> opt.step()
    >>> uw.log_var.shape
    torch.Size([2])
    """

    def __init__(self, shape: int | Sequence[int]) -> None:
        super().__init__()
        self.log_var = nn.Parameter(torch.zeros(check_shape(shape)))

    def forward(self, values: Tensor, /) -> Tensor:
        check_same_shape("log_var", self.log_var, values)
        s = self.log_var.to(values.dtype)
        return (0.5 * torch.exp(-s) * values + 0.5 * s).sum()

    def reset(self) -> None:
        with torch.no_grad():
            self.log_var.zero_()

    def extra_repr(self) -> str:
        return f"shape={tuple(self.log_var.shape)}"
