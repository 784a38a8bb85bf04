"""Coordinate-wise trimmed mean (Yin et al., 2018)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from jdoptim.aggregation._bases import Aggregator
from jdoptim.aggregation._hyper import Hyper


def _trimmed_mean_torch(matrix: Tensor, t: int) -> Tensor:
    """Sort every column and average the middle ranks ``t .. m - t - 1`` (any device)."""
    m = matrix.shape[0]
    return torch.sort(matrix, dim=0).values[t : m - t].mean(dim=0)


def _trimmed_mean_numpy(matrix: Tensor, t: int) -> Tensor:
    """The same on the CPU with a partial sort: only ranks ``t`` and ``m - t - 1`` are placed."""
    m = matrix.shape[0]
    middle = np.partition(matrix.detach().numpy(), [t, m - t - 1], axis=0)[t : m - t]
    return torch.from_numpy(middle.mean(axis=0, dtype=middle.dtype))


def _check_trim_number(trim_number: int) -> int:
    if isinstance(trim_number, bool) or not isinstance(trim_number, int):
        raise TypeError(f"trim_number must be an int, got {type(trim_number).__name__}")
    if trim_number < 0:
        raise ValueError(f"trim_number must be >= 0, got {trim_number}")
    return trim_number


class TrimmedMean(Aggregator):
    r"""Per column, drop the ``trim_number`` largest and smallest values and average the rest.

    *Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates*, Yin, Chen,
    Ramchandran & Bartlett, ICML 2018 (https://arxiv.org/abs/1803.01498). With ``t = trim_number``
    and, for each column ``k``, ``J_{(1)k} \le \dots \le J_{(m)k}`` the sorted entries,

    .. math::

        \mathcal A(J)_k = \frac{1}{m - 2t} \sum_{i = t + 1}^{m - t} J_{(i)k}.

    It needs ``m > 2t`` rows and raises a ``ValueError`` otherwise. ``trim_number=0`` is the mean.

    Properties: homogeneous for every real ``s`` (``A(sJ) = s A(J)``; the trimming is symmetric,
    so a negative ``s`` only swaps the dropped ends), hence positively homogeneous; translation
    equivariant (adding ``v`` to every row adds ``v``); permutation invariant (exactly: the sorted
    columns do not depend on the row order); stateless, deterministic. Not a weighting of the
    rows (each column keeps different rows), so not Gramian-only; not non-conflicting. On the
    CPU a partial sort (``numpy.partition``) finds the kept values; a full ``torch.sort`` is used
    on other devices and when the input requires grad (the result is then differentiable).

    Parameters
    ----------
    trim_number:
        The number ``t >= 0`` of values dropped at each end of every column.

    Examples
    --------
    >>> import torch
    >>> from jdoptim.aggregation import TrimmedMean
    >>> J = torch.tensor([[1.0, 9.0], [2.0, -5.0], [3.0, 1.0], [100.0, 2.0]])
    >>> TrimmedMean(trim_number=1)(J)
    tensor([2.5000, 1.5000])
    """

    trim_number = Hyper(_check_trim_number)

    def __init__(self, trim_number: int) -> None:
        super().__init__()
        self.trim_number = trim_number

    def forward(self, matrix: Tensor, /) -> Tensor:
        m, t = matrix.shape[0], self.trim_number
        if m <= 2 * t:
            raise ValueError(
                f"TrimmedMean with trim_number={t} needs more than 2 * {t} = {2 * t} rows, got {m}"
            )
        if t == 0:
            return matrix.mean(dim=0)
        cpu = matrix.device.type == "cpu" and matrix.dtype in (torch.float32, torch.float64)
        if cpu and not matrix.requires_grad:  # the partial sort; the sort keeps autograd
            return _trimmed_mean_numpy(matrix, t)
        return _trimmed_mean_torch(matrix, t)

    def extra_repr(self) -> str:
        return f"trim_number={self.trim_number}"
