"""FAMO: fast adaptive multitask optimization (Liu, Liang, Gu, Stone & Liu, NeurIPS 2023)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from jdoptim.aggregation._hyper import Hyper
from jdoptim.aggregation._random import check_state_keys
from jdoptim.scalarization._base import (
    Scalarizer,
    as_like,
    check_number,
    check_same_shape,
    check_shape,
    check_tensor,
)

_BETAS = (0.9, 0.999)  # Adam's defaults, as the paper's Algorithm 1
_ADAM_EPS = 1e-8


class FAMO(Scalarizer):
    r"""Balance the rates at which the log-losses decrease, from the loss values alone.

    *FAMO: Fast Adaptive Multitask Optimization*, Liu, Liang, Gu, Stone & Liu, NeurIPS 2023
    (https://arxiv.org/abs/2306.03792), Algorithm 1. With task weights ``z = softmax(ξ)`` from
    the logits ``ξ`` and lower bounds ``b`` (``min_losses``), the scalar is

    .. math::

        c \sum_i z_i \log(L_i - b_i + ε), \qquad c = \Big(\sum_i \frac{z_i}{L_i - b_i + ε}\Big)^{-1}

    (``z`` and ``c`` are constants of the backward pass): its gradient is the convex combination
    ``Σ_i (c z_i / (L_i - b_i + ε)) ∇L_i``. After the model's step, :meth:`update` with the
    losses recomputed on the same batch moves ``ξ`` by one Adam step (weight decay
    ``weight_decay``, the paper's regulariser ``γ``) along

    .. math::

        ∇_ξ = J_{\operatorname{softmax}}(ξ)^\top δ = z \odot (δ - z^\top δ), \qquad
        δ_i = \log(L_i^{\text{before}} - b_i + ε) - \log(L_i^{\text{after}} - b_i + ε).

    The logits are an ``nn.Parameter`` (``logits``) for inspection and checkpoints, but FAMO
    steps them itself: do not give them to the model's optimizer (no gradient reaches them
    through the scalar). The Adam moments and step count are buffers and extra state, allocated
    at construction, so ``state_dict()`` resumes FAMO bit for bit (TorchJD's internal ``Adam``
    is not in its ``state_dict``). With :class:`~jdoptim.JacobianOptimizer`, call
    ``update`` after ``opt.step(closure)``.

    Parameters
    ----------
    shape:
        The shape of the values (an ``int`` ``n`` means ``(n,)``).
    min_losses:
        ``b``, of that shape; ``None`` is 0 (then the losses must be positive).
    lr:
        Adam's learning rate for the logits (``>= 0``; the paper uses 0.025).
    weight_decay:
        Adam's weight decay ``γ`` (``>= 0``; 1e-3 as the paper's Algorithm; its code uses 1e-5).
    eps:
        ``ε`` added inside the logarithms (``>= 0``; 1e-8 as the paper's code).

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Linear(3, 2)
    >>> famo = FAMO(2)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> x = torch.randn(8, 3)
    >>> loss = famo(model(x).pow(2).mean(dim=0))
    >>> loss.backward()
    >>> opt.step()
    >>> with torch.no_grad():
    ...     famo.update(model(x).pow(2).mean(dim=0))  # the same batch, after the step
    >>> float(famo.task_weights().sum())
    1.0
    """

    lr = Hyper(lambda value: check_number("lr", value))
    weight_decay = Hyper(lambda value: check_number("weight_decay", value))
    eps = Hyper(lambda value: check_number("eps", value))

    def __init__(
        self,
        shape: int | Sequence[int],
        min_losses: Tensor | None = None,
        lr: float = 0.025,
        weight_decay: float = 1e-3,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        dims = check_shape(shape)
        self.lr = lr
        self.weight_decay = weight_decay
        self.eps = eps
        bounds = check_tensor("min_losses", min_losses, optional=True)
        if bounds is None:
            bounds = torch.zeros(dims)
        elif tuple(bounds.shape) != dims:
            raise ValueError(f"min_losses has shape {tuple(bounds.shape)}, expected {dims}")
        self.logits = nn.Parameter(torch.zeros(dims))
        self.register_buffer("min_losses", bounds)
        self.register_buffer("exp_avg", torch.zeros(dims))
        self.register_buffer("exp_avg_sq", torch.zeros(dims))
        self.register_buffer("previous_losses", torch.zeros(dims))
        self._adam_steps = 0
        self._has_previous = False

    def task_weights(self) -> Tensor:
        """``z = softmax(ξ)``, of the shape of the values (detached)."""
        logits = self.logits.detach()
        return torch.softmax(logits.flatten(), dim=0).reshape(logits.shape)

    def forward(self, values: Tensor, /) -> Tensor:
        check_same_shape("logits", self.logits, values)
        z = as_like(self.task_weights(), values)
        shifted = values - as_like(self.min_losses, values) + self.eps
        c = 1.0 / (z / shifted.detach()).sum()
        with torch.no_grad():
            self.previous_losses.copy_(values.detach())
        self._has_previous = True
        return (c * z * torch.log(shifted)).sum()

    @torch.no_grad()
    def update(self, values: Tensor, /) -> None:
        """Take one Adam step on the logits from the losses after the model's step.

        Call it after the scalarizer was called on the batch's losses and the model stepped, with
        the losses recomputed on the same batch.
        """
        if not self._has_previous:
            raise RuntimeError("FAMO.update needs a call on the losses before the model's step")
        check_same_shape("logits", self.logits, values)
        logits = self.logits
        before = torch.log(self.previous_losses - self.min_losses + self.eps)
        after = torch.log(values.detach().to(logits) - self.min_losses + self.eps)
        delta = before - after
        z = self.task_weights()
        grad = z * (delta - (z * delta).sum()) + self.weight_decay * logits
        beta1, beta2 = _BETAS
        self._adam_steps += 1
        self.exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        correction1 = 1 - beta1**self._adam_steps
        correction2 = 1 - beta2**self._adam_steps
        denominator = (self.exp_avg_sq.sqrt() / correction2**0.5).add_(_ADAM_EPS)
        logits.addcdiv_(self.exp_avg, denominator, value=-self.lr / correction1)

    def get_extra_state(self) -> dict[str, Any]:
        return {"adam_steps": self._adam_steps, "has_previous": self._has_previous}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        check_state_keys(state, {"adam_steps", "has_previous"}, type(self).__name__)
        steps, has_previous = state["adam_steps"], state["has_previous"]
        if not isinstance(steps, int) or steps < 0 or not isinstance(has_previous, bool):
            raise ValueError(f"invalid FAMO state {state!r}")
        self._adam_steps, self._has_previous = steps, has_previous

    def reset(self) -> None:
        with torch.no_grad():
            for tensor in (self.logits, self.exp_avg, self.exp_avg_sq, self.previous_losses):
                tensor.zero_()
        self._adam_steps, self._has_previous = 0, False

    def extra_repr(self) -> str:
        return f"shape={tuple(self.logits.shape)}, lr={self.lr}, weight_decay={self.weight_decay}"
