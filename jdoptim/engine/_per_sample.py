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
from jdoptim.engine._reduce import total


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
        part = self.collect(losses, params, summed_only=summed_only, unscale=unscale)
        return combine_parts([part], params, weights_from_gramian, summed_only)

    def collect(
        self,
        losses: Tensor,
        params: Sequence[Tensor],
        *,
        summed_only: frozenset[int] = frozenset(),
        unscale: float = 1.0,
    ) -> SamplePart:
        """Run the backward pass of ``losses`` and keep what the Gramian step needs of it.

        The result holds the recorded layer inputs and output gradients, the Jacobian rows of the
        parameters without a closed form and the batch-summed gradients, all divided by
        ``unscale``. Parts of several micro-batches or ranks combine with :func:`combine_parts`
        into the Gramian step of their concatenated losses.
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
            modules = self._closed_forms(params, summed, m, unscale, summed_only)
            explained = {k for part in modules for k in part.rules}
            fallback = [
                k
                for k, g in enumerate(summed)
                if g is not None and k not in explained and id(params[k]) not in summed_only
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
        rows = {k: j for k, j in zip(fallback, jacobians, strict=True) if j is not None}
        return SamplePart(m, summed, modules, rows, [id(p) in summed_only for p in params])

    def _closed_forms(
        self,
        params: Sequence[Tensor],
        summed: list[Tensor | None],
        m: int,
        unscale: float,
        summed_only: frozenset[int],
    ) -> list[_ModulePart]:
        """Closed forms (and Gramian blocks) of the parameters that recorded calls explain."""
        index = {id(p): k for k, p in enumerate(params)}
        parts = []
        for module, calls in self._calls.items():
            calls = [c for c in calls if c.grad is not None]  # the calls in this loss's graph
            if not calls or any(
                c.input.shape[:1] != (m,) or c.grad.shape[:1] != (m,) for c in calls
            ):
                continue
            explained: dict[int, tuple[PerSample, Tensor]] = {}
            with torch.no_grad():
                # Under autocast, inputs and output gradients may be fp16/bf16: the closed forms
                # run in the parameters' dtype (no overflow in the Gramian, dtypes that match).
                dtype = next(module.parameters()).dtype
                pairs = [(_lift(c.input, dtype), _lift(c.grad, dtype)) for c in calls]
                if unscale != 1.0:
                    pairs = [(x, g / unscale) for x, g in pairs]
                per_param = rule_for(module)(module, pairs)
                for name, rule in per_param.items():
                    p = getattr(module, name)
                    k = index.get(id(p))
                    if k is None or summed[k] is None or id(p) in summed_only:
                        continue
                    block = rule.gramian()
                    if _explains(rule, summed[k], block, m):
                        explained[k] = (rule, block)
            if explained:
                parts.append(_ModulePart(module, pairs, explained))
        return parts


def _lift(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype`` if it is a floating-point tensor of another dtype (indices stay)."""
    return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t


class _ModulePart:
    """The recorded calls of one module in one part, and the parameters they explain."""

    __slots__ = ("module", "pairs", "rules")

    def __init__(
        self,
        module: nn.Module,
        pairs: list[tuple[Tensor, Tensor]],
        rules: dict[int, tuple[PerSample, Tensor]],
    ) -> None:
        self.module, self.pairs, self.rules = module, pairs, rules

    def key(self, params: Sequence[Tensor]) -> int:
        """A rank-independent name of the module: the index of its first parameter in ``params``."""
        own = {id(p) for p in self.module.parameters(recurse=False)}
        return min(k for k, p in enumerate(params) if id(p) in own)

    def structure(self) -> tuple[Any, ...]:
        """The shapes (batch size excluded) and dtypes of the calls, which ranks must share."""
        return tuple(
            (tuple(x.shape[1:]), str(x.dtype), tuple(g.shape[1:]), str(g.dtype))
            for x, g in self.pairs
        )


