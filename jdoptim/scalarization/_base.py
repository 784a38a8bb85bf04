"""The base class of scalarizers and the checks they share."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from jdoptim._module import StateModule

__all__ = ["Scalarizer", "check_number", "check_same_shape", "check_tensor", "tensor_setting"]


class Scalarizer(StateModule, ABC):
    """Reduces a tensor of values (losses) of any shape to one scalar, differentiably.

    The loss-combining counterpart of an :class:`~jdoptim.aggregation.Aggregator`: instead of
    combining the per-loss gradients, it combines the losses, and one ordinary backward pass gives
    the gradient. Passed to :class:`~jdoptim.JacobianOptimizer` in place of an aggregator, it lets
    one training loop compare both families.

    Calling a scalarizer checks that ``values`` is a floating-point tensor, then runs
    :meth:`forward` and the forward hooks. Stateful scalarizers keep their state in parameters
    (``UW``, ``IMTLL``, ``FAMO``), buffers, or explicit extra state (``DWA``, ``Random``), all in
    ``state_dict()``.
    """

    @abstractmethod
    def forward(self, values: Tensor, /) -> Tensor:
        """Return the scalar combination of ``values`` (already checked)."""

    def __call__(self, values: Tensor, /) -> Tensor:
        """Check ``values``, then run :meth:`forward` and the hooks."""
        if not isinstance(values, Tensor):
            raise TypeError(f"expected a tensor of values, got {type(values).__name__}")
        if not values.is_floating_point():
            raise ValueError(f"expected floating-point values, got dtype {values.dtype}")
        if values.numel() == 0:
            raise ValueError(f"expected at least one value, got shape {tuple(values.shape)}")
        return super().__call__(values)


def check_number(name: str, value: Any, *, positive: bool = False) -> float:
    """A finite real ``>= 0`` (``> 0`` when ``positive``), as a ``float``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be finite and {'> 0' if positive else '>= 0'}, got {value}")
    return float(value)


def check_tensor(name: str, value: Any, *, optional: bool = False) -> Tensor | None:
    """A finite floating-point tensor (or ``None`` when ``optional``), detached and copied."""
    if value is None and optional:
        return None
    if not isinstance(value, Tensor):
        expected = "a Tensor or None" if optional else "a Tensor"
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} must hold finite floating-point values")
    return value.detach().clone()


def check_same_shape(name: str, tensor: Tensor | None, values: Tensor) -> None:
    """Raise unless ``tensor`` (when given) has the shape of ``values``."""
    if tensor is not None and tensor.shape != values.shape:
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)} but the values have shape "
            f"{tuple(values.shape)}"
        )


def tensor_setting(name: str, *, optional: bool = False) -> property:
    """A tensor setting validated on assignment and kept as a non-persistent buffer.

    ``.to()`` moves it with the module; it is a constructor argument, not state, so it stays out
    of ``state_dict()``.
    """
    slot = f"_{name}"

    def get(self: Any) -> Tensor | None:
        return self._buffers[slot]

    def set_(self: Any, value: Tensor | None) -> None:
        self.register_buffer(slot, check_tensor(name, value, optional=optional), persistent=False)

    return property(get, set_, doc=f"``{name}`` (validated on assignment; moved by ``.to()``).")


def as_like(tensor: Tensor, values: Tensor) -> Tensor:
    """``tensor`` in the dtype and on the device of ``values``."""
    return tensor.to(dtype=values.dtype, device=values.device)


def relative_to(values: Tensor, reference: Tensor | None) -> Tensor:
    """``values - reference`` (``values`` itself without a reference point)."""
    return values if reference is None else values - as_like(reference, values)


def check_shape(shape: Any) -> tuple[int, ...]:
    """An ``int`` ``n`` (meaning ``(n,)``) or a sequence of non-negative ints, as a tuple."""
    dims = (shape,) if isinstance(shape, int) and not isinstance(shape, bool) else shape
    try:
        dims = tuple(dims)
    except TypeError:
        raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}") from None
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims):
        raise ValueError(f"shape must hold positive ints, got {shape!r}")
    return dims


def norm(vector: Tensor) -> Tensor:
    """``‖vector‖₂`` without overflow or underflow (the vector is scaled by its largest entry
    first), with the subgradient 0 at 0."""
    scale = vector.detach().abs().amax()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale * torch.linalg.vector_norm(vector / scale)
