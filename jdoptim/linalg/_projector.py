"""Dual-cone projectors: the ``projector=`` argument of UPGrad and DualProj.

A projector maps weights ``U`` of shape ``[..., m]`` and a Gramian ``G = J Jᵀ`` to the weights
``W`` (same shape as ``U``) with ``Jᵀ w = π(Jᵀ u)``, the Euclidean projection onto the dual cone
``{x : J x >= 0}``; equivalently ``w = argmin_{v >= u} vᵀ G v``. Any callable with that signature
works (TorchJD's projectors too).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import quadprog
import torch
from torch import Tensor

from jdoptim.linalg._active_set import project_weights

__all__ = ["DualConeProjector", "ExactProjector", "QuadprogProjector", "check_projector"]


class DualConeProjector(ABC):
    """Projects ``Jᵀ u`` onto the dual cone of the rows of ``J``, in weight form, from ``G``."""

    @abstractmethod
    def __call__(self, U: Tensor, G: Tensor) -> Tensor:
        """Return the weights ``W`` (shape of ``U``, ``[..., m]``) of the projections."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ExactProjector(DualConeProjector):
    """The exact projection of :func:`jdoptim.linalg.project_weights` (the default).

    No regularisation moves the answer, at any scale of ``G``.

    Examples
    --------
    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    >>> ExactProjector()(torch.tensor([0.0, 1.0], dtype=torch.float64), J @ J.T)
    tensor([1., 1.], dtype=torch.float64)
    """

    def __call__(self, U: Tensor, G: Tensor) -> Tensor:
        m = G.shape[0]
        return project_weights(G, U.reshape(-1, m).to(G.dtype)).reshape(U.shape)


class QuadprogProjector(DualConeProjector):
    """TorchJD's regularised projection, to reproduce its numbers (not exact).

    ``G`` is divided by its trace (or replaced by 0 when the trace is below ``norm_eps``), then
    ``reg_eps · I`` is added, and ``argmin_{v >= u} vᵀ G' v`` is solved by quadprog on the host,
    one ``u`` at a time. The regularisation moves the answer by about ``reg_eps`` relative (more
    when ``G`` is ill-conditioned), and below ``trace(G) < norm_eps`` UPGrad becomes the mean.

    Parameters
    ----------
    norm_eps:
        The trace below which ``G`` is treated as 0 (``>= 0``).
    reg_eps:
        The multiple of the identity added to the normalised ``G`` (``>= 0``).

    Examples
    --------
    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    >>> QuadprogProjector()(torch.tensor([0.0, 1.0], dtype=torch.float64), J @ J.T)
    tensor([0.9997, 1.0000], dtype=torch.float64)
    """

    def __init__(self, *, norm_eps: float = 1e-4, reg_eps: float = 1e-4) -> None:
        for name, value in (("norm_eps", norm_eps), ("reg_eps", reg_eps)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        self.norm_eps = float(norm_eps)
        self.reg_eps = float(reg_eps)

    def __call__(self, U: Tensor, G: Tensor) -> Tensor:
        g = G.detach().double().cpu().numpy()
        trace = float(np.trace(g))
        g = np.zeros_like(g) if trace < self.norm_eps else g / trace
        g = g + self.reg_eps * np.eye(g.shape[0])
        u = U.detach().double().cpu().numpy().reshape(-1, g.shape[0])
        identity = np.eye(g.shape[0])
        w = [quadprog.solve_qp(g, np.zeros(g.shape[0]), identity, row)[0] for row in u]
        return torch.as_tensor(np.array(w), dtype=G.dtype, device=G.device).reshape(U.shape)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(norm_eps={self.norm_eps}, reg_eps={self.reg_eps})"


def check_projector(projector: Any) -> Any:
    """``None`` gives an :class:`ExactProjector`; otherwise ``projector`` must be callable."""
    if projector is None:
        return ExactProjector()
    if not callable(projector):
        raise TypeError(f"projector must be callable (U, G) -> W, got {type(projector).__name__}")
    return projector
