"""Validation and expansion of the optional preference vector shared by several methods."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from jdoptim.aggregation._bases import Weighting
from jdoptim.aggregation._hyper import Hyper
from jdoptim.linalg._projector import check_projector


def check_pref_vector(pref_vector: Tensor | None) -> Tensor | None:
    """Validate a user-given preference vector (or ``None``) at construction time."""
    if pref_vector is None:
        return None
    if not isinstance(pref_vector, Tensor):
        raise TypeError(f"pref_vector must be a Tensor or None, got {type(pref_vector).__name__}")
    if pref_vector.ndim != 1:
        raise ValueError(f"pref_vector must be 1-D, got shape {tuple(pref_vector.shape)}")
    if not pref_vector.is_floating_point() or not bool(torch.isfinite(pref_vector).all()):
        raise ValueError("pref_vector must hold finite floating-point values")
    return pref_vector.detach().clone()


def pref_weights(pref_vector: Tensor | None, like: Tensor) -> Tensor:
    """Return the preference vector for ``m = like.shape[0]`` rows (the mean when ``None``)."""
    m = like.shape[0]
    if pref_vector is None:
        return torch.full((m,), 1.0 / m, dtype=like.dtype, device=like.device)
    if pref_vector.shape[0] != m:
        raise ValueError(
            f"pref_vector has {pref_vector.shape[0]} entries but the matrix has {m} rows"
        )
    return pref_vector.to(dtype=like.dtype, device=like.device)


def pref_repr(pref_vector: Tensor | None) -> str:
    """The ``pref_vector=...`` part of a ``repr``."""
    return f"pref_vector={pref_vector!r}"


class ProjectionWeighting(Weighting):
    """The scaffolding of UPGrad's and DualProj's weightings: a preference and a projector."""

    pref_vector = Hyper(check_pref_vector)
    projector = Hyper(check_projector)

    def __init__(
        self,
        pref_vector: Tensor | None = None,
        projector: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.pref_vector = pref_vector
        self.projector = projector

    def extra_repr(self) -> str:
        return f"{pref_repr(self.pref_vector)}, projector={self.projector!r}"
