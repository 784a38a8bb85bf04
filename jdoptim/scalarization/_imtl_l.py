"""IMTL-L: impartial multi-task learning, loss balance (Liu et al., ICLR 2021)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from jdoptim.scalarization._base import Scalarizer, check_same_shape, check_shape


class IMTLL(Scalarizer):
    r"""Scale each loss by a learned factor ``e^{s_i}``, regularised by ``-s_i``.

    The loss-balance part of *Towards Impartial Multi-task Learning*, Liu, Li, Kuang, Xue, Chen,
    Yang, Liao & Zhang, ICLR 2021 (https://openreview.net/forum?id=IMPnRXEWpvr), Equation 2:

    .. math::

        \sum_i e^{s_i} L_i - s_i.

    Minimising over ``s_i`` gives ``e^{s_i} L_i = 1``: every scaled loss is brought to the same
    value. It is :class:`UW` up to a factor 2 and the sign of the parameter
    (``IMTLL(s) = 2 UW(-s)``). The ``s_i`` (``log_scale``, zeros at first: the plain sum) are an
    ``nn.Parameter`` to give to the optimizer; ``reset()`` sets them back to 0. The
    gradient-balance part (IMTL-G) is :class:`jdoptim.aggregation.IMTLG`.

    Parameters
    ----------
    shape:
        The shape of the values (an ``int`` ``n`` means ``(n,)``): one scale per value.

    Examples
    --------
    >>> import torch
    >>> imtl = IMTLL(2)
    >>> imtl(torch.tensor([1.0, 3.0]))  # s = 0: the sum
    tensor(4., grad_fn=<SumBackward0>)
    """

    def __init__(self, shape: int | Sequence[int]) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(check_shape(shape)))

    def forward(self, values: Tensor, /) -> Tensor:
        check_same_shape("log_scale", self.log_scale, values)
        s = self.log_scale.to(values.dtype)
        return (torch.exp(s) * values - s).sum()

    def reset(self) -> None:
        with torch.no_grad():
            self.log_scale.zero_()

    def extra_repr(self) -> str:
        return f"shape={tuple(self.log_scale.shape)}"
