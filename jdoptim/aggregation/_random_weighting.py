"""Random loss weighting: softmax of Gaussian draws (Lin et al., TMLR 2022)."""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting, check_gramian
from jdoptim.aggregation._random import RandomState, Seeded


class RandomWeighting(Seeded, Weighting):
    r"""The weighting of :class:`Random`: ``w = softmax(z)`` with ``z ~ N(0, I_m)``, fresh per call.

    The draws are made in float64 on the CPU from the weighting's own generator, then cast to the
    Gramian's dtype and device; only ``m`` is read from the Gramian.

    Parameters
    ----------
    seed:
        Seed of the generator (``None``: drawn from torch's global generator).

    Examples
    --------
    >>> import torch
    >>> z = torch.randn(3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> w = RandomWeighting(seed=0)(torch.eye(3, dtype=torch.float64))
    >>> torch.equal(w, torch.softmax(z, dim=0))
    True
    """

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self._rng = RandomState(seed)

    def forward(self, gramian: Tensor, /) -> Tensor:
        check_gramian(gramian)
        draws = torch.randn(gramian.shape[0], generator=self._rng.generator, dtype=torch.float64)
        return torch.softmax(draws, dim=0).to(device=gramian.device, dtype=gramian.dtype)

    def extra_repr(self) -> str:
        return f"seed={self._rng.seed}"


class Random(GramianWeightedAggregator):
    r"""A random convex combination of the rows: softmax weights of standard normal draws.

    *Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task Learning*, Lin, Ye,
    Zhang & Tsang, TMLR 2022 (https://arxiv.org/abs/2111.10603), random loss weighting (RLW)
    with the normal distribution:

    .. math::

        \mathcal A(J) = Jᵀ \operatorname{softmax}(z), \qquad z \sim \mathcal N(0, I_m)
        \text{ drawn anew at every call.}

    Properties: random (the generator is saved in ``state_dict``; ``reset()`` re-seeds it),
    linear and positively homogeneous for given draws, Gramian-only (it only needs ``m``).
    Permutation invariant in distribution only, not for given draws. Not non-conflicting.

    Seeding differs from TorchJD, whose random methods draw from torch's global generator at
    every call: here the draws come from the method's own generator (seeded once, saved in
    ``state_dict()``, restarted by ``reset()``), so they do not depend on what else draws random
    numbers, and a resumed run draws what the uninterrupted one would have. The same holds for
    ``PCGrad``, ``GradVac`` and ``GradDrop``. The draws themselves differ from TorchJD's.

    Parameters
    ----------
    seed:
        Seed of the generator (``None``: drawn from torch's global generator, so
        ``torch.manual_seed`` makes runs reproducible).

    Examples
    --------
    >>> import torch
    >>> from jdoptim.aggregation import Random
    >>> J = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    >>> update = Random(seed=0)(J)  # a point of the segment between the rows
    >>> bool((update >= 0).all()), float(update.sum())
    (True, 1.0)
    """

    def __init__(self, seed: int | None = None) -> None:
        super().__init__(RandomWeighting(seed))
