"""STCH: smooth Tchebycheff scalarization (Lin et al., ICML 2024)."""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.aggregation._hyper import Hyper
from jdoptim.scalarization._base import (
    Scalarizer,
    as_like,
    check_number,
    check_same_shape,
    relative_to,
    tensor_setting,
)


class STCH(Scalarizer):
    r"""A smooth approximation of the weighted maximum of the values.

    *Smooth Tchebycheff Scalarization for Multi-Objective Optimization*, Lin, Zhang, Lin, Zhang &
    Zhang, ICML 2024 (https://arxiv.org/abs/2402.19078), Equation 8:

    .. math::

        g_μ(L) = μ \log \sum_{i=1}^m \exp\Big(\frac{λ_i (L_i - z_i^*)}{μ}\Big),
        \qquad \max_i λ_i (L_i - z^*_i) \le g_μ(L) \le \max_i λ_i (L_i - z^*_i) + μ \log m,

    with preference ``λ`` (``weights``) and ideal point ``z^*`` (``reference``). It tends to the
    Tchebycheff scalarization as ``μ → 0``; its gradient is the softmax-weighted sum of the
    ``λ_i ∇L_i``. Computed as ``M + μ log Σ exp((y_i - M)/μ)`` with ``M = max_i y_i`` (the
    paper's Appendix B.1), so that no exponent overflows for large values or small ``μ``.

    Parameters
    ----------
    mu:
        The smoothing ``μ > 0`` (the paper evaluates 0.01 to 1; smaller is closer to the max).
    weights:
        ``λ``, of the shape of the values; ``None`` is ``1/m`` everywhere.
    reference:
        ``z^*``, of the shape of the values; ``None`` is 0.

    Examples
    --------
    >>> import torch
    >>> values = torch.tensor([1.0, 3.0])
    >>> STCH(mu=1.0)(values)  # log(e^0.5 + e^1.5)
    tensor(1.8133)
    >>> STCH(mu=1e-3, weights=torch.ones(2))(values)  # ≈ max
    tensor(3.)
    """

    mu = Hyper(lambda value: check_number("mu", value, positive=True))
    weights = tensor_setting("weights", optional=True)
    reference = tensor_setting("reference", optional=True)

    def __init__(
        self, mu: float, weights: Tensor | None = None, reference: Tensor | None = None
    ) -> None:
        super().__init__()
        self.mu = mu
        self.weights = weights
        self.reference = reference

    def forward(self, values: Tensor, /) -> Tensor:
        check_same_shape("weights", self.weights, values)
        check_same_shape("reference", self.reference, values)
        shifted = relative_to(values, self.reference)
        if self.weights is None:
            y = shifted / values.numel()
        else:
            y = as_like(self.weights, values) * shifted
        top = y.detach().max()
        return top + self.mu * torch.logsumexp(((y - top) / self.mu).flatten(), dim=0)

    def extra_repr(self) -> str:
        return f"mu={self.mu}, weights={self.weights!r}, reference={self.reference!r}"
