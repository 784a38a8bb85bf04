"""The per-sample Gramian engine: one forward, one backward, per-layer closed forms.

When the optimizer is built with ``batch_dim=0``, loss ``i`` depends only on sample ``i``. A global
module forward hook (cheap: a dictionary lookup per module call) records, for the modules that own
parameters of the optimizer and have a closed form (see :mod:`jdoptim.engine._layer_rules`), the
layer input and a hook on the layer output that captures its gradient. One backward pass of
``losses.sum()`` then gives every recorded layer's output gradients, hence the per-layer Gramian
blocks and, once the aggregator has turned the Gramian into weights, the weighted update, with no
second backward. Parameters without a closed form (other modules, weights used outside their
module, calls on another batch size) are differentiated exactly by batched VJPs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from jdoptim.engine._layer_rules import PerSample, mixes_samples, mixing_error, rule_for
from jdoptim.engine._recording import RecordingEngine
from jdoptim.engine._reduce import gramian as jacobian_gramian


class NonFiniteGramianError(ValueError):
    """The per-sample gradients hold NaN or inf (for instance a GradScaler overflow)."""


class _Call:
    """One recorded module call: its input, and the gradient of its output once known."""

    __slots__ = ("grad", "input")

    def __init__(self, input: Tensor) -> None:
        self.input = input
        self.grad: Tensor | None = None

    def capture(self, grad: Tensor) -> None:
        self.grad = grad.detach()


class PerSampleEngine(RecordingEngine):
    """Record layer inputs and output gradients of the modules that own ``params``.

    Parameters
    ----------
    params:
        A callable returning the current parameters (the optimizer's, which may grow with
        ``add_param_group``).
    parallel_chunk_size:
        Chunk size of the batched VJPs used for parameters without a closed form.

    Notes
    -----
    Every forward pass run with grad enabled keeps a reference to the inputs of the recorded
    layers (tensors autograd saves anyway) until the next :meth:`clear` (``zero_grad``, or the end
    of a step). A forward pass under ``torch.no_grad()`` records nothing.
    """

    def __init__(
        self, params: Callable[[], list[Tensor]], parallel_chunk_size: int | None = None
    ) -> None:
        self._calls: dict[nn.Module, list[_Call]] = {}
        self._mixing: list[nn.Module] = []  # sample-mixing layers the gradient went through
        self._hooks: list[RemovableHandle] = []  # gradient hooks on recorded outputs
        super().__init__(params, parallel_chunk_size)

    def clear(self) -> None:
        """Forget the recorded calls; the parameter list (it may have grown) is re-read lazily."""
        self._release_hooks()
        self._calls.clear()
        self._mixing.clear()
        super().clear()

    def _release_hooks(self) -> None:
        """Remove the output-gradient hooks, so that no later (batched) pass runs them."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def _claims(self, module: nn.Module, param_ids: frozenset[int]) -> bool:
        return rule_for(module) is not None and any(
            id(p) in param_ids for p in module.parameters(recurse=False)
        )

    def _record_call(self, module: nn.Module, input: Any, output: Tensor) -> None:
        if mixes_samples(module):
            mixing = self._mixing
            self._hooks.append(output.register_hook(lambda _: mixing.append(module)))
            return
        if not self._owns(module):
            return
        call = _Call(input.detach())
        self._hooks.append(output.register_hook(call.capture))
        self._calls.setdefault(module, []).append(call)

    def gramian_step(
        self,
        losses: Tensor,
        params: Sequence[Tensor],
        weights_from_gramian: Callable[[Tensor], Tensor],
        *,
        summed_only: frozenset[int] = frozenset(),
        unscale: float = 1.0,
    ) -> tuple[list[Tensor | None], Tensor]:
        """Return the updates of ``params`` and the Gramian, from one backward pass of ``losses``.

        The Gramian ``G`` covers the parameters whose ``id`` is not in ``summed_only``; their
        update is ``Σ_i w_i ∂losses_i/∂p`` with ``w = weights_from_gramian(G)``. Parameters in
        ``summed_only`` get the gradient of ``losses.sum()``. ``None`` marks a parameter that no
        loss reaches. Gradients are divided by ``unscale`` (a GradScaler's scale) first.
        """
        m = losses.shape[0]
        try:
            summed = list(
                torch.autograd.grad(losses.sum(), params, retain_graph=True, allow_unused=True)
            )
            if unscale != 1.0:
                summed = [None if g is None else g / unscale for g in summed]
            self._release_hooks()  # the output gradients are captured
            if self._mixing:
                raise mixing_error(self._mixing[0])
            rules = self._closed_forms(params, summed, m, unscale, summed_only)
            fallback = [
                k
                for k, g in enumerate(summed)
                if g is not None and id(params[k]) not in rules and id(params[k]) not in summed_only
            ]
            jacobians = (
                self._fallback.jacobians(losses, [params[k] for k in fallback]) if fallback else []
            )
        finally:
            self.clear()
        if all(g is None for g in summed):
            raise ValueError("the losses do not depend on any parameter of the wrapped optimizer")
        if unscale != 1.0:
            jacobians = [None if j is None else j / unscale for j in jacobians]
        blocks = [block for _, block in rules.values()]
        reached = [j for j in jacobians if j is not None]
        if reached:
            blocks.append(jacobian_gramian(reached))
        if not blocks:
            raise ValueError("the losses do not depend on any parameter of the Jacobian")
        gram = blocks[0]
        for block in blocks[1:]:
            gram = gram + block
        if not bool(torch.isfinite(gram).all()):
            raise NonFiniteGramianError("the per-sample gradients hold NaN or inf")
        weights = weights_from_gramian(gram)
        updates: list[Tensor | None] = [
            g if id(p) in summed_only else None for p, g in zip(params, summed, strict=True)
        ]
        for k, p in enumerate(params):
            if id(p) in rules:
                updates[k] = rules[id(p)][0].update(weights).to(p.dtype)
        for k, j in zip(fallback, jacobians, strict=True):
            if j is not None:
                updates[k] = torch.tensordot(weights, j, dims=1)
        return updates, gram

    def _closed_forms(
        self,
        params: Sequence[Tensor],
        summed: list[Tensor | None],
        m: int,
        unscale: float,
        summed_only: frozenset[int],
    ) -> dict[int, tuple[PerSample, Tensor]]:
        """Closed forms (and Gramian blocks) of the parameters that recorded calls explain."""
        index = {id(p): k for k, p in enumerate(params)}
        rules: dict[int, tuple[PerSample, Tensor]] = {}
        for module, calls in self._calls.items():
            calls = [c for c in calls if c.grad is not None]  # the calls in this loss's graph
            if not calls or any(
                c.input.shape[:1] != (m,) or c.grad.shape[:1] != (m,) for c in calls
            ):
                continue
            with torch.no_grad():
                pairs = [(c.input, c.grad if unscale == 1.0 else c.grad / unscale) for c in calls]
                per_param = rule_for(module)(module, pairs)
                for name, rule in per_param.items():
                    p = getattr(module, name)
                    k = index.get(id(p))
                    if k is None or summed[k] is None or id(p) in summed_only:
                        continue
                    block = rule.gramian()
                    if _explains(rule, summed[k], block, m):
                        rules[id(p)] = (rule, block)
        return rules


def _explains(rule: PerSample, autograd_sum: Tensor, block: Tensor, m: int) -> bool:
    """Whether the closed form accounts for the whole gradient, up to rounding.

    A parameter also used outside its module (weight tying, a functional call) has gradient
    contributions that the module's records miss; its sum over the batch then differs from
    autograd's by more than the rounding error of summing ``m`` per-sample gradients, which is at
    most ``m · eps · Σ_i ‖g_i‖ <= m · eps · sqrt(m · trace(G))``.
    """
    eps = torch.finfo(block.dtype).eps
    mismatch, rounding = rule.mismatch(autograd_sum)
    bound = 4 * m * eps * float(torch.sqrt(m * block.trace().clamp_min(0))) + rounding
    return mismatch <= bound
