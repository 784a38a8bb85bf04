"""ConFIG: conflict-free update from the pseudo-inverse of the unit gradients (Liu et al., 2024)."""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting, check_gramian
from jdoptim.aggregation._hyper import Hyper, delegated
from jdoptim.aggregation._pref import check_pref_vector, pref_repr, pref_weights


class ConFIGWeighting(Weighting):
    r"""The weighting of :class:`ConFIG`, computed from the Gramian ``G = J Jᵀ``.

    With ``N = diag(‖g_i‖)`` and the Gramian of the unit rows ``\hat G = N^{-1} G N^{-1}``
    (zero rows stay zero), ``g_v = Jᵀv`` with ``v = N^{-1} \hat G^{+} p``, and then
    ``‖g_v‖² = pᵀ \hat G^{+} p`` and ``Σ_i ⟨g_i, g_v⟩ = \mathbf 1ᵀ G v``, so the weights are
    ``w = (\mathbf 1ᵀ G v)\, v / ‖g_v‖²``. The pseudo-inverse comes from the eigendecomposition of
    ``\hat G`` (float64) and drops the eigenvalues below ``sqrt(eps(dtype)) · λ_max``, well above
    the rounding of a Gramian in ``dtype``: nearly dependent unit rows are then treated as
    dependent (the least-squares solution) instead of dominating the direction with noise. When
    ``p`` is orthogonal to the range of ``\hat G`` (e.g. two opposite rows) ``g_v = 0`` and the
    weights are 0.

    Parameters
    ----------
    pref_vector:
        The right-hand side ``p`` (``None``: uniform). Only its direction matters.

    Examples
    --------
    >>> import torch
    >>> J = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    >>> ConFIGWeighting()(J @ J.T)  # g_u = (1, 1)/√2, length 2/√2 + 1/√2
    tensor([0.7500, 1.5000], dtype=torch.float64)
    """

    pref_vector = Hyper(check_pref_vector)

    def __init__(self, pref_vector: Tensor | None = None) -> None:
        super().__init__()
        self.pref_vector = pref_vector

    def forward(self, gramian: Tensor, /) -> Tensor:
        check_gramian(gramian)
        m = gramian.shape[0]
        pref = pref_weights(self.pref_vector, gramian).to(torch.float64)
        zeros = torch.zeros(m, dtype=gramian.dtype, device=gramian.device)
        g = gramian.detach().to(torch.float64)
        g = (g + g.T) / 2
        norms = torch.sqrt(torch.diagonal(g).clamp_min(0.0))
        inverse_norms = torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, 1.0), 0.0)
        unit_gramian = g * inverse_norms[:, None] * inverse_norms[None, :]
        if m == 0 or not bool((norms > 0).any()):
            return zeros
        eigenvalues, eigenvectors = torch.linalg.eigh(unit_gramian)
        tolerance = torch.finfo(gramian.dtype).eps ** 0.5 * eigenvalues[-1]
        keep = eigenvalues > tolerance
        basis, kept = eigenvectors[:, keep], eigenvalues[keep]
        coefficients = basis.T @ pref
        if float(coefficients.norm()) <= m * torch.finfo(torch.float64).eps * float(pref.norm()):
            return zeros  # p is orthogonal to the range: g_v = 0, no direction
        v = inverse_norms * (basis @ (coefficients / kept))
        norm2_gv = (coefficients**2 / kept).sum()
        length = (g @ v).sum()  # Σ_i ⟨g_i, g_v⟩
        return (length / norm2_gv * v).to(gramian.dtype)

    def extra_repr(self) -> str:
        return pref_repr(self.pref_vector)


class ConFIG(GramianWeightedAggregator):
    r"""The direction with equal cosine to every gradient, scaled by the sum of their projections.

    *ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks*, Liu, Chu &
    Thuerey, 2024 (https://arxiv.org/abs/2408.11104). With the unit rows ``\hat g_i = g_i/‖g_i‖``
    stacked in ``\hat J`` and the preference ``p`` (uniform by default):

    .. math::

        g_v = \hat J^{+} p, \qquad g_u = \frac{g_v}{\lVert g_v \rVert}, \qquad
        \mathcal A(J) = \Big(\sum_i ⟨g_i, g_u⟩\Big)\, g_u.

    When the unit rows are linearly independent, ``⟨\hat g_i, g_v⟩ = p_i`` for every ``i``: with
    the uniform ``p`` the update has the same cosine with every gradient, and it conflicts with
    none (for ``p > 0``). Otherwise ``g_v`` is the least-squares solution, computed with a
    relative-tolerance pseudo-inverse (see :class:`ConFIGWeighting`); zero rows are ignored in the
    direction.

    Properties: positively homogeneous, permutation invariant (default ``pref_vector``),
    Gramian-only, stateless, deterministic. Non-conflicting when the non-zero unit rows are
    linearly independent (and ``p > 0``), not in general (e.g. more rows than columns). Not
    linear.

    Parameters
    ----------
    pref_vector:
        The right-hand side ``p`` of the least-squares problem (``None``: uniform).

    Examples
    --------
    >>> import torch
    >>> from jdoptim.aggregation import ConFIG
    >>> J = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    >>> ConFIG()(J)  # (2/√2 + 1/√2) · (1, 1)/√2
    tensor([1.5000, 1.5000], dtype=torch.float64)
    """

    pref_vector = delegated("pref_vector")

    def __init__(self, pref_vector: Tensor | None = None) -> None:
        super().__init__(ConFIGWeighting(pref_vector))
