"""Combine the layer-Gramian engine's pieces of micro-batches and ranks under ``"mean"``.

For task losses, the Jacobian of an ``nn.Linear`` weight is ``J_t = Gₒ_tᵀ A`` (layer input ``A``,
``[N, d]``, output gradients of loss ``t``, ``[N, o]``). The mean over ``c`` parts (micro-batches,
then ranks) of such Jacobians is again of that form on the concatenated batch:
``(1/c) Σ_p Gₒ_{p,t}ᵀ A_p = (Gₒ_tᵀ A)`` with ``A = [A_1; …; A_c]`` and ``Gₒ_t = [Gₒ_{1,t}; …] / c``.
So ranks exchange the layer inputs and output gradients (``N (d + m o)`` values per layer instead
of the ``m d o`` of the Jacobian rows), every rank forms the Gramian of the mean Jacobian from the
concatenation, the same weights, and the same update, exactly. Parameters without the closed
form send their Jacobian rows, averaged. Every part of every rank must have found the same
layers (the same model); a difference is an error that names the way out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from jdoptim._distributed import Exchange
from jdoptim._path._weigh import Weigh
from jdoptim.engine._layer_gramian import LayerPieces, layer_step
from jdoptim.engine._reduce import total


class LayerParts:
    """The layer-Gramian engine's pieces of micro-batches (then ranks), averaged.

    Parameters
    ----------
    params:
        The parameters, in the order of the engine's row keys.
    summed_only:
        The ids of the parameters that get the summed gradient (outside ``shared_params``).
    """

    route = "layers"

    def __init__(self, params: Sequence[Tensor], summed_only: frozenset[int]) -> None:
        self.params = list(params)
        self.summed_only = summed_only
        self.parts: list[LayerPieces] = []

    def add(self, part: LayerPieces) -> None:
        """Keep the pieces of one micro-batch."""
        if self.parts and part.m != self.parts[0].m:
            raise ValueError(
                f"cross_rank='mean' averages micro-batches with the same number of losses: got "
                f"{part.m} losses after {self.parts[0].m}"
            )
        self.parts.append(part)

    def weighed(
        self, weigh: Weigh, exchange: Exchange | None, error: BaseException | None
    ) -> list[Tensor | None]:
        """The updates of the mean Jacobian, from every part's pieces."""
        if exchange is None and error is not None:
            raise error
        if exchange is None and len(self.parts) == 1:  # the plain step
            return layer_step(self.parts[0], self.params, weigh.weights, self.summed_only)[0]
        for part in self.parts:
            self._align(part)
        local = None if error is not None else [self._signature(p) for p in self.parts]
        signatures = [local] if exchange is None else exchange.agree(local, error)
        everything = [sig for rank in signatures for sig in rank]  # type: ignore[union-attr]
        if any(sig != everything[0] for sig in everything):
            raise ValueError(
                "cross_rank='mean' with the layer-Gramian engine needs the same losses and layers "
                f"in every micro-batch and rank, got {everything}: use path='jacobian'"
            )
        mine = [t for part in self.parts for t in _tensors(part)]
        per_rank = [mine] if exchange is None else exchange.gather(mine)
        first = self.parts[0]
        count = len(everything)
        inputs: list[list[Tensor]] = [[] for _ in first.calls]
        grads: list[list[Tensor]] = [[] for _ in first.calls]
        rows: dict[int, list[Tensor]] = {k: [] for k in sorted(first.rows)}
        for rank_signatures, tensors in zip(signatures, per_rank, strict=True):
            stream = iter(tensors)
            for _ in rank_signatures:  # type: ignore[union-attr]
                for i in range(len(first.calls)):
                    inputs[i].append(next(stream))
                    grads[i].append(next(stream))
                for k in rows:
                    rows[k].append(next(stream))
        calls = [
            (module, torch.cat(inputs[i]), torch.cat(grads[i], dim=1) / count)
            for i, (module, _, _) in enumerate(first.calls)
        ]
        mean = LayerPieces(first.m, calls, {k: total(rs) / count for k, rs in rows.items()})
        return layer_step(mean, self.params, weigh.weights, self.summed_only)[0]

    def _align(self, part: LayerPieces) -> None:
        """Put ``part``'s calls in a rank-independent order, and reduce the rows of parameters
        outside ``shared_params`` to their sum (all that is needed of them), before combining."""
        part.calls.sort(key=lambda call: self._key(call[0]))
        for k, j in part.rows.items():
            if id(self.params[k]) in self.summed_only:
                part.rows[k] = j.sum(dim=0, keepdim=True)

    def _key(self, module: Any) -> int:
        """A rank-independent name of a module: the index of its first parameter."""
        own = {id(p) for p in module.parameters(recurse=False)}
        return min(k for k, p in enumerate(self.params) if id(p) in own)

    def _signature(self, part: LayerPieces) -> tuple[Any, ...]:
        calls = tuple(
            (self._key(module), a.shape[-1], g.shape[-1], str(a.dtype), str(g.dtype))
            for module, a, g in part.calls
        )
        rows = tuple((k, tuple(j.shape), str(j.dtype)) for k, j in sorted(part.rows.items()))
        return (part.m, calls, rows)


def _tensors(part: LayerPieces) -> list[Tensor]:
    """The tensors one part sends: per call its input ``[N, d]`` and gradients ``[m, N, o]``,
    then the rows of the other parameters."""
    out: list[Tensor] = []
    for _, a, g in part.calls:
        out += [a.reshape(-1, a.shape[-1]), g.reshape(g.shape[0], -1, g.shape[-1])]
    return out + [part.rows[k] for k in sorted(part.rows)]
