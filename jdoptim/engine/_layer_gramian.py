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

Forward hooks on the ``nn.Linear`` modules owning aggregated parameters
(:mod:`jdoptim.engine._recording`) record each call's input in the graph of its output. The
closed form is used only when it is exact: one recorded call in the loss graph, its weight (and
bias) used nowhere else in that graph (checked on the autograd graph, so weight tying or a
functional use falls back to the exact batched VJPs), and its input not modified in place since.
The blocks are formed from rows scaled by powers of two and summed in float64
(:mod:`jdoptim.engine._scaled`); under autocast the fp16/bf16 pieces are lifted to the weight's
dtype (float32 at least), and each update is written in its parameter's dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from jdoptim.engine._assembly import checked_weights
from jdoptim.engine._graph import GraphWalk
from jdoptim.engine._jacobian import JacobianEngine
from jdoptim.engine._recording import HookedEngine, Record, Recorder
from jdoptim.engine._reduce import total
from jdoptim.engine._scaled import (
    ScaledRows,
    add,
    coefficients,
    compute_dtype,
    exponents,
    rescale,
    scale_rows,
    shared_coefficients,
    unscale_gramian,
)


class _LinearCall:
    """One recorded ``nn.Linear`` call and its ``m`` output gradients, scaled by powers of two:
    the input by one ``2^{-e_a}``, the gradients of loss ``t`` by ``2^{-e_t}``."""

    __slots__ = ("exps_a", "exps_g", "grads", "input", "module")

    def __init__(self, module: nn.Module, input: Tensor, grads: Tensor) -> None:
        self.module = module
        dtype = compute_dtype(self.module.weight.dtype)
        a = input.reshape(1, -1, input.shape[-1]).to(dtype)  # [1, N, d]
        g = grads.reshape(grads.shape[0], -1, grads.shape[-1]).to(dtype)  # [m, N, o]
        self.exps_a, self.exps_g = exponents([a]), exponents([g])
        self.input = scale_rows(a, self.exps_a)[0]
        self.grads = scale_rows(g, self.exps_g)

    def gramian(self) -> Tensor:
        """``[m, m]`` float64 Gramian block of the weight (and bias) rows of this call."""
        a, g = self.input, self.grads
        m, n, o = g.shape
        d = a.shape[1]
        if n * n * (d + m * o) < m * n * d * o:  # kernel form is cheaper
            block = g.reshape(m, -1) @ torch.matmul(a @ a.T, g).reshape(m, -1).T
        else:
            rows = torch.matmul(g.transpose(1, 2), a).reshape(m, -1)
            block = rows @ rows.T
        block = unscale_gramian(block, add(self.exps_g, self.exps_a))
        if self.module.bias is not None:
            block = block + ScaledRows(g.sum(dim=1), prescaled=True, exps=self.exps_g).gramian()
        return block

    def updates(self, weights: Tensor) -> dict[int, Tensor]:
        """The weighted updates ``Σ_t w_t J_t`` of the weight and the bias, by ``id``."""
        module = self.module
        coef, shift = coefficients(weights, add(self.exps_g, self.exps_a), self.grads.dtype)
        combined = torch.tensordot(coef, self.grads, dims=1)  # [N, o]
        weight = rescale(combined.T @ self.input, shift)
        result = {id(module.weight): weight.to(module.weight.dtype)}
        if module.bias is not None:
            coef, shift = coefficients(weights, self.exps_g, self.grads.dtype)
            bias = rescale(torch.tensordot(coef, self.grads, dims=1).sum(dim=0), shift)
            result[id(module.bias)] = bias.to(module.bias.dtype)
        return result


def _plain_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


