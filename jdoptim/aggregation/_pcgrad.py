"""PCGrad: project conflicting gradients (Yu et al., NeurIPS 2020)."""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting, check_gramian
from jdoptim.aggregation._random import RandomState, Seeded


def random_orders(m: int, generator: torch.Generator) -> Tensor:
    """Row ``i`` is a uniformly random order of ``{0, ..., m-1} \\ {i}`` (CPU, ``[m, m-1]``)."""
    keys = torch.rand((m, m), generator=generator, dtype=torch.float64)
    keys.fill_diagonal_(2.0)  # every task last in its own order, then dropped
    return torch.argsort(keys, dim=1)[:, : m - 1]


class PCGradWeighting(Seeded, Weighting):
    r"""The weighting of :class:`PCGrad`, computed from the Gramian ``G = J Jᵀ``.

    Each projected gradient is tracked by its coefficients in the rows,
    ``g_i^{PC} = Jᵀ c_i`` (``c_i = e_i`` at first), so every inner product the paper needs is a
    Gramian product: ``⟨g_i^{PC}, g_j⟩ = (G c_i)_j`` and ``‖g_j‖² = G_jj``. A projection is

    .. math::

        c_i \leftarrow c_i - \frac{\min((G c_i)_j, 0)}{G_{jj}}\, e_j,

    and the weights are ``w = Σ_i c_i``. The ``m`` tasks are processed together, one step of
    their ``m - 1`` projections at a time, in float64. Each call draws, for each task ``i``, a
    fresh uniformly random order of the other tasks from its own generator.

    Parameters
    ----------
    seed:
        Seed of the generator of the projection orders (``None``: drawn from torch's global
        generator).

    Examples
    --------
    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    >>> PCGradWeighting(seed=0)(J @ J.T)  # two tasks: the order does not matter
    tensor([2.0000, 1.5000], dtype=torch.float64)
    """

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self._rng = RandomState(seed)

    def forward(self, gramian: Tensor, /) -> Tensor:
        check_gramian(gramian)
        m = gramian.shape[0]
        orders = random_orders(m, self._rng.generator).to(gramian.device)
        g = gramian.detach().to(torch.float64)
        g = (g + g.T) / 2
        diagonal = torch.diagonal(g)
        coefficients = torch.eye(m, dtype=torch.float64, device=g.device)
        rows = torch.arange(m, device=g.device)
        for step in range(m - 1):
            j = orders[:, step]
            # ⟨g_i^PC, g_j⟩ for each task i
            inner = (coefficients * g.index_select(0, j)).sum(dim=1)
            norm2 = diagonal[j]
            # A zero row g_j (G_jj = 0) has zero inner products with everything: nothing to do.
            ratio = torch.where(norm2 > 0, inner / torch.where(norm2 > 0, norm2, 1.0), 0.0)
            coefficients[rows, j] -= ratio.clamp_max(0.0)
        return coefficients.sum(dim=0).to(gramian.dtype)

    def extra_repr(self) -> str:
        return f"seed={self._rng.seed}"


class PCGrad(GramianWeightedAggregator):
    r"""Project each gradient on the normal plane of the gradients it conflicts with, then sum.

    *Gradient Surgery for Multi-Task Learning*, Yu, Kumar, Gupta, Levine, Hausman & Finn,
    NeurIPS 2020 (https://arxiv.org/abs/2001.06782), Algorithm 1. For each task ``i``, starting
    from ``g_i^{PC} = g_i`` and for every other task ``j`` in a random order,

    .. math::

        g_i^{PC} \leftarrow g_i^{PC} - \frac{\min(⟨g_i^{PC}, g_j⟩, 0)}{\lVert g_j \rVert^2}\, g_j,
        \qquad \mathcal A(J) = \sum_i g_i^{PC}.

    It is computed exactly from the Gramian (see :class:`PCGradWeighting`); a zero gradient is
    never projected on.

    Properties: random (a fresh order per task and per call, from a generator saved in
    ``state_dict``; ``reset()`` re-seeds it), positively homogeneous for given draws (only ratios
    of Gramian entries enter), Gramian-only. Not non-conflicting for ``m > 2`` (each projection
    can re-create a conflict removed earlier), not permutation invariant for a given seed (only in
    distribution), not linear. For ``m = 2`` it is deterministic and its update conflicts with
    neither gradient.

    Parameters
    ----------
    seed:
        Seed of the generator of the projection orders (``None``: drawn from torch's global
        generator, so ``torch.manual_seed`` makes runs reproducible).

    Examples
    --------
    >>> import torch
    >>> from jdoptim.aggregation import PCGrad
    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    >>> PCGrad(seed=0)(J)  # ([1, 0] + [-.5, .5]) + ([-1, 1] + [1, 0])
    tensor([0.5000, 1.5000], dtype=torch.float64)
    """

    def __init__(self, seed: int | None = None) -> None:
        super().__init__(PCGradWeighting(seed))