class SamplePart:
    """What one backward pass of per-sample losses leaves for the Gramian step.

    Attributes
    ----------
    m:
        The number of losses (samples).
    summed:
        Per parameter, the gradient of the summed losses (``None``: not reached).
    modules:
        The recorded modules whose closed forms explain some parameters.
    rows:
        Jacobian rows ``[m, *p.shape]`` of the other reached parameters, by parameter index.
    summed_only:
        Per parameter, whether it only gets the summed gradient (not part of the Gramian).
    """

    def __init__(
        self,
        m: int,
        summed: list[Tensor | None],
        modules: list[_ModulePart],
        rows: dict[int, Tensor],
        summed_only: list[bool],
    ) -> None:
        self.m, self.summed, self.modules, self.rows = m, summed, modules, rows
        self.summed_only = summed_only

    def codes(self) -> list[int]:
        """Per parameter: 0 not reached, 1 closed form, 2 Jacobian rows, 3 summed gradient."""
        closed = {k for part in self.modules for k in part.rules}
        return [
            0 if g is None else 3 if only else 1 if k in closed else 2 if k in self.rows else 0
            for k, (g, only) in enumerate(zip(self.summed, self.summed_only, strict=True))
        ]

    def signature(self, params: Sequence[Tensor]) -> tuple[Any, ...]:
        """What other ranks must know of this part to exchange pieces with it (no tensors)."""
        modules = {
            part.key(params): (part.structure(), tuple(sorted(part.rules))) for part in self.modules
        }
        return (self.m, tuple(self.codes()), modules)


class _Plan:
    """Which parameters use a closed form over every part of every rank, and what is sent."""

    def __init__(self, signatures: list[list[tuple[Any, ...]]], n_params: int) -> None:
        everything = [sig for rank in signatures for sig in rank]
        codes = [sig[1] for sig in everything]
        first = everything[0][2]
        # A module keeps its closed form if every part recorded it with the same structure.
        self.modules: dict[int, tuple[int, ...]] = {}  # key -> closed parameters
        self.calls: dict[int, int] = {}  # key -> number of recorded calls
        for key, (structure, closed) in sorted(first.items()):
            if all(sig[2].get(key, (None,))[0] == structure for sig in everything):
                common = [k for k in closed if all(c[k] == 1 for c in codes)]
                if common:
                    self.modules[key] = tuple(common)
                    self.calls[key] = len(structure)
        self.closed = {k for ks in self.modules.values() for k in ks}
        self.rows = [
            k
            for k in range(n_params)
            if k not in self.closed and any(c[k] in (1, 2) for c in codes)
        ]
        self.summed = [k for k in range(n_params) if any(c[k] == 3 for c in codes)]

    def pieces(self, part: SamplePart, params: Sequence[Tensor]) -> list[Tensor]:
        """The tensors one part contributes, in the order every rank agrees on."""
        tensors: list[Tensor] = []
        by_key = {mp.key(params): mp for mp in part.modules}
        for key in self.modules:
            for x, g in by_key[key].pairs:
                tensors += [x, g]
        closed = {k: rule for mp in part.modules for k, (rule, _) in mp.rules.items()}
        for k in self.rows:
            if k in part.rows:
                tensors.append(part.rows[k])
            elif k in closed:
                tensors.append(_materialise(closed[k], part.m, params[k]))
            else:
                tensors.append(params[k].new_zeros((part.m, *params[k].shape)))
        for k in self.summed:
            g = part.summed[k]
            tensors.append(torch.zeros_like(params[k]) if g is None else g)
        return tensors


def _materialise(rule: PerSample, m: int, param: Tensor) -> Tensor:
    """The ``m`` per-sample gradients of a closed form, one weighted update per sample."""
    eye = torch.eye(m, dtype=param.dtype, device=param.device)
    return torch.stack([rule.update(e).to(param.dtype) for e in eye])