class LayerGramianEngine(HookedEngine):
    """Record ``nn.Linear`` calls owning aggregated parameters; Gramian steps for any losses.

    Parameters
    ----------
    params:
        A callable returning the parameters whose Jacobian rows are aggregated (the shared
        parameters of a multi-task model).
    parallel_chunk_size:
        Chunk size of the batched backward pass (``None``: all ``m`` rows at once).
    modules:
        Modules whose trees hold the ``nn.Linear`` layers owning ``params`` (walked, cheap);
        ``None``: found by a scan of the heap.

    Notes
    -----
    Like the per-sample engine, a forward pass with grad enabled leaves a small record (the
    layer's detached input, which autograd saves anyway) in the graph of each recorded layer's
    output; it goes away with that graph. A forward pass under ``torch.no_grad()`` or inside
    ``torch.compile`` records nothing.
    """

    def __init__(
        self,
        params: Callable[[], list[Tensor]],
        parallel_chunk_size: int | None = None,
        modules: Sequence[nn.Module] | None = None,
    ) -> None:
        self._fallback = JacobianEngine(parallel_chunk_size)
        self._recorder = Recorder(params, _plain_linear, roots=modules)

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

        Same contract as :meth:`jdoptim.engine.PerSampleEngine.gramian_step`: the Gramian
        (float64) covers the parameters whose ``id`` is not in ``summed_only``, their update is
        ``Σ_i w_i ∂losses_i/∂p`` with ``w = weights_from_gramian(G)``; the others get the
        gradient of ``losses.sum()``; ``None`` marks a parameter that no loss reaches; gradients
        are divided by ``unscale`` first.
        """
        pieces = self.pieces(losses, params, summed_only=summed_only, unscale=unscale)
        return layer_step(pieces, params, weights_from_gramian, summed_only)

    def pieces(
        self,
        losses: Tensor,
        params: Sequence[Tensor],
        *,
        summed_only: frozenset[int] = frozenset(),
        unscale: float = 1.0,
    ) -> LayerPieces:
        """The batched backward pass of :meth:`gramian_step`, before any Gramian is formed."""
        records = self._exact_calls(losses, params, summed_only)
        covered = {id(p) for _, r in records for p in r.module.parameters(recurse=False)}
        others = [k for k, p in enumerate(params) if id(p) not in covered]
        edges = [GradientEdge(node, r.output_nr) for node, r in records]
        grads = self._fallback.vjps(
            [losses],
            [torch.eye(losses.shape[0], dtype=losses.dtype, device=losses.device)],
            edges + [params[k] for k in others],
        )
        calls = [
            (r.module, r.input, g if unscale == 1.0 else g / unscale)
            for (_, r), g in zip(records, grads, strict=False)
            if g is not None
        ]
        rows = {
            k: (j if unscale == 1.0 else j / unscale)
            for k, j in zip(others, grads[len(records) :], strict=True)
            if j is not None
        }
        if not calls and not rows:
            raise ValueError("the losses do not depend on any parameter of the wrapped optimizer")
        return LayerPieces(losses.shape[0], calls, rows)

    def _exact_calls(
        self, losses: Tensor, params: Sequence[Tensor], summed_only: frozenset[int]
    ) -> list[tuple[object, Record]]:
        """The recorded calls whose closed form is the whole Jacobian of their parameters."""
        walk = GraphWalk([losses], self._recorder.key)
        wanted = {id(p) for p in params} - summed_only
        per_module: dict[nn.Module, list[tuple[object, Record]]] = {}
        for node, record in walk.records:
            if record.intact():
                per_module.setdefault(record.module, []).append((node, record))
        exact = []
        for module, calls in per_module.items():
            own = list(module.parameters(recurse=False))
            if len(calls) == 1 and all(id(p) in wanted and walk.uses.get(id(p)) == 1 for p in own):
                exact.append(calls[0])
        return exact


@dataclass
class LayerPieces:
    """What the layer-Gramian engine's backward pass leaves for the Gramian step.

    Attributes
    ----------
    m:
        The number of losses.
    calls:
        Per exact ``nn.Linear`` call: the module, its input ``[..., d]`` and the ``m`` output
        gradients ``[m, ..., o]`` (already divided by the scale).
    rows:
        Jacobian rows ``[m, *p.shape]`` of the other reached parameters, by parameter index.
    """

    m: int
    calls: list[tuple[nn.Module, Tensor, Tensor]]
    rows: dict[int, Tensor]


def layer_step(
    pieces: LayerPieces,
    params: Sequence[Tensor],
    weights_from_gramian: Callable[[Tensor], Tensor],
    summed_only: frozenset[int] = frozenset(),
) -> tuple[list[Tensor | None], Tensor]:
    """The Gramian, weights and updates of :meth:`LayerGramianEngine.gramian_step` from its
    ``pieces``."""
    with torch.no_grad():
        calls = [_LinearCall(module, a, g) for module, a, g in pieces.calls]
        rows = {id(params[k]): j for k, j in pieces.rows.items()}
        scaled = {i: ScaledRows(j) for i, j in rows.items() if i not in summed_only}
        blocks = [c.gramian() for c in calls] + [r.gramian() for r in scaled.values()]
        if not blocks:  # only parameters in summed_only are reached
            raise ValueError("the losses do not depend on any of the shared_params")
        gram = total(blocks)
        weights = checked_weights(gram, weights_from_gramian, "the gradients")
        updates: dict[int, Tensor] = {}
    with torch.no_grad(), shared_coefficients():
        for call in calls:
            updates.update(call.updates(weights))
        for i, j in rows.items():
            updates[i] = j.sum(dim=0) if i in summed_only else scaled[i].combine(weights)
    return [
        None if updates.get(id(p)) is None else updates[id(p)].view_as(p).to(p.dtype)
        for p in params
    ], gram
