"""IMTL-G: the update with equal projections on every unit gradient (Liu et al., ICLR 2021)."""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.aggregation._aligned_mtl import kept_spectrum
from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting, check_gramian


class IMTLGWeighting(Weighting):
    r"""The weighting of :class:`IMTLG`: ``w = G^+ r / (\mathbf 1ᵀ G^+ r)``, ``r_i = ‖g_i‖``.

    ``G^+`` is the pseudo-inverse on the eigenvalues above ``100 eps(dtype) λ_max`` (float64
    eigendecomposition). When ``|\mathbf 1ᵀ G^+ r| <= m · eps · \mathbf 1ᵀ|G^+ r|`` (zero Gramian,
    or no update of the form ``Jᵀw`` with ``\mathbf 1ᵀw = 1`` has equal projections) the weights
    are zero.

    Examples
    --------
    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    >>> IMTLGWeighting()(J @ J.T)
    tensor([0.5858, 0.4142], dtype=torch.float64)
    """

    def forward(self, gramian: Tensor, /) -> Tensor:
        check_gramian(gramian)
        m = gramian.shape[0]
        norms = gramian.detach().to(torch.float64).diagonal().clamp(min=0.0).sqrt()
        eigenvalues, eigenvectors = kept_spectrum(gramian)
        raw = eigenvectors @ ((eigenvectors.T @ norms) / eigenvalues)
        total = raw.sum()
        if not float(total.abs()) > m * torch.finfo(gramian.dtype).eps * float(raw.abs().sum()):
            return torch.zeros(m, dtype=gramian.dtype, device=gramian.device)
        return (raw / total).to(gramian.dtype)


class IMTLG(GramianWeightedAggregator):
    r"""*Towards Impartial Multi-task Learning*, Liu et al., ICLR 2021 (IMTL-G).

    https://openreview.net/forum?id=IMPnRXEWpvr. The update ``d = Jᵀw`` (``\mathbf 1ᵀ w = 1``)
    has the same projection on every unit gradient ``u_i = g_i / ‖g_i‖``: ``u_iᵀ d = c``. In
    Gramian form, ``J d = G w`` must be proportional to
    ``r = (‖g_i‖)_i = \sqrt{\operatorname{diag} G}``:

    .. math::

        \mathcal A(J) = Jᵀ w, \qquad w = \frac{G^+ r}{\mathbf 1ᵀ G^+ r}.

    For linearly independent rows this is the paper's closed form
    ``α_{2:m} = g_1 Uᵀ (D Uᵀ)^{-1}``, ``α_1 = 1 - Σ α_{2:m}`` (``D``, ``U`` the differences of the
    gradients and of the unit gradients); for dependent rows the pseudo-inverse gives the
    least-squares solution (exact equal projections when ``r`` is in the range of ``G``, e.g.
    duplicated rows). Zero rows get weight 0.

    Properties: positively homogeneous, permutation invariant, Gramian-only, stateless,
    deterministic. Not non-conflicting: the common projection ``c = 1 / (\mathbf 1ᵀ G^+ r)`` is
    negative when ``\mathbf 1ᵀ G^+ r < 0`` (possible from three rows on). The update can be much
    longer than the rows when they are nearly dependent (``‖d‖ ∝ 1/σ_{\min}(J)``).

    Examples
    --------
    >>> import torch
    >>> from jdoptim.aggregation import IMTLG
    >>> J = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    >>> IMTLG()(J)
    tensor([1.0000, 0.4142], dtype=torch.float64)
    """

    def __init__(self) -> None:
        super().__init__(IMTLGWeighting())
