r"""The layer-Gramian engine: the Gramian of any loss vector, ``Linear`` layers in kernel form.

For ``m`` losses that each depend on the whole batch (task losses over a shared trunk), the rows of
the Jacobian w.r.t. the weight of a ``Linear`` layer are ``J_t = Gₒ_tᵀ A``, where ``A``
(``[N, d]``, every position of the batch) is the layer input and ``Gₒ_t`` (``[N, o]``) the gradient
of loss ``t`` w.r.t. the layer output. Their Gramian and the weighted update need no ``J_t``:

.. math::

    G_{st} = ⟨Gₒ_sᵀ A, Gₒ_tᵀ A⟩ = ⟨Gₒ_s, (A Aᵀ) Gₒ_t⟩, \qquad
    \sum_t w_t J_t = \Big(\sum_t w_t Gₒ_t\Big)ᵀ A,

``O(N² d + m N² o)`` instead of the ``O(m N d o)`` of forming the rows (each layer takes the
cheaper of the two). The bias adds ``G_{st} += ⟨1ᵀ Gₒ_s, 1ᵀ Gₒ_t⟩``. The ``m`` output gradients of
every recorded layer come from one batched backward pass (data gradients only, no weight
gradient); parameters without this closed form are differentiated in the same pass. The update
is written per layer from the weights: no second backward.

A forward hook records the input and output of each ``nn.Linear`` call that owns an aggregated
parameter. The closed form is used only when it is exact: one recorded call in the loss graph, and
its weight (and bias) used nowhere else in that graph (checked on the autograd graph, so weight
tying or a functional use falls back to the exact batched VJPs), and neither its input nor its
output modified in place since (``nn.ReLU(inplace=True)`` after the layer also falls back).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from jdoptim.engine._graph import leaf_uses
from jdoptim.engine._per_sample import NonFiniteGramianError
from jdoptim.engine._recording import RecordingEngine
from jdoptim.engine._reduce import gramian as jacobian_gramian
from jdoptim.engine._reduce import total


class _LinearCall:
    """One recorded ``nn.Linear`` call and, once known, the gradients of its output."""

    __slots__ = ("grads", "input", "module", "output", "versions")

    def __init__(self, module: nn.Linear, input: Tensor, output: Tensor) -> None:
        self.module, self.input, self.output = module, input, output
        self.versions = (input._version, output._version)
        self.grads: Tensor | None = None

    def intact(self) -> bool:
        """Whether neither the input nor the output was modified in place since the call."""
        return self.versions == (self.input._version, self.output._version)

    def gramian(self) -> Tensor:
        """``[m, m]`` Gramian block of the weight (and bias) rows of this call."""
        a, g = self._lifted()
        a = a.reshape(-1, a.shape[-1])  # [N, d]
        g = g.reshape(g.shape[0], -1, g.shape[-1])  # [m, N, o]
        m, n, o = g.shape
        d = a.shape[1]
        if n * n * (d + m * o) < m * n * d * o:  # kernel form is cheaper
            block = g.reshape(m, -1) @ torch.matmul(a @ a.T, g).reshape(m, -1).T
        else:
            rows = torch.matmul(g.transpose(1, 2), a).reshape(m, -1)
            block = rows @ rows.T
        if self.module.bias is not None:
            summed = g.sum(dim=1)
            block = block + summed @ summed.T
        return block

    def _lifted(self) -> tuple[Tensor, Tensor]:
        """The input and output gradients in the weight's dtype (autocast records fp16/bf16)."""
        dtype = self.module.weight.dtype
        return self.input.to(dtype), self.grads.to(dtype)

    def updates(self, weights: Tensor) -> dict[int, Tensor]:
        """The weighted updates ``Σ_t w_t J_t`` of the weight and the bias, by ``id``."""
        a, g = self._lifted()
        combined = torch.tensordot(weights.to(g.dtype), g, dims=1)  # [..., o]
        combined = combined.reshape(-1, combined.shape[-1])
        a = a.reshape(-1, a.shape[-1])
        module = self.module
        result = {id(module.weight): (combined.T @ a).to(module.weight.dtype)}
        if module.bias is not None:
            result[id(module.bias)] = combined.sum(dim=0).to(module.bias.dtype)
        return result


