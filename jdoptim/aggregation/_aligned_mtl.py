"""Aligned-MTL: align the principal components of the gradients (Senushkin et al., CVPR 2023)."""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting, check_gramian
from jdoptim.aggregation._hyper import Hyper, delegated
from jdoptim.aggregation._pref import check_pref_vector, pref_repr, pref_weights

SCALE_MODES = ("min", "median", "rmse")
# Eigenvalues of a Gramian below ``SPECTRUM_RTOL · eps · λ_max`` are rounding noise: measured at
# up to ~10 eps·λ_max for rank-deficient Jacobians (m <= 128, n <= 10⁴, float32 and float64).
SPECTRUM_RTOL = 100.0


def kept_spectrum(gramian: Tensor, eps: float | None = None) -> tuple[Tensor, Tensor]:
    """Eigenvalues (decreasing) and eigenvectors of the symmetrised Gramian, in float64, keeping
    only those above ``100 eps λ_max`` (``eps`` of the Gramian's dtype by default); empty when
    ``G`` is zero."""
    g = gramian.detach().to(torch.float64)
    eigenvalues, eigenvectors = torch.linalg.eigh((g + g.T) / 2)
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    if eigenvalues.numel() == 0:
        return eigenvalues, eigenvectors
    if eps is None:
        eps = torch.finfo(gramian.dtype).eps
    threshold = SPECTRUM_RTOL * eps * float(eigenvalues[0])
    keep = eigenvalues > max(threshold, 0.0)
    return eigenvalues[keep], eigenvectors[:, keep]


def _check_scale_mode(scale_mode: str) -> str:
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
    return scale_mode


class AlignedMTLWeighting(Weighting):
    r"""The weighting of :class:`AlignedMTL`: ``w = σ V Λ^{-1/2} Vᵀ p`` from ``G = V Λ Vᵀ``.

    Parameters
    ----------
    pref_vector:
        The task weights ``p`` of the aligned gradients; ``None`` is ``1/m`` (the paper's
        experiments use ones, which only multiplies the update by ``m``).
    scale_mode:
        How ``σ`` is taken from the singular values ``σ_k = λ_k^{1/2}`` of ``J``: ``"min"``
        (the smallest non-zero one, the paper's choice), ``"median"`` (their lower median, as
        ``torch.median``), or ``"rmse"`` (their root mean square, ``(Σ_k λ_k / r)^{1/2}``).

    Examples
    --------
    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    >>> AlignedMTLWeighting()(J @ J.T)  # σ = 1: w_i = p_i / ‖g_i‖
    tensor([0.5000, 0.2500], dtype=torch.float64)
    """

    pref_vector = Hyper(check_pref_vector)
    scale_mode = Hyper(_check_scale_mode)

    def __init__(self, pref_vector: Tensor | None = None, scale_mode: str = "min") -> None:
        super().__init__()
        self.pref_vector = pref_vector
        self.scale_mode = scale_mode

    def forward(self, gramian: Tensor, /) -> Tensor:
        check_gramian(gramian)
        pref = pref_weights(self.pref_vector, gramian).to(torch.float64)
        eigenvalues, eigenvectors = kept_spectrum(gramian)
        if eigenvalues.numel() == 0:  # J = 0: every weighting gives the same (zero) update
            return pref.to(gramian.dtype)
        if self.scale_mode == "min":
            sigma2 = eigenvalues[-1]
        elif self.scale_mode == "median":
            sigma2 = eigenvalues.median()
        else:
            sigma2 = eigenvalues.mean()
        balance = (sigma2 / eigenvalues).sqrt()
        weights = eigenvectors @ (balance * (eigenvectors.T @ pref))
        return weights.to(gramian.dtype)

    def extra_repr(self) -> str:
        return f"{pref_repr(self.pref_vector)}, scale_mode={self.scale_mode!r}"


class AlignedMTL(GramianWeightedAggregator):
    r"""*Independent Component Alignment for Multi-Task Learning*, Senushkin et al., CVPR 2023.

    https://arxiv.org/abs/2305.19000. With the thin SVD ``J = V Σ Uᵀ`` (``Λ = Σ²`` the non-zero
    eigenvalues of ``G = J Jᵀ``), the gradients are replaced by the aligned ``\hat J = σ V Uᵀ``,
    whose rows are orthogonal components of equal norm ``σ`` (the condition number of ``\hat J``
    is 1), and combined with the task weights ``p``:

    .. math::

        \mathcal A(J) = \hat Jᵀ p = Jᵀ w, \qquad w = σ\, V Λ^{-1/2} Vᵀ p,
        \qquad σ \in \{σ_{\min},\ \operatorname{median}_k σ_k,\ (\tfrac1r Σ_k σ_k^2)^{1/2}\}.

    Computed from ``G`` alone by a float64 eigendecomposition. Eigenvalues below
    ``100 eps(dtype) λ_max`` are rounding noise and are dropped (a zero Gramian returns ``p``,
    hence a zero update); no absolute epsilon is involved, so the weights are scale-invariant.

    Properties: positively homogeneous, permutation invariant (default ``pref_vector``),
    Gramian-only, stateless, deterministic. Not non-conflicting: ``J \mathcal A(J) = σ G^{1/2} p``
    can have negative entries.

    Examples
    --------
    >>> import torch
    >>> from jdoptim.aggregation import AlignedMTL
    >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    >>> AlignedMTL()(J)  # σ_min = 1: the rows normalised to norm 1, averaged
    tensor([0.5000, 0.5000], dtype=torch.float64)
    """

    pref_vector = delegated("pref_vector")
    scale_mode = delegated("scale_mode")

    def __init__(self, pref_vector: Tensor | None = None, scale_mode: str = "min") -> None:
        super().__init__(AlignedMTLWeighting(pref_vector, scale_mode))