def combine_parts(
    parts: Sequence[SamplePart],
    params: Sequence[Tensor],
    weights_from_gramian: Callable[[Tensor], Tensor],
    summed_only: frozenset[int] = frozenset(),
    *,
    gather: Callable[[list[Tensor]], list[list[Tensor]]] | None = None,
    signatures: list[list[tuple[Any, ...]]] | None = None,
) -> tuple[list[Tensor | None], Tensor]:
    """The Gramian step of the concatenated losses of ``parts`` (micro-batches, then ranks).

    The losses are ordered rank by rank (``gather`` returns every rank's tensors in rank order,
    ``signatures`` every rank's part signatures), and within a rank part by part. Nothing of size
    ``m × n`` crosses ranks for the closed-form parameters: ``gather`` receives the recorded layer
    inputs and output gradients, the Jacobian rows of the parameters without a closed form and
    the summed gradients of ``summed_only``. Every rank then forms the same Gramian, weights and
    updates. Returns the updates (as :meth:`PerSampleEngine.gramian_step`) and the Gramian.
    """
    if gather is None and len(parts) == 1:
        return _single(parts[0], params, weights_from_gramian)
    local = [part.signature(params) for part in parts]
    signatures = [local] if signatures is None else signatures
    plan = _Plan(signatures, len(params))
    mine = [t for part in parts for t in plan.pieces(part, params)]
    per_rank = [mine] if gather is None else gather(mine)
    modules = {mp.key(params): mp.module for mp in parts[0].modules}
    inputs: dict[int, list[list[tuple[Tensor, Tensor]]]] = {key: [] for key in plan.modules}
    rows: dict[int, list[Tensor]] = {k: [] for k in plan.rows}
    sums: dict[int, list[Tensor]] = {k: [] for k in plan.summed}
    for rank_sigs, tensors in zip(signatures, per_rank, strict=True):
        stream = iter(tensors)
        for _ in rank_sigs:
            for key in plan.modules:
                inputs[key].append([(next(stream), next(stream)) for _ in range(plan.calls[key])])
            for k in plan.rows:
                rows[k].append(next(stream))
            for k in plan.summed:
                sums[k].append(next(stream))
    updates: list[Tensor | None] = [None] * len(params)
    blocks, rules = [], []
    with torch.no_grad():
        for key, closed in plan.modules.items():
            calls = inputs[key]
            pairs = [
                (torch.cat([c[i][0] for c in calls]), torch.cat([c[i][1] for c in calls]))
                for i in range(len(calls[0]))
            ]
            module = modules[key]
            per_param = rule_for(module)(module, pairs)
            names = {id(p): name for name, p in module.named_parameters(recurse=False)}
            for k in closed:
                rule = per_param[names[id(params[k])]]
                blocks.append(rule.gramian())
                rules.append((k, rule))
    stacked = {k: torch.cat(rs) for k, rs in rows.items()}
    return _finish(params, weights_from_gramian, blocks, rules, stacked, sums, updates)


def _single(
    part: SamplePart,
    params: Sequence[Tensor],
    weights_from_gramian: Callable[[Tensor], Tensor],
) -> tuple[list[Tensor | None], Tensor]:
    """The Gramian step of one part: its own closed forms and blocks, nothing recomputed."""
    blocks, rules = [], []
    for mp in part.modules:
        for k, (rule, block) in mp.rules.items():
            blocks.append(block)
            rules.append((k, rule))
    updates: list[Tensor | None] = [
        g if only else None for g, only in zip(part.summed, part.summed_only, strict=True)
    ]
    return _finish(params, weights_from_gramian, blocks, rules, part.rows, {}, updates)


def _finish(
    params: Sequence[Tensor],
    weights_from_gramian: Callable[[Tensor], Tensor],
    blocks: list[Tensor],
    rules: list[tuple[int, PerSample]],
    rows: dict[int, Tensor],
    sums: dict[int, list[Tensor]],
    updates: list[Tensor | None],
) -> tuple[list[Tensor | None], Tensor]:
    """Sum the Gramian blocks, weight the losses and form every parameter's update."""
    if rows:
        blocks = [*blocks, jacobian_gramian(list(rows.values()))]
    if not blocks:
        raise ValueError("the losses do not depend on any parameter of the Jacobian")
    gram = total(blocks)
    if not bool(torch.isfinite(gram).all()):
        raise NonFiniteGramianError("the per-sample gradients hold NaN or inf")
    weights = weights_from_gramian(gram)
    for k, rule in rules:
        updates[k] = rule.update(weights).to(params[k].dtype)
    for k, j in rows.items():
        updates[k] = torch.tensordot(weights, j, dims=1)
    for k, parts in sums.items():
        updates[k] = total(parts)
    return updates, gram


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
