"""Diagnostics: what each Jacobian-descent step saw (the Gramian) and did (weights, update).

Register a hook with :meth:`jdoptim.JacobianOptimizer.register_step_record_hook`, or keep the
last records with :class:`StepRecorder`. Each step that writes ``.grad`` then builds one
:class:`StepRecord` from the Gramian ``G = J Jᵀ`` the aggregator used (per-loss gradient norms,
cosines, conflicting pairs) and the update's inner product with each loss gradient. It is built in
``backward`` (so also in ``step`` with a closure), before the wrapped optimizer steps; a
micro-batch kept with ``accumulate=True`` and a step skipped on a ``GradScaler`` overflow record
nothing. Without a hook, nothing is recorded and nothing is computed; with one, the Jacobian
engine forms ``J Jᵀ`` for aggregators that do not already use it. Hooks are not copied by
``copy.deepcopy``, pickling or ``state_dict``.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle


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
        ``w`` (``[m]``) with update ``u = Jᵀ w``, for an aggregator that weighs the Gramian
        (:class:`~jdoptim.aggregation.GramianWeightedAggregator`); ``None`` otherwise.
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


def record_of(weighed: Any, scale: float | None) -> StepRecord:
    """The public record of the weigh stage's (an observed step), losses divided by ``scale``."""
    gramian = weighed.gramian.detach().double()
    products = weighed.update_products.detach().double()
    weights = None if weighed.weights is None else weighed.weights.detach().double()
    if weights is not None:  # u = Jᵀ w: ‖u‖² = wᵀ G w
        norm = (weights @ products).clamp(min=0).sqrt()
    else:
        norm = weighed.update_norm.detach().double()
    losses = weighed.losses.detach().double() / (scale or 1.0)
    return StepRecord(losses, gramian, weights, products, norm, _ENGINES[weighed.route])


class StepRecordHooks:
    """The step-record hooks of one optimizer: what its ``backward`` observes and reports.

    Empty (falsy) until a hook is registered; while it is empty, the path observes nothing.
    """

    def __init__(self) -> None:
        self._hooks: OrderedDict[int, Callable[[Any, StepRecord], None]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._hooks)

    def register(self, hook: Callable[[Any, StepRecord], None]) -> RemovableHandle:
        """Add ``hook``; ``handle.remove()`` removes it."""
        handle = RemovableHandle(self._hooks)
        self._hooks[handle.id] = hook
        return handle

    @contextlib.contextmanager
    def watching(
        self, owner: Any, path: Any, final: bool, scale: Callable[[], float | None]
    ) -> Iterator[None]:
        """Around a ``backward`` along ``path``: when ``final`` (it writes ``.grad``) and a hook
        listens, have the path observe, then call each hook with ``owner`` and the record of a
        call that weighed (a step skipped on overflow weighs nothing; a call that raises records
        nothing). The record's losses are divided by ``scale()``."""
        observe = final and bool(self._hooks)
        before, observing = path.record, path.observe
        path.observe = observing or observe
        try:
            yield
        finally:
            path.observe = observing
        if observe and path.record is not before:
            record = record_of(path.record, scale())
            for hook in list(self._hooks.values()):
                hook(owner, record)


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
