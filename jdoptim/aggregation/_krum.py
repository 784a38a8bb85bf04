"""Krum and Multi-Krum: Byzantine-robust selection of the most central rows (Blanchard et al.)."""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting, check_gramian
from jdoptim.aggregation._hyper import Hyper, delegated


def _check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class KrumWeighting(Weighting):
    r"""The weighting of :class:`Krum`: ``1/k`` on the ``k = n_selected`` best-scored rows, else 0.

    The score of row ``i`` is the sum of the squared distances to its ``m - f - 2`` nearest other
    rows, computed from the Gramian as ``‖g_i - g_j‖² = G_ii + G_jj - 2 G_ij`` (in float64, from
    the symmetrised ``G``, clamped at 0). Scores within rounding of the ``k``-th smallest one
    (``100 eps`` of the largest possible score, ``4 (m - f - 2) max_i G_ii``) are ties: the tied
    rows share the slots left by the strictly better ones equally. Without ties this is the
    paper's selection (which leaves ties unspecified); with ties the result does not depend on
    the row order or on the scale. E.g. with ``m = 2f + 3`` each score is one distance, so the
    two rows of the closest pair always tie and Krum returns their mean.

    Parameters
    ----------
    n_byzantine:
        ``f``, the number of rows that may be arbitrary (``>= 0``); calls need ``m >= f + 3``
        (the paper's guarantee needs ``m >= 2f + 3``, see :class:`Krum`).
    n_selected:
        ``k``, the number of best-scored rows averaged (``>= 1``, at most ``m``).

    Examples
    --------
    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [9.0, 9.0], [1.0, 1.5]]).double()
    >>> KrumWeighting(n_byzantine=1)(J @ J.T)
    tensor([0., 1., 0., 0., 0.], dtype=torch.float64)
    """

    n_byzantine = Hyper(lambda value: _check_count("n_byzantine", value, 0))
    n_selected = Hyper(lambda value: _check_count("n_selected", value, 1))

    def __init__(self, n_byzantine: int, n_selected: int = 1) -> None:
        super().__init__()
        self.n_byzantine = n_byzantine
        self.n_selected = n_selected

    def scores(self, gramian: Tensor) -> Tensor:
        """Return the Krum score of each row (float64, shape ``[m]``)."""
        check_gramian(gramian)
        m, f = gramian.shape[0], self.n_byzantine
        if m < f + 3:
            raise ValueError(
                f"Krum with n_byzantine={f} needs at least {f} + 3 = {f + 3} rows "
                f"(each row needs m - f - 2 >= 1 neighbours), got {m}"
            )
        if self.n_selected > m:
            raise ValueError(f"n_selected={self.n_selected} exceeds the number of rows {m}")
        g = gramian.detach().to(torch.float64)
        g = (g + g.T) / 2
        diagonal = torch.diagonal(g)
        distances = (diagonal[:, None] + diagonal[None, :] - 2.0 * g).clamp_min(0.0)
        distances.fill_diagonal_(float("inf"))  # a row is not its own neighbour
        nearest = torch.topk(distances, m - f - 2, dim=1, largest=False).values
        return nearest.sum(dim=1)

    def forward(self, gramian: Tensor, /) -> Tensor:
        scores = self.scores(gramian)
        m, k = scores.shape[0], self.n_selected
        largest = 4 * (m - self.n_byzantine - 2) * torch.diagonal(gramian).double().max()
        tol = 100 * torch.finfo(gramian.dtype).eps * largest.clamp_min(0.0)
        kth = torch.kthvalue(scores, k).values
        better = scores < kth - tol  # at most k - 1 rows
        tied = (scores - kth).abs() <= tol  # holds the k-th row
        share = (k - better.sum()).double() / (k * tied.sum())
        weights = better.double() / k + tied.double() * share
        return weights.to(gramian.dtype)

    def extra_repr(self) -> str:
        return f"n_byzantine={self.n_byzantine}, n_selected={self.n_selected}"


class Krum(GramianWeightedAggregator):
    r"""Average the ``n_selected`` rows that are closest to their ``m - f - 2`` nearest neighbours.

    *Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent*, Blanchard, El Mhamdi,
    Guerraoui & Stainer, NeurIPS 2017 (https://arxiv.org/abs/1703.02757): Krum for
    ``n_selected=1``, Multi-Krum otherwise. With ``f = n_byzantine``,

    .. math::

        s(i) = \sum_{j \in N_i} \lVert g_i - g_j \rVert^2, \qquad
        \mathcal A(J) = \frac 1k \sum_{i \in S} g_i,

    where ``N_i`` holds the ``m - f - 2`` rows nearest to ``g_i`` (other than ``g_i``) and ``S`` the
    ``k = n_selected`` rows of smallest score (rows tied with the ``k``-th share its slots
    equally, see :class:`KrumWeighting`). It needs ``m >= f + 3`` rows, so that every row has at
    least one neighbour, and raises a ``ValueError`` otherwise (in particular for one or two rows).

    The paper's guarantee, ``(α, f)``-Byzantine resilience (its Proposition 1: the expected
    update stays within a cone around the true gradient whatever the ``f`` arbitrary rows), is
    proved for ``m > 2f + 2``. Between ``f + 3`` and ``2f + 2`` rows Krum is computed as defined
    (as TorchJD accepts it) but nothing bounds the influence of the ``f`` arbitrary rows: with as
    many of them as honest ones, they can form the most central cluster.

    Properties: positively homogeneous (``A(sJ) = s A(J)`` for ``s > 0``: all scores scale by
    ``s²``, so the selection is unchanged), permutation invariant (ties are shared, not broken by
    index), Gramian-only, stateless, deterministic. Not non-conflicting, not linear. The squared
    distances come from the Gramian, so rows closer than about ``sqrt(eps) · max‖g_i‖`` of each
    other are not told apart.

    Parameters
    ----------
    n_byzantine:
        The number ``f >= 0`` of rows that may be arbitrary.
    n_selected:
        The number ``k >= 1`` of best-scored rows averaged.

    Examples
    --------
    >>> import torch
    >>> from jdoptim.aggregation import Krum
    >>> J = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [9.0, 9.0], [1.0, 1.5]]).double()
    >>> Krum(n_byzantine=1)(J)
    tensor([1., 1.], dtype=torch.float64)
    >>> Krum(n_byzantine=1, n_selected=3)(J)
    tensor([0.6667, 1.1667], dtype=torch.float64)
    """

    n_byzantine = delegated("n_byzantine")
    n_selected = delegated("n_selected")

    def __init__(self, n_byzantine: int, n_selected: int = 1) -> None:
        super().__init__(KrumWeighting(n_byzantine, n_selected))
