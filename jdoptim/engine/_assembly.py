"""Assembly of the per-sample Gramian step from the parts that backward passes collected.

A :class:`SamplePart` holds what one backward pass of per-sample losses leaves (the recorded layer
inputs and output gradients, the Jacobian rows of the parameters without a closed form, the summed
gradients of the parameters outside the Gramian). :func:`combine_parts` turns one or several
parts (micro-batches, ranks) into the Gramian (float64), the weights and every parameter's update.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from jdoptim.aggregation._bases import checked_finite
from jdoptim.engine._layer_rules import PerSample, covered, rule_for
from jdoptim.engine._reduce import total
from jdoptim.engine._scaled import ScaledRows, as_dtype, shared_coefficients
from jdoptim.linalg._finite import all_finite


class NonFiniteGramianError(ValueError):
    """The per-sample gradients hold NaN or inf (for instance a GradScaler overflow)."""


def checked_weights(
    gram: Tensor, weights_from_gramian: Callable[[Tensor], Tensor], what: str
) -> Tensor:
    """The float64 weights of a Gramian engine's ``gram``, checked for NaN and inf here only.

    A non-finite Gramian raises :class:`NonFiniteGramianError` (``what`` hold NaN or inf), which
    the optimizer reads as a GradScaler overflow; the aggregator is not called. A finite one is
    not read again by the aggregator's checks (:func:`jdoptim.aggregation._bases.checked_finite`).
    """
    if not all_finite([gram]):
        raise NonFiniteGramianError(f"{what} hold NaN or inf")
    with checked_finite(gram):
        return as_dtype(weights_from_gramian(gram), torch.float64)


class _ModulePart:
    """The recorded calls of one module in one part, and the parameters they explain."""

    __slots__ = ("module", "pairs", "rules")

    def __init__(
        self,
        module: nn.Module,
        pairs: list[tuple[Tensor, ...]],
        rules: dict[int, PerSample],
    ) -> None:
        self.module, self.pairs, self.rules = module, pairs, rules

    def key(self, params: Sequence[Tensor]) -> int:
        """A rank-independent name of the module: the index of its first parameter in ``params``."""
        own = {id(p) for p in self.module.parameters(recurse=False)}
        return min(k for k, p in enumerate(params) if id(p) in own)

    @property
    def replayable(self) -> bool:
        """Whether other parts can replay the calls from their inputs and output gradients alone
        (not calls with a context, such as attention's masks: those send per-sample rows)."""
        return all(len(pair) == 2 for pair in self.pairs)

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
        The gradients of the summed losses of the reached parameters outside the Gramian
        (``summed_only``), by parameter index.
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
        summed: dict[int, Tensor],
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
            3 if k in self.summed else 1 if k in closed else 2 if k in self.rows else 0
            for k in range(len(self.summed_only))
        ]

    def signature(self, params: Sequence[Tensor]) -> tuple[Any, ...]:
        """What other ranks must know of this part to exchange pieces with it (no tensors)."""
        modules = {
            part.key(params): (part.structure(), tuple(sorted(part.rules)))
            for part in self.modules
            if part.replayable
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
        closed = {k: rule for mp in part.modules for k, rule in mp.rules.items()}
        for k in self.rows:
            if k in part.rows:
                tensors.append(part.rows[k])
            elif k in closed:
                tensors.append(_materialise(closed[k], part.m, params[k]))
            else:
                tensors.append(params[k].new_zeros((part.m, *params[k].shape)))
        for k in self.summed:
            g = part.summed.get(k)
            tensors.append(torch.zeros_like(params[k]) if g is None else g)
        return tensors


def _materialise(rule: PerSample, m: int, param: Tensor) -> Tensor:
    """The ``m`` per-sample gradients of a closed form, one weighted update per sample."""
    eye = torch.eye(m, dtype=torch.float64, device=param.device)
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
    rules: list[tuple[int, PerSample]] = []
    with torch.no_grad():
        for key, closed in plan.modules.items():
            calls = inputs[key]
            pairs = [
                (torch.cat([c[i][0] for c in calls]), torch.cat([c[i][1] for c in calls]))
                for i in range(len(calls[0]))
            ]
            module = modules[key]
            per_param = rule_for(module)(module, pairs)
            names = {id(p): name for name, p in covered(module)}
            rules += [(k, per_param[names[id(params[k])]]) for k in closed]
    stacked = {k: torch.cat(rs) for k, rs in rows.items()}
    return _finish(params, weights_from_gramian, rules, stacked, sums, updates)


def _single(
    part: SamplePart,
    params: Sequence[Tensor],
    weights_from_gramian: Callable[[Tensor], Tensor],
) -> tuple[list[Tensor | None], Tensor]:
    """The Gramian step of one part: its own closed forms, nothing recomputed."""
    rules = [(k, rule) for mp in part.modules for k, rule in mp.rules.items()]
    updates: list[Tensor | None] = [part.summed.get(k) for k in range(len(params))]
    return _finish(params, weights_from_gramian, rules, part.rows, {}, updates)


def _finish(
    params: Sequence[Tensor],
    weights_from_gramian: Callable[[Tensor], Tensor],
    rules: list[tuple[int, PerSample]],
    rows: dict[int, Tensor],
    sums: dict[int, list[Tensor]],
    updates: list[Tensor | None],
) -> tuple[list[Tensor | None], Tensor]:
    """Sum the Gramian blocks in float64, weight the losses and form every parameter's update
    (in its own dtype)."""
    with torch.no_grad():
        scaled = {k: ScaledRows(j) for k, j in rows.items()}
        blocks = [rule.gramian() for _, rule in rules] + [r.gramian() for r in scaled.values()]
        if not blocks:
            raise ValueError("the losses do not depend on any parameter of the Jacobian")
        gram = total(blocks)
        weights = checked_weights(gram, weights_from_gramian, "the per-sample gradients")
    with torch.no_grad(), shared_coefficients():
        for k, rule in rules:
            updates[k] = as_dtype(rule.update(weights), params[k].dtype)
        for k, r in scaled.items():
            updates[k] = as_dtype(r.combine(weights).view_as(params[k]), params[k].dtype)
        for k, parts in sums.items():
            updates[k] = total(parts)
    return updates, gram
