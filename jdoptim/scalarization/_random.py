"""Random: random loss weighting (Lin et al., 2022)."""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.aggregation._random import RandomState, Seeded
from jdoptim.scalarization._base import Scalarizer


class Random(Seeded, Scalarizer):
    r"""Combine the values with fresh random weights on the simplex at each call.

    *Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task Learning*, Lin, Ye,
    Zhang & Tsang, TMLR 2022 (https://arxiv.org/abs/2111.10603), Algorithm 2 (random loss
    weighting):

    .. math::

        \sum_i λ_i L_i, \qquad λ = \operatorname{softmax}(z), \quad z \sim \mathcal N(0, I_m),

    one weight per value, ``m`` being the number of values (of any shape).

    Seeding differs from TorchJD, which draws ``z`` from torch's global generator: here ``z``
    comes from the scalarizer's own CPU generator (see
    :class:`jdoptim.aggregation.Random`), seeded by ``seed`` (``None``: drawn from the global
    generator once), saved in ``state_dict()`` and restarted by ``reset()``.

    Parameters
    ----------
    seed:
        The seed of the generator, or ``None``.

    Examples
    --------
    >>> import torch
    >>> values = torch.tensor([1.0, 2.0, 3.0])
    >>> loss = Random(seed=0)(values)
    >>> bool(values.min() <= loss <= values.max())  # a convex combination
    True
    """

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self._rng = RandomState(seed)

    def weights(self, like: Tensor) -> Tensor:
        """Draw the next weights, of the shape of ``like`` (they sum to 1)."""
        z = torch.randn(like.numel(), generator=self._rng.generator, dtype=torch.float64)
        weights = torch.softmax(z, dim=0).reshape(like.shape)
        return weights.to(dtype=like.dtype, device=like.device)

    def forward(self, values: Tensor, /) -> Tensor:
        return (self.weights(values) * values).sum()

    def extra_repr(self) -> str:
        return f"seed={self._rng.seed}"
