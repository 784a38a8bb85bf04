"""Weightings fed by two independent mini-batches (double sampling), and the functional helpers.

Stochastic MGDA-type methods are biased when the weights and the update come from the same
mini-batch: ``E[J Jᵀ] ≠ E[J] E[J]ᵀ``. MoDo and SDMGrad remove that bias by *double sampling*: the
weights are updated with the cross-Gramian ``C = J₁ J₂ᵀ`` of the Jacobians of two independent
mini-batches, an unbiased estimate of ``E[J] E[J]ᵀ``. Such a weighting works two ways:

* with one batch, as any Gramian weighting (``C = J Jᵀ``): ``GramianWeightedAggregator(w)`` in a
  :class:`~jdoptim.JacobianOptimizer`, which is the biased single-sample variant;
* with two batches, through :func:`jac_pair_to_grad`::

      j1 = jac(losses(batch_1), params)    # one Jacobian [m, *p.shape] per parameter
      j2 = jac(losses(batch_2), params)
      jac_pair_to_grad(params, MoDoWeighting(), j1, j2)   # .grad += ((J₁ + J₂)/2)ᵀ w(J₁ J₂ᵀ)
      optimizer.step()

  The update uses the mean of the two batches' Jacobians; pass ``update_jacobians=`` (a third
  independent batch) to follow the papers' algorithms exactly.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from jdoptim.aggregation._bases import Weighting, check_gramian
from jdoptim.aggregation._random import check_state_keys

__all__ = ["DoubleSamplingWeighting", "cross_gramian", "jac_pair_to_grad"]


class DoubleSamplingWeighting(Weighting):
    """A stateful weighting on the simplex fed by a Gramian or a cross-Gramian ``J₁ J₂ᵀ``.

    Subclasses implement :meth:`weights_from_cross_gramian`; calling the weighting on a Gramian
    ``J Jᵀ`` is the one-batch case. The state is the current point ``λ`` of the simplex (float64),
    ``None`` before the first call; it restarts from the uniform point when ``m`` changes.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lambda: Tensor | None = None

    @abstractmethod
    def weights_from_cross_gramian(self, cross_gramian: Tensor) -> Tensor:
        """Update the state with ``C = J₁ J₂ᵀ`` (any square matrix) and return the weights."""

    def forward(self, gramian: Tensor, /) -> Tensor:
        return self.weights_from_cross_gramian(gramian)

    def _start(self, cross_gramian: Tensor) -> Tensor:
        """Validate ``C`` and return the current ``λ`` (float64, on ``C``'s device)."""
        check_gramian(cross_gramian)
        m = cross_gramian.shape[0]
        if m == 0:
            raise ValueError("a weighting on the simplex needs at least one row, got 0")
        if self._lambda is None or self._lambda.shape[0] != m:
            return torch.full((m,), 1.0 / m, dtype=torch.float64, device=cross_gramian.device)
        return self._lambda.to(cross_gramian.device)

    def get_extra_state(self) -> dict[str, Any]:
        return {"lambda": None if self._lambda is None else self._lambda.clone()}

    def set_extra_state(self, state_dict: dict[str, Any]) -> None:
        check_state_keys(state_dict, {"lambda"}, type(self).__name__)
        value = state_dict["lambda"]
        if value is not None and (not isinstance(value, Tensor) or value.ndim != 1):
            raise ValueError(f"expected None or a 1-D tensor for 'lambda', got {value!r}")
        self._lambda = None if value is None else value.detach().to(torch.float64).clone()

    def reset(self) -> None:
        self._lambda = None


def _as_blocks(jacobians: Sequence[Tensor], name: str) -> list[Tensor]:
    if isinstance(jacobians, Tensor):
        jacobians = [jacobians]
    blocks = list(jacobians)
    if not blocks or not all(isinstance(j, Tensor) and j.ndim >= 1 for j in blocks):
        raise ValueError(f"{name} must be a non-empty sequence of tensors of shape [m, ...]")
    return blocks


