"""DualProj: project the averaged gradient onto the dual cone (Lopez-Paz & Ranzato, 2017)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from jdoptim.aggregation._bases import GramianWeightedAggregator, check_gramian
from jdoptim.aggregation._hyper import delegated
from jdoptim.aggregation._pref import ProjectionWeighting, pref_weights


class DualProjWeighting(ProjectionWeighting):
    r"""The weighting of :class:`DualProj`: ``w = p + argmin_{μ >= 0} (p + μ)ᵀ G (p + μ)``.

    Parameters
    ----------
    pref_vector:
        Weights ``p`` of the combination to project; ``None`` uses the mean (``p = 1/m``).
    projector:
        Solves ``argmin_{v >= u} vᵀ G v`` for the rows ``u`` of a ``[k, m]`` matrix: a callable
        ``(U, G) -> W``. ``None`` (default) gives the exact
        :class:`~jdoptim.linalg.ExactProjector`; :class:`~jdoptim.linalg.QuadprogProjector`
        reproduces TorchJD's regularised answers (TorchJD's projectors are accepted too).

    Examples
    --------
    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [-2.0, 1.0]], dtype=torch.float64)
    >>> DualProjWeighting()(J @ J.T)
    tensor([1.0000, 0.5000], dtype=torch.float64)
    """

    def forward(self, gramian: Tensor, /) -> Tensor:
        check_gramian(gramian)
        pref = pref_weights(self.pref_vector, gramian)
        return self.projector(pref, gramian)


class DualProj(GramianWeightedAggregator):
    r"""Project the (weighted) average of the rows onto the dual cone of the rows.

    The projection used by GEM, *Gradient Episodic Memory for Continual Learning*, Lopez-Paz &
    Ranzato, NeurIPS 2017 (https://arxiv.org/abs/1706.08840), applied to the mean gradient:

    .. math::

        \mathcal A(J) = π_{\{x:\,Jx \ge 0\}}\Big(\sum_i p_i J_i\Big), \qquad p_i = 1/m
        \text{ by default.}

    Solved exactly from the Gramian (see :func:`jdoptim.linalg.project_weights`).

    Properties: non-conflicting, positively homogeneous, permutation invariant (default
    ``pref_vector``), Gramian-only, stateless, deterministic.

    Parameters
    ----------
    pref_vector:
        Weights of the combination to project; ``None`` uses the mean.
    projector:
        Solves ``argmin_{v >= u} vᵀ G v`` for the rows ``u`` of a ``[k, m]`` matrix: a callable
        ``(U, G) -> W``. ``None`` (default) gives the exact
        :class:`~jdoptim.linalg.ExactProjector`; :class:`~jdoptim.linalg.QuadprogProjector`
        reproduces TorchJD's regularised answers (TorchJD's projectors are accepted too).

    Examples
    --------
    >>> import torch
    >>> from jdoptim.aggregation import DualProj
    >>> J = torch.tensor([[1.0, 0.0], [-2.0, 1.0]], dtype=torch.float64)
    >>> DualProj()(J).abs()  # the mean (-0.5, 0.5) conflicts with row 1; its projection does not
    tensor([0.0000, 0.5000], dtype=torch.float64)
    """

    pref_vector = delegated("pref_vector")
    projector = delegated("projector")

    def __init__(
        self,
        pref_vector: Tensor | None = None,
        projector: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__(DualProjWeighting(pref_vector, projector))
