"""The per-sample Gramian engine: one forward, one backward, per-layer closed forms.

When the optimizer is built with ``batch_dim=0``, loss ``i`` depends only on sample ``i``. Forward
hooks on the modules that own the optimizer's parameters (:mod:`jdoptim.engine._recording`)
record, for those with a closed form (:mod:`jdoptim.engine._layer_rules`), the layer input in the
graph of the call's output. One backward pass of ``losses.sum()`` asked for the gradients of the
recorded outputs (not of the weights) then gives the per-layer Gramian blocks and, once the
aggregator has turned the Gramian into weights, the weighted updates, with no second backward.

A closed form is used for a parameter only when it is the whole story, judged on the graph: the
parameter's uses in the loss graph (:class:`jdoptim.engine._graph.GraphWalk`) are exactly the
recorded calls of one module, with the batch size of the losses and inputs not modified in place
since. Other parameters (weight tying, functional uses, modules without a rule) are differentiated
exactly by batched VJPs. A randomly weighted second backward (:mod:`jdoptim.engine._mixing`) checks
on the first step, then every ``check_every`` steps, that the losses do not mix samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from jdoptim.engine import _attention as attention
from jdoptim.engine._assembly import SamplePart, _ModulePart, combine_parts
from jdoptim.engine._graph import GraphWalk
from jdoptim.engine._jacobian import JacobianEngine
from jdoptim.engine._layer_rules import covered, exponent_groups, rule_for
from jdoptim.engine._mixing import check_per_sample, mixes_samples, mixing_error
from jdoptim.engine._recording import HookedEngine, Record, Recorder
from jdoptim.engine._scaled import as_dtype, compute_dtype, exponents_each


def _recorded(module: nn.Module) -> bool:
    return rule_for(module) is not None or mixes_samples(module)


class PerSampleEngine(HookedEngine):
    """Record layer inputs of the modules that own ``params``; Gramian steps of per-sample losses.

    Parameters
    ----------
    params:
        A callable returning the current parameters (the optimizer's; call :meth:`refresh` after
        it grows).
    parallel_chunk_size:
        Chunk size of the batched VJPs used for parameters without a closed form.
    check_every:
        The sample-mixing check runs on the first backward pass, then every ``check_every``
        passes (each micro-batch is one); ``None``: never.
    modules:
        Modules whose trees hold the modules owning ``params`` (walked, cheap); ``None``: found
        by a scan of the heap (:func:`~jdoptim.engine._recording.owning_modules`).

    Notes
    -----
    A forward pass run with grad enabled leaves a small record (the layer's detached input, which
    autograd saves anyway) in the graph of each recorded layer's output; it goes away with that
    graph. A forward pass under ``torch.no_grad()`` or inside ``torch.compile`` records nothing.
    """

    def __init__(
        self,
        params: Callable[[], list[Tensor]],
        parallel_chunk_size: int | None = None,
        check_every: int | None = 100,
        modules: Sequence[nn.Module] | None = None,
    ) -> None:
        self._fallback = JacobianEngine(parallel_chunk_size)
        self._recorder = Recorder(params, _recorded, attention.replay, modules)
        self.check_every = check_every
        self._steps = 0

    def __getstate__(self) -> dict[str, object]:
        return {**super().__getstate__(), "check_every": self.check_every}

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

        The Gramian ``G`` (float64) covers the parameters whose ``id`` is not in
        ``summed_only``; their update is ``Σ_i w_i ∂losses_i/∂p`` with
        ``w = weights_from_gramian(G)``. Parameters in ``summed_only`` get the gradient of
        ``losses.sum()``. ``None`` marks a parameter that no loss reaches. Gradients are divided
        by ``unscale`` (a GradScaler's scale) first.
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
        retain_graph: bool = False,
    ) -> SamplePart:
        """Run the backward pass of ``losses`` and keep what the Gramian step needs of it.

        The result holds the recorded layer inputs and output gradients, the Jacobian rows of the
        parameters without a closed form and the batch-summed gradients of ``summed_only``, all
        divided by ``unscale``; ``retain_graph`` keeps the graph of ``losses`` for a later
        backward pass (autogram's weighted one). Parts of several micro-batches or ranks
        combine with :func:`~jdoptim.engine._assembly.combine_parts`. Raises (and changes
        nothing) when a recorded BatchNorm in training mode, or the sample-mixing check, shows
        that the losses mix samples.
        """
        m = losses.shape[0]
        walk = GraphWalk([losses], self._recorder.key)
        for _, record in walk.records:
            if mixes_samples(record.module):
                raise mixing_error(record.module)
        index = {id(p): k for k, p in enumerate(params)}
        closed = _closed_calls(walk, index, m, summed_only)
        explained = {k for _, ks, _ in closed.values() for k in ks}
        reached = [k for k, p in enumerate(params) if id(p) in walk.uses]
        if not reached:
            raise ValueError("the losses do not depend on any parameter of the wrapped optimizer")
        sums = [k for k in reached if id(params[k]) in summed_only]
        fallback = [k for k in reached if k not in explained and id(params[k]) not in summed_only]
        edges = [
            (module, node, record)
            for module, (calls, _, _) in closed.items()
            for node, record in calls
        ]
        inputs = [GradientEdge(node, r.output_nr) for _, node, r in edges] + [
            params[k] for k in sums
        ]
        check = bool(self.check_every) and self._steps % self.check_every == 0 and bool(edges)
        keep = retain_graph or bool(fallback) or check
        grads = (
            list(torch.autograd.grad(losses.sum(), inputs, retain_graph=keep, allow_unused=True))
            if inputs
            else []
        )
        out_grads = grads[: len(edges)]
        if check:
            check_per_sample(
                losses,
                inputs[: len(edges)],
                out_grads,
                [e[0] for e in edges],
                keep=retain_graph or bool(fallback),
            )
        self._steps += 1
        jacobians = (
            self._fallback.jacobians(
                losses, [params[k] for k in fallback], retain_graph=retain_graph
            )
            if fallback
            else []
        )
        summed = {
            k: g if unscale == 1.0 else g / unscale
            for k, g in zip(sums, grads[len(edges) :], strict=True)
            if g is not None
        }
        rows = {
            k: (j if unscale == 1.0 else j / unscale)
            for k, j in zip(fallback, jacobians, strict=True)
            if j is not None
        }
        modules = _module_parts(closed, edges, out_grads, params, unscale)
        return SamplePart(m, summed, modules, rows, [id(p) in summed_only for p in params])


Closed = dict[nn.Module, tuple[list[tuple[object, Record]], list[int], list[tuple[str, Tensor]]]]


def _closed_calls(
    walk: GraphWalk, index: dict[int, int], m: int, summed_only: frozenset[int]
) -> Closed:
    """Per module: its recorded calls in the loss graph, the indices of the parameters they
    explain and the parameters its rule covers (:func:`covered`, by name).

    A parameter is explained when one module's calls are all its uses in the graph; the calls
    must be per-sample (batch size ``m``) with their inputs intact.
    """
    calls: dict[nn.Module, list[tuple[object, Record]]] = {}
    for node, record in walk.records:
        found = calls.get(record.module)
        if found is None and rule_for(record.module) is not None:
            found = calls[record.module] = []
        if found is not None:
            found.append((node, record))
    named = {module: covered(module) for module in calls}
    owners: dict[int, int] = {}
    for pairs in named.values():
        for _, p in pairs:
            owners[id(p)] = owners.get(id(p), 0) + 1
    result = {}
    for module, found in calls.items():
        if not all(r.usable and r.intact() and r.input.shape[:1] == (m,) for _, r in found):
            continue
        ks = [
            index[id(p)]
            for _, p in named[module]
            if id(p) in index
            and id(p) not in summed_only
            and owners[id(p)] == 1
            and walk.uses.get(id(p)) == len(found)
        ]
        if ks:
            result[module] = (found, ks, named[module])
    return result


def _module_parts(
    closed: Closed,
    edges: list[tuple[nn.Module, object, Record]],
    out_grads: list[Tensor | None],
    params: Sequence[Tensor],
    unscale: float,
) -> list[_ModulePart]:
    """The closed forms of the explained parameters, from the recorded inputs and gradients."""
    pairs: dict[nn.Module, list[tuple[Tensor, ...]]] = {}  # (x, g, *the call's context)
    for (module, _, record), g in zip(edges, out_grads, strict=True):
        dtype = compute_dtype(closed[module][2][0][1].dtype)
        if g is None:  # an output that the losses reach with a zero gradient
            g = torch.zeros(record.shape, device=record.input.device)
        x = record.input
        x = as_dtype(x, dtype) if x.is_floating_point() else x
        g = as_dtype(g, dtype) if unscale == 1.0 else as_dtype(g, dtype) / unscale
        pairs.setdefault(module, []).append((x, g, *record.context))
    parts = []
    with torch.no_grad():
        # One host read decides the scaling of every layer that takes its exponents.
        groups = {module: exponent_groups(module, pairs[module]) for module in closed}
        exps = iter(exponents_each([g for gs in groups.values() for g in gs]))
        for module, (_, ks, named) in closed.items():
            known = [next(exps) for _ in groups[module]]
            calls = pairs[module]
            per_param = (
                rule_for(module)(module, calls, known) if known else rule_for(module)(module, calls)
            )
            names = {id(p): name for name, p in named}
            rules = {k: per_param[names[id(params[k])]] for k in ks}
            parts.append(_ModulePart(module, pairs[module], rules))
    return parts
