"""UPGrad: the unconflicting projection of gradients (Quinton & Rey, 2024)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from jdoptim.aggregation._bases import GramianWeightedAggregator, check_gramian
from jdoptim.aggregation._hyper import delegated
from jdoptim.aggregation._pref import ProjectionWeighting, pref_weights


class UPGradWeighting(ProjectionWeighting):
    r"""The weighting of :class:`UPGrad`, computed from the Gramian ``G = J Jᵀ``.

    .. math::

        w = \sum_i p_i\, λ^{(i)}, \qquad
        λ^{(i)} = \operatorname*{argmin}_{λ \ge e_i} λᵀ G λ,

    so that ``Jᵀλ^{(i)}`` is the projection of row ``i`` onto the dual cone ``{x : J x >= 0}``.

    Parameters
    ----------
    pref_vector:
        Weights ``p`` of the projected rows; ``None`` averages them (``p = 1/m``).
    projector:
        Solves ``argmin_{v >= u} vᵀ G v`` for the rows ``u`` of a ``[k, m]`` matrix: a callable
        ``(U, G) -> W``. ``None`` (default) gives the exact
        :class:`~jdoptim.linalg.ExactProjector`; :class:`~jdoptim.linalg.QuadprogProjector`
        reproduces TorchJD's regularised answers (TorchJD's projectors are accepted too).

    Examples
    --------
    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    >>> UPGradWeighting()(J @ J.T)
    tensor([1.0000, 0.7500], dtype=torch.float64)
    """

    def forward(self, gramian: Tensor, /) -> Tensor:
        check_gramian(gramian)
        pref = pref_weights(self.pref_vector, gramian)
        m = gramian.shape[0]
        projections = self.projector(
            torch.eye(m, dtype=gramian.dtype, device=gramian.device), gramian
        )
        return pref @ projections


class UPGrad(GramianWeightedAggregator):
    r"""Project every row of ``J`` onto the dual cone of the rows, then average the projections.

    From *Jacobian Descent for Multi-Objective Optimization*, Quinton & Rey, 2024
    (https://arxiv.org/abs/2406.16232).

    .. math::

        \mathcal A(J) = \sum_i p_i\, π_{\{x:\,Jx \ge 0\}}(J_i), \qquad p_i = 1/m \text{ by default.}

    The projections are solved exactly from the Gramian (see
    :func:`jdoptim.linalg.project_weights`): no regularisation term moves the result, at any scale.

    Properties: non-conflicting (``J A(J) >= 0``), positively homogeneous (``A(sJ) = s A(J)`` for
    ``s > 0``), permutation invariant (with the default ``pref_vector``), Gramian-only, stateless,
    deterministic. Weights are at least the preference: ``w >= p``.

    Parameters
    ----------
    pref_vector:
        Weights of the projected rows; ``None`` averages them.
    projector:
        Solves ``argmin_{v >= u} vᵀ G v`` for the rows ``u`` of a ``[k, m]`` matrix: a callable
        ``(U, G) -> W``. ``None`` (default) gives the exact
        :class:`~jdoptim.linalg.ExactProjector`; :class:`~jdoptim.linalg.QuadprogProjector`
        reproduces TorchJD's regularised answers (TorchJD's projectors are accepted too).

    Examples
    --------
    >>> import torch
    >>> from jdoptim.aggregation import UPGrad
    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    >>> update = UPGrad()(J)
    >>> update
    tensor([0.2500, 0.7500], dtype=torch.float64)
    >>> bool((J @ update >= 0).all())
    True
    """

    pref_vector = delegated("pref_vector")
    projector = delegated("projector")

    def __init__(
        self,
        pref_vector: Tensor | None = None,
        projector: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__(UPGradWeighting(pref_vector, projector))
