"""CR-MOGM: an exponential moving average of the weights of any weighting (Zhou et al., 2022)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from jdoptim.aggregation._bases import Weighting
from jdoptim.aggregation._hyper import Hyper
from jdoptim.aggregation._random import check_state_keys


def _check_initial_weights(weights: Tensor | None) -> Tensor | None:
    if weights is None:
        return None
    if not isinstance(weights, Tensor):
        raise TypeError(f"initial_weights must be a Tensor or None, got {type(weights).__name__}")
    if weights.ndim != 1 or weights.shape[0] == 0:
        raise ValueError(f"initial_weights must be 1-D, non-empty, got {tuple(weights.shape)}")
    if not weights.is_floating_point() or not bool(torch.isfinite(weights).all()):
        raise ValueError("initial_weights must hold finite floating-point values")
    return weights.detach().to(torch.float64).clone()


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a number, got {type(alpha).__name__}")
    if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    return float(alpha)


class CRMOGMWeighting(Weighting):
    r"""Smooth the weights of a wrapped weighting with an exponential moving average over calls.

    *On the Convergence of Stochastic Multi-Objective Gradient Manipulation and Beyond*, Zhou,
    Zhang, Jiang, Zhong, Gu & Zhu, NeurIPS 2022
    (https://proceedings.neurips.cc/paper_files/paper/2022/hash/f91bd64a3620aad8e70a27ad9cb3ca57-Abstract-Conference.html).
    Stochastic gradient-manipulation methods (MGDA, PCGrad, ...) compute weights ``\hat λ_k``
    from one mini-batch, which correlates them with the gradients they weight; the
    correlation-reduced variant (CR-MOGM) uses instead

    .. math::

        λ_k = α\, λ_{k-1} + (1 - α)\, \hat λ_k, \qquad λ_0 = \text{initial\_weights}
        \ (\text{uniform } 1/m \text{ by default}).

    It receives what the wrapped weighting receives (a Gramian, or the matrix for a
    :class:`~jdoptim.aggregation.WeightedAggregator`) and passes it on, e.g.
    ``GramianWeightedAggregator(CRMOGMWeighting(MGDAWeighting()))``.

    Properties: stateful (``λ_{k-1}``, plus the wrapped weighting's state; ``reset()`` clears
    both); deterministic when the wrapped weighting is; Gramian-only when it is. Scale-invariant
    weights (MGDA's, UPGrad's) stay scale-invariant, so positive homogeneity is kept given the same
    state. From a fresh state with uniform ``λ_0`` it is as permutation invariant as the wrapped
    weighting; afterwards only when ``J`` and the stored average are permuted together. Not
    non-conflicting in general, even when the wrapped weighting is: the stored average comes from
    earlier Jacobians (and ``λ_0`` is the Mean's weights).

    Parameters
    ----------
    weighting:
        The wrapped :class:`~jdoptim.aggregation.Weighting`.
    alpha:
        The weight ``α ∈ [0, 1]`` of the previous average (``0``: the wrapped weights unchanged;
        ``1``: ``λ_0`` forever).
    initial_weights:
        ``λ_0`` (1-D, finite); ``None`` is uniform, and then a change of ``m`` restarts from it.

    Examples
    --------
    >>> import torch
    >>> from jdoptim.aggregation import ConstantWeighting
    >>> inner = ConstantWeighting(torch.tensor([1.0, 0.0]))
    >>> weighting = CRMOGMWeighting(inner, alpha=0.5)
    >>> weighting(torch.eye(2))  # 0.5 * [0.5, 0.5] + 0.5 * [1, 0]
    tensor([0.7500, 0.2500])
    >>> weighting(torch.eye(2))
    tensor([0.8750, 0.1250])
    """

    alpha = Hyper(_check_alpha)
    initial_weights = Hyper(_check_initial_weights)

    def __init__(
        self, weighting: Weighting, alpha: float = 0.9, initial_weights: Tensor | None = None
    ) -> None:
        if not isinstance(weighting, Weighting):
            raise TypeError(f"weighting must be a Weighting, got {type(weighting).__name__}")
        super().__init__()
        self.alpha = alpha
        self.initial_weights = initial_weights
        self.weighting = weighting
        self._average: Tensor | None = None

    def _previous(self, m: int, device: torch.device) -> Tensor:
        if self._average is not None and self._average.shape[0] == m:
            return self._average.to(device)
        if self.initial_weights is None:
            return torch.full((m,), 1.0 / m, dtype=torch.float64, device=device)
        if self.initial_weights.shape[0] != m:
            raise ValueError(
                f"initial_weights has {self.initial_weights.shape[0]} entries but got {m} rows"
            )
        return self.initial_weights.to(device)

    def forward(self, stat: Tensor, /) -> Tensor:
        new = self.weighting(stat)
        previous = self._previous(new.shape[0], new.device)
        average = self.alpha * previous + (1.0 - self.alpha) * new.detach().to(torch.float64)
        self._average = average
        return average.to(new.dtype)

    def get_extra_state(self) -> dict[str, Any]:
        """The running average (the wrapped weighting's state is its own ``_extra_state``)."""
        average = None if self._average is None else self._average.clone()
        return {"average": average}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        check_state_keys(state, {"average"}, type(self).__name__)
        average = state["average"]
        if average is not None and (not isinstance(average, Tensor) or average.ndim != 1):
            raise ValueError(f"expected None or a 1-D tensor for 'average', got {average!r}")
        self._average = None if average is None else average.detach().to(torch.float64).clone()

    def reset(self) -> None:
        self._average = None
        super().reset()

    def extra_repr(self) -> str:
        initial = None if self.initial_weights is None else self.initial_weights.tolist()
        return f"{self.weighting!r}, alpha={self.alpha}, initial_weights={initial}"