class LayerGramianEngine(RecordingEngine):
    """Record ``nn.Linear`` calls owning aggregated parameters; Gramian steps for any losses.

    Parameters
    ----------
    params:
        A callable returning the parameters whose Jacobian rows are aggregated (the shared
        parameters of a multi-task model).
    parallel_chunk_size:
        Chunk size of the batched backward pass (``None``: all ``m`` rows at once).

    Notes
    -----
    Like the per-sample engine, a forward pass with grad enabled keeps a reference to the input and
    output of each recorded layer (tensors that autograd saves anyway) until the next :meth:`clear`
    (``zero_grad``, or the end of a step); a forward pass under ``torch.no_grad()`` records
    nothing. The hook costs a dictionary lookup per module call.
    """

    def __init__(
        self, params: Callable[[], list[Tensor]], parallel_chunk_size: int | None = None
    ) -> None:
        self._calls: list[_LinearCall] = []
        super().__init__(params, parallel_chunk_size)

    def clear(self) -> None:
        """Forget the recorded calls; the parameter list is re-read at the next record."""
        self._calls.clear()
        super().clear()

    def _claims(self, module: nn.Module, param_ids: frozenset[int]) -> bool:
        return type(module) is nn.Linear and id(module.weight) in param_ids

    def _record_call(self, module: nn.Module, input: Any, output: Tensor) -> None:
        if output.grad_fn is not None and self._owns(module):
            self._calls.append(_LinearCall(module, input.detach(), output))  # type: ignore[arg-type]

    def gramian_step(
        self,
        losses: Tensor,
        params: Sequence[Tensor],
        weights_from_gramian: Callable[[Tensor], Tensor],
        *,
        summed_only: frozenset[int] = frozenset(),
        unscale: float = 1.0,
    ) -> tuple[list[Tensor | None], Tensor]:
        """Return the updates of ``params`` and the Gramian, from one batched backward pass.

        Same contract as :meth:`jdoptim.engine.PerSampleEngine.gramian_step`: the Gramian covers
        the parameters whose ``id`` is not in ``summed_only``, their update is ``Σ_i w_i
        ∂losses_i/∂p`` with ``w = weights_from_gramian(G)``; the others get the gradient of
        ``losses.sum()``; ``None`` marks a parameter that no loss reaches; gradients are divided by
        ``unscale`` first.
        """
        try:
            calls = self._exact_calls(losses, params, summed_only)
            covered = {id(p) for c in calls for p in c.module.parameters(recurse=False)}
            others = [p for p in params if id(p) not in covered]
            grads = self._fallback.jacobians(losses, [c.output for c in calls] + others)
        finally:
            self.clear()
        for call, g in zip(calls, grads, strict=False):
            call.grads = g if unscale == 1.0 else g / unscale
        rows = {
            id(p): (j if unscale == 1.0 else j / unscale)
            for p, j in zip(others, grads[len(calls) :], strict=True)
            if j is not None
        }
        if not calls and not rows:
            raise ValueError("the losses do not depend on any parameter of the wrapped optimizer")
        aggregated = [j for i, j in rows.items() if i not in summed_only]
        blocks = [c.gramian() for c in calls]
        if aggregated:
            blocks.append(jacobian_gramian(aggregated))
        if not blocks:  # only parameters in summed_only are reached
            raise ValueError("the losses do not depend on any of the shared_params")
        gram = total(blocks)
        if not bool(torch.isfinite(gram).all()):
            raise NonFiniteGramianError("the gradients hold NaN or inf")
        weights = weights_from_gramian(gram)
        updates: dict[int, Tensor] = {}
        for call in calls:
            updates.update(call.updates(weights))
        for i, j in rows.items():
            updates[i] = j.sum(dim=0) if i in summed_only else torch.tensordot(weights, j, dims=1)
        return [updates.get(id(p)) for p in params], gram

    def _exact_calls(
        self, losses: Tensor, params: Sequence[Tensor], summed_only: frozenset[int]
    ) -> list[_LinearCall]:
        """The recorded calls whose closed form is the whole Jacobian of their parameters."""
        uses, nodes = leaf_uses([losses])
        wanted = {id(p) for p in params} - summed_only
        per_module: dict[nn.Module, list[_LinearCall]] = {}
        for call in self._calls:
            if call.output.grad_fn in nodes and call.intact():
                per_module.setdefault(call.module, []).append(call)
        exact = []
        for module, calls in per_module.items():
            own = list(module.parameters(recurse=False))
            if len(calls) == 1 and all(id(p) in wanted and uses.get(id(p)) == 1 for p in own):
                exact.append(calls[0])
        return exact
