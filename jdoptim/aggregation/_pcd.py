"""PCD: Priority-Constrained Descent on a primary task (Varam & AlHajri, 2026)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import quadprog
import torch
from torch import Tensor

from jdoptim.aggregation._aligned_mtl import kept_spectrum
from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting, check_gramian
from jdoptim.aggregation._random import check_state_keys


def _fraction(name: str, value: float, upper_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    ok = 0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0
    if not (math.isfinite(value) and ok):
        raise ValueError(f"{name} must be in [0, {'1)' if upper_open else '1]'}, got {value!r}")
    return float(value)


def _multipliers(factor: np.ndarray, bounds: np.ndarray) -> np.ndarray | None:
    """KKT multipliers of ``min ½‖y - B_0‖²`` s.t. ``B_j y >= bounds_j`` (None if infeasible)."""
    try:
        solution = quadprog.solve_qp(
            np.eye(factor.shape[1]), factor[0].copy(), factor[1:].T.copy(), bounds, 0
        )
    except ValueError:
        return None
    return np.maximum(solution[4], 0.0)


class PCDWeighting(Weighting):
    r"""The weighting of :class:`PCD` (row 0 is the primary task).

    The normalisers ``ν_j = \sqrt{\hat v_j}`` come from the bias-corrected EMA ``v_j ← β v_j +
    (1 - β) G_jj``, floored at ``eps · max_k ν_k`` (a relative floor; rows never seen non-zero
    get ``1/ν_j = 0``). With ``\tilde G = N^{-1} G N^{-1}``, the multipliers ``μ`` of the QP are
    computed in the range of ``\tilde G`` by quadprog, and ``w ∝ N^{-1}(e_0 + μ)``, scaled so
    that ``‖Jᵀw‖ = ‖g_1‖`` (the primary gradient's norm, as in the paper's Algorithm 1). If the
    constraints are infeasible for ``τ`` (e.g. ``0`` in the convex hull of the secondaries), the
    step is the primary gradient ``g_1`` itself (``w = e_0``), as in the authors' code.

    Examples
    --------
    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    >>> w = PCDWeighting(tau=0.5)(J @ J.T)  # ν = (1, √2), μ = τ - g̃_2ᵀg̃_1 = 0.5 + 1/√2
    >>> w  # (1, μ/√2), rescaled so that ‖Jᵀw‖ = ‖g_1‖ = 1
    tensor([1.1547, 0.9856], dtype=torch.float64)
    """

    def __init__(self, tau: float = 0.02, beta: float = 0.999, eps: float = 1e-8) -> None:
        self.tau = _fraction("tau", tau, upper_open=False)
        self.beta = _fraction("beta", beta, upper_open=True)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise TypeError(f"eps must be a number, got {type(eps).__name__}")
        if not (math.isfinite(eps) and 0.0 < eps < 1.0):
            raise ValueError(f"eps must be in (0, 1), got {eps!r}")
        self.eps = float(eps)
        self.reset()

    def forward(self, gramian: Tensor, /) -> Tensor:
        check_gramian(gramian)
        g = gramian.detach().to(torch.float64)
        m = g.shape[0]
        if self._ema is None:
            self._ema = torch.zeros(m, dtype=torch.float64)
        elif self._ema.shape[0] != m:
            raise ValueError(f"PCD's state is for {self._ema.shape[0]} rows, got {m}")
        diagonal = g.diagonal().clamp(min=0.0).cpu()
        self._ema = self.beta * self._ema + (1.0 - self.beta) * diagonal
        self._step += 1
        norms = (self._ema / (1.0 - self.beta**self._step)).sqrt()
        norms = norms.clamp(min=self.eps * float(norms.max()))
        inverse = torch.where(norms > 0, 1.0 / norms.where(norms > 0, 1.0), 0.0).to(g.device)
        primary_norm = float(diagonal[0].sqrt()) if m > 0 else 0.0
        weights = torch.zeros(m, dtype=torch.float64)
        if m == 0 or primary_norm == 0.0:
            return weights.to(device=gramian.device, dtype=gramian.dtype)
        weights[0] = 1.0 / primary_norm  # the fallback: g_1 itself once rescaled to ‖g_1‖
        eigenvalues, eigenvectors = kept_spectrum(
            inverse[:, None] * g * inverse[None, :], torch.finfo(gramian.dtype).eps
        )
        if m > 1 and eigenvalues.numel() > 0:
            factor = (eigenvectors * eigenvalues.sqrt()).cpu().numpy()
            bounds = self.tau * (factor[1:] ** 2).sum(axis=1)
            mu = _multipliers(factor, bounds)
            if mu is not None:  # d* = g̃_1 + Σ μ_j g̃_j; infeasible: the step is g_1
                multipliers = torch.zeros(m, dtype=torch.float64)
                multipliers[0] = 1.0
                multipliers[1:] = torch.from_numpy(mu)
                weights = inverse.cpu() * multipliers
        # ‖Jᵀw‖² = wᵀGw; the direction is rescaled to the primary gradient's norm ‖g_1‖.
        norm = abs(float(weights @ g.cpu() @ weights)) ** 0.5
        weights = weights * (primary_norm / norm) if norm > 0.0 else torch.zeros_like(weights)
        return weights.to(device=gramian.device, dtype=gramian.dtype)

    def state_dict(self) -> dict[str, Any]:
        ema = None if self._ema is None else self._ema.clone()
        return {"step": self._step, "sq_norm_ema": ema}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_keys(state_dict, {"step", "sq_norm_ema"}, type(self).__name__)
        step, ema = state_dict["step"], state_dict["sq_norm_ema"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"expected a non-negative int for 'step', got {step!r}")
        if ema is not None and (not isinstance(ema, Tensor) or ema.ndim != 1):
            raise ValueError(f"expected None or a 1-D tensor for 'sq_norm_ema', got {ema!r}")
        self._step = step
        self._ema = None if ema is None else ema.detach().to(torch.float64).cpu().clone()

    def reset(self) -> None:
        self._step = 0
        self._ema: Tensor | None = None

    def extra_repr(self) -> str:
        return f"tau={self.tau}, beta={self.beta}, eps={self.eps}"


class PCD(GramianWeightedAggregator):
    r"""Priority-Constrained Descent: follow the primary task (row 0), constrained by the others.

    *Not All Objectives Are Born Equal: Priority-Constrained Descent for Hierarchical
    Multi-Objective Optimization*, Varam & AlHajri, 2026 (https://arxiv.org/abs/2606.29521,
    https://daravaram.github.io/PCD/). With ``\tilde g_j = g_j / ν_j`` the rows normalised by the
    square root of an EMA (decay ``β``) of their squared norms, the update is the direction closest
    to the primary one that makes a ``τ``-fraction of progress on every secondary task:

    .. math::

        d^* = \operatorname*{argmin}_{d}\ \lVert d - \tilde g_0 \rVert^2
        \ \text{ s.t. }\ \tilde g_jᵀ d \ge τ \lVert \tilde g_j \rVert^2\ (j \ge 1)
        \;=\; \tilde g_0 + Σ_{j \ge 1} μ_j \tilde g_j, \quad μ \ge 0, \qquad
        \mathcal A(J) = \lVert g_0 \rVert \frac{d^*}{\lVert d^* \rVert}.

    As in the paper's Algorithm 1 and the authors' code, the direction is rescaled to the norm
    of the (raw) primary gradient ``g_0``, and when the constraints are infeasible for ``τ`` the
    step is ``g_0`` itself.

    Properties: stateful (the EMA and its step count), Gramian-only, deterministic. Positively
    homogeneous given the same state history (the direction is scale-free, the length is
    ``‖g_0‖``). Not permutation invariant (row 0 is special). When the constraints are feasible,
    secondary rows are never conflicted with (``\tilde g_jᵀd >= τ ‖\tilde g_j‖² >= 0``); the
    primary one can be, when the secondaries demand it. ``eps`` is a relative floor of the
    normalisers (no absolute epsilon).

    Parameters
    ----------
    tau:
        The guaranteed fraction ``τ ∈ [0, 1]`` of progress on each secondary task.
    beta:
        The EMA decay ``β ∈ [0, 1)`` of the squared norms (bias-corrected as Adam's).
    eps:
        Relative floor of the normalisers: ``ν_j >= eps · max_k ν_k``.

    Examples
    --------
    >>> import torch
    >>> from jdoptim.aggregation import PCD
    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    >>> d = PCD(tau=0.5)(J)
    >>> d  # d* = (0.1464, 0.8536), rescaled to ‖g_0‖ = 1
    tensor([0.1691, 0.9856], dtype=torch.float64)
    >>> round(float(J[1] @ d / (J[1].norm() * d.norm())), 4)  # cosine with g_1: 0.5 / ‖d*‖
    0.5774
    """

    def __init__(self, tau: float = 0.02, beta: float = 0.999, eps: float = 1e-8) -> None:
        super().__init__(PCDWeighting(tau, beta, eps))