def cross_gramian(jacobians_1: Sequence[Tensor], jacobians_2: Sequence[Tensor]) -> Tensor:
    """Return ``C = Σ_k J₁ₖ J₂ₖᵀ`` of shape ``[m, m]`` for matching blocks ``[m, *shape_k]``.

    Examples
    --------
    >>> import torch
    >>> cross_gramian([torch.eye(2)], [torch.tensor([[1.0, 2.0], [3.0, 4.0]])])
    tensor([[1., 3.],
            [2., 4.]])
    """
    blocks_1 = _as_blocks(jacobians_1, "jacobians_1")
    blocks_2 = _as_blocks(jacobians_2, "jacobians_2")
    if len(blocks_1) != len(blocks_2):
        raise ValueError(f"got {len(blocks_1)} and {len(blocks_2)} Jacobian blocks")
    result = None
    for a, b in zip(blocks_1, blocks_2, strict=True):
        if a.shape != b.shape:
            raise ValueError(f"Jacobian blocks of shapes {tuple(a.shape)} and {tuple(b.shape)}")
        term = a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1).T
        result = term if result is None else result + term
    return result


def jac_pair_to_grad(
    tensors: Iterable[Tensor],
    weighting: DoubleSamplingWeighting,
    jacobians_1: Sequence[Tensor],
    jacobians_2: Sequence[Tensor],
    *,
    update_jacobians: Sequence[Tensor] | None = None,
) -> Tensor:
    """Weights from two independent batches, then their aggregation accumulated into ``.grad``.

    Computes ``w = weighting.weights_from_cross_gramian(J₁ J₂ᵀ)`` and adds ``Jᵤᵀ w`` to the
    ``.grad`` of each tensor, block by block, where ``Jᵤ = (J₁ + J₂) / 2`` or ``update_jacobians``.

    Parameters
    ----------
    tensors:
        The tensors whose ``.grad`` receives the update, in the order of the Jacobian blocks.
    weighting:
        A :class:`DoubleSamplingWeighting` (``MoDoWeighting``, ``SDMGradWeighting``).
    jacobians_1, jacobians_2:
        One Jacobian ``[m, *t.shape]`` per tensor for each batch, e.g. from
        :func:`jdoptim.jac`.
    update_jacobians:
        The Jacobians of the update (a third batch); ``None`` uses the mean of the two.

    Returns
    -------
    Tensor
        The weights ``w`` of shape ``[m]``.

    Examples
    --------
    >>> import torch
    >>> from jdoptim.aggregation import MoDoWeighting
    >>> x = torch.zeros(2, requires_grad=True)
    >>> j1, j2 = [torch.tensor([[1.0, 0.0], [0.0, 1.0]])], [torch.tensor([[3.0, 0.0], [0.0, 1.0]])]
    >>> jac_pair_to_grad([x], MoDoWeighting(gamma=0.1, rho=0.0), j1, j2)
    tensor([0.4500, 0.5500])
    >>> x.grad
    tensor([0.9000, 0.5500])
    """
    if not isinstance(weighting, DoubleSamplingWeighting):
        raise TypeError(f"expected a DoubleSamplingWeighting, got {type(weighting).__name__}")
    tensors = list(tensors)
    blocks_1 = _as_blocks(jacobians_1, "jacobians_1")
    blocks_2 = _as_blocks(jacobians_2, "jacobians_2")
    if update_jacobians is None:
        update = [(a + b) / 2 for a, b in zip(blocks_1, blocks_2, strict=False)]
    else:
        update = _as_blocks(update_jacobians, "update_jacobians")
    if not len(tensors) == len(blocks_1) == len(blocks_2) == len(update):
        raise ValueError(
            f"got {len(tensors)} tensors for {len(blocks_1)}, {len(blocks_2)} and {len(update)} "
            "Jacobian blocks"
        )
    for t, u in zip(tensors, update, strict=True):
        if u.shape[1:] != t.shape or u.shape[0] != blocks_1[0].shape[0]:
            raise ValueError(f"a Jacobian of shape {tuple(u.shape)} for a tensor {tuple(t.shape)}")
    weights = weighting.weights_from_cross_gramian(cross_gramian(blocks_1, blocks_2))
    for t, u in zip(tensors, update, strict=True):
        g = torch.tensordot(weights.to(u.dtype), u, dims=1).detach()
        t.grad = g if t.grad is None else t.grad + g
    return weights
