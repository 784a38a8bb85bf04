"""ExcessMTL: robust task weights from estimated excess risks (He et al., ICML 2024)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from jdoptim.aggregation._bases import WeightedAggregator, Weighting
from jdoptim.aggregation._random import check_state_keys

_KEYS = {"step", "grad_sq_sum", "reference", "log_weights"}


class ExcessMTLWeighting(Weighting):
    r"""The weighting of :class:`ExcessMTL`, computed from the matrix ``J`` itself.

    At call ``t`` each row's AdaGrad accumulator ``A_i ← A_i + g_i^{⊙2}`` gives the diagonal
    preconditioner ``H_i = \operatorname{diag}(A_i)^{1/2}`` and the excess-risk estimate
    ``r_i = g_iᵀ H_i^{-1} g_i`` (``0/0 = 0``: no absolute epsilon, so ``r`` scales with ``J``).
    The weights live on the simplex, as in the paper's min-max over convex combinations: they
    start at ``1/m`` and follow

    .. math::

        w_i ← w_i \exp(η\, r_i / r_i^0), \qquad w ← w / \mathbf 1ᵀw,

    computed in log space (no overflow), from the call that completes the reference ``r_i^0``
    (the mean of the estimates of the first ``max(n_warmup_steps, 1)`` calls; the first call by
    default, where ``r / r^0 = 1`` leaves the weights uniform). A task whose reference is still 0
    takes its first non-zero estimate as reference. (The authors' code normalises the weights
    to sum to ``m`` instead, a factor ``m`` on the step; the peer's first call exponentiates the
    raw, unnormalised risks, which is not scale-invariant.)

    State (explicit, so a fresh instance loads it): ``step``, ``grad_sq_sum`` (``[m, n]``, like
    Adam's second moment), ``reference`` and ``log_weights``; ``None`` before the first call.

    Parameters
    ----------
    robust_step_size:
        The step ``η >= 0`` of the exponentiated-gradient update of the weights.
    n_warmup_steps:
        Number of calls averaged into the reference risks (``0`` behaves as ``1``).

    Examples
    --------
    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    >>> weighting = ExcessMTLWeighting(robust_step_size=1.0)
    >>> weighting(J)  # the reference call: r / r^0 = 1, uniform weights
    tensor([0.5000, 0.5000], dtype=torch.float64)
    >>> weighting(torch.eye(2, dtype=torch.float64))  # r / r^0 = (1/√2, 1/(2√5))
    tensor([0.6186, 0.3814], dtype=torch.float64)
    """

    def __init__(self, robust_step_size: float = 1.0, n_warmup_steps: int = 0) -> None:
        if isinstance(robust_step_size, bool) or not isinstance(robust_step_size, (int, float)):
            raise TypeError(f"robust_step_size must be a number, got {robust_step_size!r}")
        if not (math.isfinite(robust_step_size) and robust_step_size >= 0.0):
            raise ValueError(f"robust_step_size must be finite and >= 0, got {robust_step_size}")
        if isinstance(n_warmup_steps, bool) or not isinstance(n_warmup_steps, int):
            raise TypeError(f"n_warmup_steps must be an int, got {n_warmup_steps!r}")
        if n_warmup_steps < 0:
            raise ValueError(f"n_warmup_steps must be >= 0, got {n_warmup_steps}")
        self.robust_step_size = float(robust_step_size)
        self.n_warmup_steps = n_warmup_steps
        self.reset()

    def forward(self, matrix: Tensor, /) -> Tensor:
        m = matrix.shape[0]
        j = matrix.detach()
        if self._grad_sq_sum is None:
            self._grad_sq_sum = torch.zeros_like(j)
            self._reference = torch.zeros(m, dtype=torch.float64, device=j.device)
            self._log_weights = torch.zeros(m, dtype=torch.float64, device=j.device)
        elif self._grad_sq_sum.shape != j.shape:
            raise ValueError(
                f"ExcessMTL's state is for shape {tuple(self._grad_sq_sum.shape)}, "
                f"got a matrix of shape {tuple(j.shape)}"
            )
        square = j.to(self._grad_sq_sum.dtype).square()
        self._grad_sq_sum += square
        root = self._grad_sq_sum.sqrt()
        ratio = torch.where(root > 0, square / root.where(root > 0, torch.ones_like(root)), 0.0)
        risk = ratio.to(torch.float64).sum(dim=1)
        warmup = max(self.n_warmup_steps, 1)
        if self._step < warmup:
            self._reference += risk / warmup
        if self._step >= warmup - 1:  # from the call that completes the reference on
            unset = self._reference <= 0.0
            self._reference = torch.where(unset, risk, self._reference)
            scaled = torch.where(self._reference > 0, risk / self._reference, 0.0)
            logs = self._log_weights + self.robust_step_size * scaled
            self._log_weights = logs - logs.max()
        self._step += 1
        return torch.softmax(self._log_weights, dim=0).to(matrix.dtype)

    def state_dict(self) -> dict[str, Any]:
        def copy(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else tensor.clone()

        return {
            "step": self._step,
            "grad_sq_sum": copy(self._grad_sq_sum),
            "reference": copy(self._reference),
            "log_weights": copy(self._log_weights),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_keys(state_dict, _KEYS, type(self).__name__)
        step = state_dict["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"expected a non-negative int for 'step', got {step!r}")
        tensors = [state_dict[k] for k in ("grad_sq_sum", "reference", "log_weights")]
        if all(t is None for t in tensors):
            self.reset()
            self._step = step
            return
        squares, reference, logs = tensors
        if not all(isinstance(t, Tensor) for t in tensors) or squares.ndim != 2:
            raise ValueError("expected grad_sq_sum [m, n], reference [m], log_weights [m] tensors")
        if reference.shape != (squares.shape[0],) or logs.shape != reference.shape:
            raise ValueError("reference and log_weights must have one entry per row")
        self._step = step
        self._grad_sq_sum = squares.detach().clone()
        self._reference = reference.detach().to(torch.float64).clone()
        self._log_weights = logs.detach().to(torch.float64).clone()

    def reset(self) -> None:
        self._step = 0
        self._grad_sq_sum: Tensor | None = None
        self._reference: Tensor | None = None
        self._log_weights: Tensor | None = None

    def extra_repr(self) -> str:
        return f"robust_step_size={self.robust_step_size}, n_warmup_steps={self.n_warmup_steps}"


class ExcessMTL(WeightedAggregator):
    r"""*Robust Multi-Task Learning with Excess Risks*, He, Zhou, Zhang et al., ICML 2024.

    https://arxiv.org/abs/2402.02009. Tasks are weighted by their estimated *excess* risk (the
    distance to their own optimum, ``≈ g_iᵀH_i^{-1}g_i`` with an AdaGrad diagonal ``H_i``)
    rather than their loss, so that noisy tasks with a large irreducible loss are not up-weighted;
    the weights follow an exponentiated-gradient (mirror ascent) step on the simplex:

    .. math::

        \mathcal A(J) = Jᵀ w, \qquad w_i ∝ w_i \exp\Bigl(η\, \frac{g_iᵀ H_i^{-1} g_i}{r_i^0}\Bigr),
        \qquad \mathbf 1ᵀw = 1.

    Properties: stateful (``[m, n]`` preconditioner, reference risks, weights; explicit
    ``state_dict``), needs ``J`` (not Gramian-only), deterministic. Positively homogeneous and
    permutation invariant from a fresh state (the first call returns the mean of the rows); over a
    run the weights are scale-invariant when every call has the same scale. Not
    non-conflicting.

    Examples
    --------
    >>> import torch
    >>> from jdoptim.aggregation import ExcessMTL
    >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    >>> ExcessMTL()(J)  # the reference call: the mean of the rows
    tensor([0.5000, 1.0000], dtype=torch.float64)
    """

    def __init__(self, robust_step_size: float = 1.0, n_warmup_steps: int = 0) -> None:
        super().__init__(ExcessMTLWeighting(robust_step_size, n_warmup_steps))
