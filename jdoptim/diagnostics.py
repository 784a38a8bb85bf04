"""Diagnostics: what each Jacobian-descent step saw (the Gramian) and did (weights, update).

Register a hook with :meth:`jdoptim.JacobianOptimizer.register_step_record_hook`, or keep the
last records with :class:`StepRecorder`. Each step that writes ``.grad`` then builds one
:class:`StepRecord` from the Gramian ``G = J Jᵀ`` the aggregator used (per-loss gradient norms,
cosines, conflicting pairs) and the update's inner product with each loss gradient. Without a hook,
nothing is recorded and nothing is computed.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from jdoptim.aggregation._bases import (
    Aggregator,
    GramianWeightedAggregator,
    WeightedAggregator,
)


class _Recordable(Protocol):
    """What :class:`StepRecorder` needs of a :class:`~jdoptim.JacobianOptimizer`."""

    def register_step_record_hook(self, hook: Callable[[Any, StepRecord], None]) -> Any: ...


__all__ = ["RTOL", "StepRecord", "StepRecorder"]

RTOL = 1e-5  # cosines above -RTOL are rounding, not conflicts


@dataclass(frozen=True, eq=False)
class StepRecord:
    """One step of Jacobian descent, seen through the Gramian its aggregator used.

    Every matrix refers to the parameters that are aggregated: the ``shared_params`` when given
    (the heads' plain gradients are left out), all the parameters otherwise. Tensors are detached,
    in float64, on the device of the losses.

    Attributes
    ----------
    losses:
        The ``m`` losses (divided by the ``GradScaler``'s scale when one is used).
    gramian:
        ``G = J Jᵀ`` (``[m, m]``), ``G_ij = ⟨g_i, g_j⟩`` for the loss gradients ``g_i``.
    weights:
        ``w`` (``[m]``) with update ``u = Jᵀ w``, for a weighted aggregator; ``None`` otherwise.
    update_products:
        ``J u`` (``[m]``): ``⟨g_i, u⟩``, the first-order decrease of loss ``i`` per unit of
        learning rate along the update (the optimizer steps along ``-u``).
    update_norm:
        ``‖u‖`` (a 0-d tensor).
    engine:
        What computed it: ``"jacobian"`` (batched VJPs), ``"per-sample"`` or ``"layer-gramian"``.

    Examples
    --------
    >>> import torch
    >>> J = torch.tensor([[1.0, 0.0], [-2.0, 1.0]], dtype=torch.float64)
    >>> u = J.sum(dim=0)  # the summed gradient, (-1, 1)
    >>> record = StepRecord(torch.ones(2), J @ J.T, None, J @ u, u.norm(), "jacobian")
    >>> record.gradient_norms
    tensor([1.0000, 2.2361], dtype=torch.float64)
    >>> record.conflicting_pairs, record.update_conflicts  # u increases the first loss
    (1, True)
    """

    losses: Tensor
    gramian: Tensor
    weights: Tensor | None
    update_products: Tensor
    update_norm: Tensor
    engine: str

    @property
    def gradient_norms(self) -> Tensor:
        """``‖g_i‖`` (``[m]``), from the Gramian's diagonal."""
        return self.gramian.diagonal().clamp(min=0).sqrt()

    @property
    def cosine(self) -> Tensor:
        """``cos(g_i, g_j)`` (``[m, m]``); ``0`` where a gradient is zero."""
        norms = self.gradient_norms
        outer = norms[:, None] * norms[None, :]
        cos = torch.where(outer > 0, self.gramian / torch.where(outer > 0, outer, 1.0), 0.0)
        return cos.clamp(-1.0, 1.0)

    @property
    def conflicting_pairs(self) -> int:
        """The number of pairs ``i < j`` whose gradients conflict: ``cos(g_i, g_j) < -RTOL``.

        ``RTOL`` (``1e-5``) keeps orthogonal gradients whose Gramian entry is a rounding error
        (``±1e-9`` in float32, say) from counting as conflicts.
        """
        return int((self.cosine.triu(diagonal=1) < -RTOL).sum())

    @property
    def update_cosines(self) -> Tensor:
        """``cos(g_i, u)`` (``[m]``); ``0`` where ``g_i`` or ``u`` is zero."""
        scale = self.gradient_norms * self.update_norm
        return torch.where(
            scale > 0, self.update_products / torch.where(scale > 0, scale, 1.0), 0.0
        )

    def conflicted_losses(self, rtol: float = RTOL) -> Tensor:
        """Mask (``[m]``) of the losses the update increases: ``cos(g_i, u) < -rtol``.

        ``rtol`` absorbs the rounding of a Gramian computed in float32 (an update that is
        non-conflicting in exact arithmetic, such as UPGrad's, can show cosines of ``-1e-7``).
        """
        return self.update_cosines < -rtol

    @property
    def update_conflicts(self) -> bool:
        """Whether the update increases some loss to first order (see :meth:`conflicted_losses`)."""
        return bool(self.conflicted_losses().any())


_ENGINES = {"jacobian": "jacobian", "samples": "per-sample", "layers": "layer-gramian"}


class _Seen:
    """What a non-Gramian aggregator was called with during one step (filled by :func:`capture`)."""

    def __init__(self) -> None:
        self.matrix: Tensor | None = None
        self.weights: Tensor | None = None
        self.update: Tensor | None = None

    def record(self, weighed: Any, losses: Tensor, scale: float | None) -> StepRecord | None:
        """The step's record, or ``None`` when no aggregation ran (a skipped overflow step).

        ``weighed`` is the path's record of the weigh stage (the Gramian and weights a Gramian
        aggregator used); ``losses`` are divided by ``scale`` (a ``GradScaler``'s) when given.
        """
        engine = _ENGINES[weighed.route]
        losses = losses.detach().double() / (scale or 1.0)
        if weighed is not None and weighed.gramian is not None and weighed.weights is not None:
            gramian, weights = weighed.gramian.detach().double(), weighed.weights.detach().double()
            products = gramian @ weights
            norm = (weights @ products).clamp(min=0).sqrt()
            return StepRecord(losses, gramian, weights, products, norm, engine)
        if self.matrix is not None and self.update is not None:
            matrix, update = self.matrix.detach().double(), self.update.detach().double()
            weights = None if self.weights is None else self.weights.detach().double()
            gramian, products = matrix @ matrix.T, matrix @ update
            return StepRecord(losses, gramian, weights, products, update.norm(), engine)
        return None


@contextlib.contextmanager
def capture(aggregator: Aggregator) -> Iterator[_Seen]:
    """Watch, for one step, what a non-Gramian aggregator gets and returns (its ``J`` and
    update: the Gramian is formed from them only for the record). The methods are wrapped on the
    instance only for the duration of the ``with`` block.
    """
    seen = _Seen()
    patches: dict[Any, dict[str, Callable[..., Any]]] = {aggregator: {}}

    def wrap(owner: Any, name: str, keep: Callable[..., None]) -> None:
        original = getattr(owner, name)

        def watched(*args: Any) -> Any:
            result = original(*args)
            keep(*args, result)
            return result

        patches[owner][name] = watched

    if not isinstance(aggregator, GramianWeightedAggregator):
        wrap(aggregator, "forward", lambda j, u: _keep(seen, matrix=j, update=u))
        if isinstance(aggregator, WeightedAggregator):
            wrap(aggregator, "weights", lambda j, w: _keep(seen, weights=w))
    try:
        for owner, methods in patches.items():
            for name, method in methods.items():
                setattr(owner, name, method)
        yield seen
    finally:
        for owner, methods in patches.items():
            for name in methods:
                owner.__dict__.pop(name, None)


def _keep(seen: _Seen, **values: Tensor) -> None:
    for name, value in values.items():
        setattr(seen, name, value)


class StepRecorder:
    """Keep the :class:`StepRecord` of the last ``keep`` steps of an optimizer.

    Parameters
    ----------
    optimizer:
        The :class:`~jdoptim.JacobianOptimizer` to watch.
    keep:
        How many records to keep (the oldest are dropped).

    Examples
    --------
    >>> import torch
    >>> from jdoptim import JacobianOptimizer
    >>> model = torch.nn.Linear(3, 2)
    >>> opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    >>> recorder = StepRecorder(opt, keep=10)
    >>> _ = opt.step(lambda: ((model(torch.randn(8, 3)) - 1) ** 2).mean(dim=0))
    >>> recorder.last.gramian.shape, recorder.last.engine, len(recorder.records)
    (torch.Size([2, 2]), 'jacobian', 1)
    >>> recorder.remove()  # stop recording
    """

    def __init__(self, optimizer: _Recordable, keep: int = 1) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be a positive int, got {keep!r}")
        self.records: deque[StepRecord] = deque(maxlen=keep)
        self._handle = optimizer.register_step_record_hook(lambda _, r: self.records.append(r))

    @property
    def last(self) -> StepRecord | None:
        """The latest record (``None`` before the first step)."""
        return self.records[-1] if self.records else None

    def remove(self) -> None:
        """Stop recording (the records already kept stay)."""
        self._handle.remove()
