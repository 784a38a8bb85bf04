"""Base classes of the aggregation package.

An :class:`Aggregator` turns a Jacobian matrix ``J`` of shape ``[m, n]`` (one row per loss) into an
update vector of shape ``[n]``. Most methods of the literature are *weightings*: they compute a
weight vector ``w`` of shape ``[m]`` and return ``Jᵀ w``. Those whose weights depend on ``J`` only
through its Gramian ``G = J Jᵀ`` are :class:`GramianWeightedAggregator` instances; the engine then
never needs to concatenate ``J`` and computes ``G`` and ``Jᵀ w`` block by block.

Stateful and random methods expose their state through ``state_dict`` / ``load_state_dict`` /
``reset``; stateless ones return an empty dict.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from jdoptim.linalg import gramian

__all__ = [
    "Aggregator",
    "GramianWeightedAggregator",
    "WeightedAggregator",
    "Weighting",
    "check_gramian",
    "check_matrix",
]


def check_matrix(matrix: Tensor) -> None:
    """Raise a ``ValueError`` unless ``matrix`` is a finite floating-point ``[m, n]`` tensor."""
    if not isinstance(matrix, Tensor):
        raise TypeError(f"expected a torch.Tensor matrix, got {type(matrix).__name__}")
    if matrix.ndim != 2:
        raise ValueError(f"expected a matrix of shape [m, n], got shape {tuple(matrix.shape)}")
    if not matrix.is_floating_point():
        raise ValueError(f"expected a floating-point matrix, got dtype {matrix.dtype}")
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError("the matrix contains NaN or inf values")


def check_gramian(gramian: Tensor) -> None:
    """Raise a ``ValueError`` unless ``gramian`` is a finite, square floating-point matrix."""
    check_matrix(gramian)
    if gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"expected a square Gramian, got shape {tuple(gramian.shape)}")


class _Stateful:
    """The state protocol shared by aggregators and weightings.

    Stateless methods keep the defaults. A stateful method overrides all three methods and
    allocates its state eagerly, so that a freshly built instance accepts a saved state.
    """

    def state_dict(self) -> dict[str, Any]:
        """Return the method's state (tensors and Python values); empty when stateless."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state returned by :meth:`state_dict`."""
        if state_dict:
            raise ValueError(
                f"{type(self).__name__} is stateless but got state keys {sorted(state_dict)}"
            )

    def reset(self) -> None:
        """Forget the state accumulated over previous calls (no-op when stateless)."""

    def extra_repr(self) -> str:
        """The constructor arguments shown by ``repr``."""
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class Weighting(_Stateful, ABC):
    """Maps a statistic of the Jacobian to a weight vector of shape ``[m]``.

    Subclasses implement :meth:`forward`. A weighting used by a :class:`GramianWeightedAggregator`
    receives the Gramian ``J Jᵀ``; one used by a :class:`WeightedAggregator` receives ``J`` itself.
    """

    @abstractmethod
    def forward(self, stat: Tensor, /) -> Tensor:
        """Return the weights, of shape ``[m]``, for the statistic ``stat``."""

    def __call__(self, stat: Tensor, /) -> Tensor:
        return self.forward(stat)


class Aggregator(_Stateful, ABC):
    """Maps a Jacobian ``J`` of shape ``[m, n]`` to an update of shape ``[n]``.

    Calling an aggregator validates its input (a finite floating-point matrix) and then runs
    :meth:`forward`.
    """

    @abstractmethod
    def forward(self, matrix: Tensor, /) -> Tensor:
        """Return the aggregation of ``matrix`` (already validated)."""

    def __call__(self, matrix: Tensor, /) -> Tensor:
        check_matrix(matrix)
        return self.forward(matrix)


class WeightedAggregator(Aggregator):
    """An aggregator of the form ``A(J) = Jᵀ W(J)`` for a weighting ``W`` of the matrix."""

    def __init__(self, weighting: Weighting) -> None:
        if not isinstance(weighting, Weighting):
            raise TypeError(f"expected a Weighting, got {type(weighting).__name__}")
        self.weighting = weighting

    def weights(self, matrix: Tensor) -> Tensor:
        """Return the weights ``W(J)`` of shape ``[m]``."""
        return self.weighting(matrix)

    def forward(self, matrix: Tensor, /) -> Tensor:
        return self.weights(matrix) @ matrix

    def state_dict(self) -> dict[str, Any]:
        return self.weighting.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.weighting.load_state_dict(state_dict)

    def reset(self) -> None:
        self.weighting.reset()

    def extra_repr(self) -> str:
        return self.weighting.extra_repr()


class GramianWeightedAggregator(WeightedAggregator):
    """An aggregator ``A(J) = Jᵀ W(J Jᵀ)`` whose weights depend on ``J`` only through its Gramian.

    The engine recognises this class and computes the Gramian block by block instead of the
    concatenated Jacobian.
    """

    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        """Return the weights ``W(G)`` of shape ``[m]`` for a Gramian ``G``."""
        check_gramian(gramian)
        return self.weighting(gramian)

    def weights(self, matrix: Tensor) -> Tensor:
        """Return ``W(J Jᵀ)`` in ``matrix``'s dtype; the Gramian is formed in float64.

        :func:`jdoptim.linalg.gramian` neither overflows nor underflows for any finite float32,
        float16 or bfloat16 ``J`` (entries near ``1e19`` or ``1e-23`` in float32 included).
        """
        return self.weighting(gramian(matrix)).to(matrix.dtype)
