"""``JacobianOptimizer``: Jacobian descent as a drop-in ``torch.optim.Optimizer``."""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from jdoptim._distributed import Exchange, JacobianAccumulator, current_exchange
from jdoptim._validation import as_loss_vector, as_tensor_list, check_finite_jacobians
from jdoptim.aggregation import Aggregator, GramianWeightedAggregator, UPGrad
from jdoptim.diagnostics import StepRecord, capture
from jdoptim.engine import (
    JacobianEngine,
    LayerGramianEngine,
    NonFiniteGramianError,
    PerSampleEngine,
    aggregate_jacobians,
)
from jdoptim.engine._per_sample import combine_parts

__all__ = ["JacobianOptimizer"]

_STATE_KEY = "jdoptim"
# Attributes that copies, pickles and fresh optimizers start without: micro-batches kept by
# backward(..., accumulate=True), whether the aggregator state was synchronised across ranks,
# and the bytes this rank sent in the last cross-rank exchange.
# and whether backward() wrote .grad since the last step or zero_grad (Lightning's two-phase form).
_TRANSIENT = {
    "_pending": None,
    "_ranks_synced": False,
    "cross_rank_bytes": 0,
    "_grad_written": False,
}


class JacobianOptimizer(Optimizer):
    """Wrap any ``torch.optim.Optimizer`` so that it steps along an aggregation of the Jacobian.

    At each step, the closure returns a vector of ``m`` losses. The optimizer computes the
    Jacobian ``J`` (``[m, n]``) of the losses w.r.t. the parameters of all its groups, turns it into
    one update with ``aggregator``, writes that update into ``.grad`` and runs the wrapped
    optimizer's ``step``. Learning-rate schedulers, ``GradScaler``, checkpoints and step hooks see
    an ordinary optimizer: ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's.

    Parameters
    ----------
    optimizer:
        The optimizer that applies the update (``SGD``, ``Adam``, ...).
    aggregator:
        Maps ``J`` to the update; :class:`~jdoptim.aggregation.UPGrad` by default. Any callable
        ``[m, n] -> [n]`` works; a :class:`~jdoptim.aggregation.GramianWeightedAggregator` lets the
        engine work from the Gramian ``J Jᵀ`` block by block.
    shared_params:
        If given, the Jacobian is taken only w.r.t. these parameters (a shared trunk); every other
        parameter gets the plain gradient of the summed losses (task-specific heads).
    grad_scaler:
        The ``torch.amp.GradScaler`` of a mixed-precision loop. Pass ``scaler.scale(losses)`` to
        :meth:`backward`: the Jacobian is unscaled before aggregation and ``.grad`` is written at
        the scaled level, so ``scaler.step(opt)`` applies the exact fp32 aggregation for every
        aggregator. On overflow ``.grad`` is made non-finite: the scaler skips the step.
    parallel_chunk_size:
        Number of Jacobian rows computed per batched backward pass (``None``: all at once).
    batch_dim:
        ``0`` declares per-sample losses: loss ``i`` depends only on sample ``i`` (row ``i`` of
        every batched tensor, batch first). With an aggregator that needs only the Gramian, a step
        then costs one forward and one backward: per-layer Gramians come in closed form from the
        layers' inputs and output gradients (``Linear``, ``Conv1d``, ``Conv2d``, ``Embedding``,
        ``LayerNorm``, ``GroupNorm``), other parameters are differentiated exactly by batched
        VJPs. The layers are found through a global module forward hook that only records the
        modules owning this optimizer's parameters, and only when grad is enabled; a forward not
        followed by a step keeps the recorded layer inputs until the next ``zero_grad``.
        ``BatchNorm`` in training mode mixes samples and is rejected with an explanation.
    path:
        How the Jacobian is differentiated. ``"auto"`` (default): with ``batch_dim``, the
        per-sample engine above; with ``shared_params`` and an aggregator that needs only the
        Gramian, the layer-Gramian engine (one batched backward of data gradients; each
        ``nn.Linear`` of the trunk contributes ``G_{st} = ⟨Gₒ_s, A Aᵀ Gₒ_t⟩`` from its input ``A``
        and output gradients ``Gₒ``, and its update ``(Σ_t w_t Gₒ_t)ᵀ A``, without forming the
        Jacobian rows; the same forward hook as above finds the layers); otherwise the Jacobian
        engine (batched VJPs w.r.t. the parameters). ``"jacobian"`` forces the Jacobian engine (no
        hook is installed). ``"gramian"`` forces a Gramian engine (per-sample with ``batch_dim``,
        layer-Gramian otherwise, over all parameters when there are no ``shared_params``) and
        needs a :class:`~jdoptim.aggregation.GramianWeightedAggregator`. Every path is exact.
    cross_rank:
        How the loss vectors of several ranks (when ``torch.distributed`` is initialised with more
        than one process) and of several micro-batches (``backward(..., accumulate=True)``)
        form one global loss vector. ``"mean"``: their mean (each rank estimates the same ``m``
        objectives, as DDP averages gradients); the Jacobian blocks are averaged with one
        ``all_reduce``, and a Gramian engine falls back to the Jacobian path, since the mean
        Jacobian's Gramian cannot be formed from local Gramians. ``"concat"``: their
        concatenation, rank by rank (one loss per sample of the global batch); the Jacobian
        rows are gathered, or with ``batch_dim=0`` only the per-layer inputs and output
        gradients. ``None`` (default): ``"concat"`` with ``batch_dim=0``, ``"mean"`` otherwise.
        Every rank then runs the same aggregation and writes the same ``.grad``; ``step`` and
        ``backward`` return the local losses. After each exchange, ``cross_rank_bytes`` holds
        the bytes this rank sent. See :doc:`/distributed`.

    Examples
    --------
    >>> import torch
    >>> from jdoptim import JacobianOptimizer
    >>> from jdoptim.aggregation import UPGrad
    >>> model = torch.nn.Linear(3, 2)
    >>> x, y = torch.randn(8, 3), torch.randn(8, 2)
    >>> opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), UPGrad())
    >>> def closure():
    ...     opt.zero_grad()
    ...     return ((model(x) - y) ** 2).mean(dim=0)  # one loss per output
    >>> losses = opt.step(closure)
    >>> losses.shape
    torch.Size([2])
    """

    def __init__(
        self,
        optimizer: Optimizer,
        aggregator: Callable[[Tensor], Tensor] | None = None,
        *,
        shared_params: Iterable[Tensor] | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        parallel_chunk_size: int | None = None,
        batch_dim: int | None = None,
        path: Literal["auto", "jacobian", "gramian"] = "auto",
        cross_rank: Literal["mean", "concat"] | None = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                "optimizer must be a torch.optim.Optimizer instance, got "
                f"{type(optimizer).__name__}"
            )
        if isinstance(optimizer, JacobianOptimizer):
            raise TypeError("optimizer is already a JacobianOptimizer: do not wrap it twice")
        if aggregator is None:
            aggregator = UPGrad()
        if isinstance(aggregator, type):
            raise TypeError(
                f"aggregator must be an instance, got the class {aggregator.__name__}: "
                f"pass {aggregator.__name__}() instead"
            )
        if not callable(aggregator):
            raise TypeError(f"aggregator must be callable, got {type(aggregator).__name__}")
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise TypeError(
                f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}"
            )
        shared = None
        if shared_params is not None:
            shared = as_tensor_list(shared_params, "shared_params")
            owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
            for i, p in enumerate(shared):
                if id(p) not in owned:
                    raise ValueError(
                        f"shared_params[{i}] (shape {tuple(p.shape)}) is not a parameter of the "
                        "wrapped optimizer"
                    )
            if not shared:
                raise ValueError("shared_params is empty")
        if batch_dim is not None and (isinstance(batch_dim, bool) or batch_dim != 0):
            raise ValueError(
                f"batch_dim must be 0 (batch-first per-sample losses) or None, got {batch_dim!r}"
            )
        if path not in ("auto", "jacobian", "gramian"):
            raise ValueError(f"path must be 'auto', 'jacobian' or 'gramian', got {path!r}")
        if cross_rank is None:
            cross_rank = "concat" if batch_dim is not None else "mean"
        if cross_rank not in ("mean", "concat"):
            raise ValueError(f"cross_rank must be 'mean', 'concat' or None, got {cross_rank!r}")
        gramian_based = isinstance(aggregator, GramianWeightedAggregator)
        if path == "gramian" and not gramian_based:
            raise ValueError(
                f"path='gramian' needs an aggregator that works from the Gramian "
                f"(a GramianWeightedAggregator), got {aggregator!r}"
            )
        # Initialise like every Optimizer (hook dicts, patched step) without a second copy of
        # the parameter groups: those live in the wrapped optimizer.
        Optimizer.__setstate__(
            self,
            {
                "optimizer": optimizer,
                "aggregator": aggregator,
                "shared_params": shared,
                "grad_scaler": grad_scaler,
                "engine": JacobianEngine(parallel_chunk_size),
                "gramian_engine": None,
                "cross_rank": cross_rank,
                **_TRANSIENT,
            },
        )
        if path == "jacobian":
            return
        if batch_dim is not None:
            self.gramian_engine = PerSampleEngine(self._params, parallel_chunk_size)
        elif path == "gramian" or (shared is not None and gramian_based):
            aggregated = self._params if shared is None else self._shared_params
            self.gramian_engine = LayerGramianEngine(aggregated, parallel_chunk_size)

    # The data model of the wrapped optimizer, shared by reference.
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    def __getstate__(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer,
            "aggregator": self.aggregator,
            "shared_params": self.shared_params,
            "grad_scaler": self.grad_scaler,
            "engine": self.engine,
            "gramian_engine": self.gramian_engine,
            "cross_rank": self.cross_rank,
            **_TRANSIENT,
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(\n  optimizer={self.optimizer!r},\n"
            f"  aggregator={self.aggregator!r}\n)"
        )

    def register_step_record_hook(
        self, hook: Callable[[JacobianOptimizer, StepRecord], None]
    ) -> RemovableHandle:
        """Call ``hook(optimizer, record)`` each time an aggregated ``.grad`` is written.

        ``record`` is a :class:`~jdoptim.diagnostics.StepRecord`: the losses, the Gramian the
        aggregator used (per-loss gradient norms, cosines, conflicting pairs), the weights and
        the update's inner product with each loss gradient, and the engine that ran. It is built
        in :meth:`backward` (so also in :meth:`step` with a closure), before the wrapped
        optimizer steps; a micro-batch kept with ``accumulate=True`` and a step skipped on
        overflow record nothing. While no hook is registered nothing is computed; with one, the
        Jacobian engine forms ``J Jᵀ`` for aggregators that do not already use it. Hooks are not
        copied by ``copy.deepcopy``, pickling or ``state_dict``. The aggregator must be an
        :class:`~jdoptim.aggregation.Aggregator`.

        Returns
        -------
        torch.utils.hooks.RemovableHandle
            ``handle.remove()`` unregisters the hook.

        Examples
        --------
        >>> import torch
        >>> from jdoptim import JacobianOptimizer
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
        >>> handle = opt.register_step_record_hook(
        ...     lambda opt, r: print(r.engine, r.conflicting_pairs, r.update_conflicts)
        ... )
        >>> _ = opt.step(lambda: ((model(torch.ones(4, 3)) - 1) ** 2).mean(dim=0))
        jacobian 0 False
        >>> handle.remove()
        """
        if not isinstance(self.aggregator, Aggregator):
            raise TypeError(
                f"step records need a jdoptim.aggregation.Aggregator, got {self.aggregator!r}"
            )
        hooks = self.__dict__.setdefault("_step_record_hooks", OrderedDict())
        handle = RemovableHandle(hooks)
        hooks[handle.id] = hook
        return handle

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _shared_params(self) -> list[Tensor]:
        return self.shared_params

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Compute the losses with ``closure``, write the aggregated ``.grad`` and step.

        Parameters
        ----------
        closure:
            Re-evaluates the model and returns the losses: a tensor of any shape (flattened) or a
            list/tuple of scalar tensors. It usually calls :meth:`zero_grad` first. It is called
            exactly once, with grad enabled. Without a closure, ``.grad`` must already hold the
            update (see :meth:`backward`) and only the wrapped optimizer's step runs.

        Returns
        -------
        Tensor or None
            The losses, flattened and detached; ``None`` without a closure.
        """
        if closure is None:
            self.optimizer.step()
            self._grad_written = False
            return None
        params = self._params()
        saved_grads = [p.grad for p in params]
        written_before, self._grad_written = self._grad_written, False
        try:
            with torch.enable_grad():
                losses = closure()
            if self._grad_written or (written_before and losses is None):
                # backward() already wrote .grad (in the closure, or before a closure that
                # returns nothing, as Lightning's step() passes): step on it.
                vector = None if losses is None else _detached(losses)
            else:
                _check_not_backpropagated(losses, params, saved_grads)
                vector = self._backward_closure_losses(losses)
        except BaseException:
            for p, g in zip(params, saved_grads, strict=True):
                p.grad = g
            self._grad_written = written_before
            raise
        self.optimizer.step()
        self._grad_written = False
        return vector

    def _backward_closure_losses(self, losses: Any) -> Tensor:
        try:
            return self.backward(losses)
        except RuntimeError as e:
            if "backward through the graph a second time" not in str(e):
                raise
            raise RuntimeError(
                f"{_HABIT} (the closure's losses were already backpropagated: {e})"
            ) from e

    def backward(
        self, losses: Tensor | list[Tensor] | tuple[Tensor, ...], *, accumulate: bool = False
    ) -> Tensor:
        """Write the aggregation of the Jacobian of ``losses`` into ``.grad``, without stepping.

        The update is accumulated into ``.grad`` (as ``loss.backward()`` accumulates). Nothing is
        written if any check fails. Follow with :meth:`step` (no closure), ``scaler.step(opt)``,
        or gradient clipping then :meth:`step`.

        Parameters
        ----------
        losses:
            A tensor of any shape (flattened) or a list/tuple of scalar tensors.
        accumulate:
            ``True`` keeps this micro-batch's Jacobian (or, with ``batch_dim=0``, its per-layer
            pieces) and writes nothing; the next call without ``accumulate`` (or
            :meth:`step` with a closure) combines every kept micro-batch with its own losses as
            ``cross_rank`` says, aggregates once and writes ``.grad``. ``"mean"``: the global
            losses are the mean of the micro-batches' loss vectors (``k`` micro-batches of task
            losses averaged over their samples equal one batch ``k`` times as large when they
            have the same size); ``"concat"``: the rows are stacked in call order (``k``
            micro-batches of per-sample losses equal one batch of all their samples). Under
            ``torch.distributed``, ranks exchange nothing until that final call. ``zero_grad``
            keeps what was accumulated; the kept tensors are not part of ``state_dict``; a call
            that raises drops them (start the accumulation again).

        Returns
        -------
        Tensor
            The losses, flattened and detached (still scaled when a ``grad_scaler`` is used).

        Examples
        --------
        >>> import torch
        >>> from jdoptim import JacobianOptimizer
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
        >>> x, y = torch.randn(8, 3), torch.randn(8, 2)
        >>> for xs, ys in zip(x.split(4), y.split(4)):  # two micro-batches of 4 samples
        ...     last = xs is x.split(4)[-1]
        ...     _ = opt.backward(((model(xs) - ys) ** 2).mean(dim=0), accumulate=not last)
        >>> opt.step()
        """
        if not isinstance(accumulate, bool):
            raise TypeError(f"accumulate must be a bool, got {type(accumulate).__name__}")
        hooks = self.__dict__.get("_step_record_hooks")
        if not hooks or accumulate:
            with _autocast_off():
                vector = self._backward(losses, accumulate)
            self._grad_written = self._grad_written or not accumulate
            return vector
        engine = (
            "per-sample" if isinstance(self.gramian_engine, PerSampleEngine) else "layer-gramian"
        )
        with _autocast_off(), capture(self.aggregator, self.engine) as seen:
            vector = self._backward(losses, accumulate)
        self._grad_written = True
        record = seen.record(vector / self._scale(), engine)
        if record is not None:
            for hook in list(hooks.values()):
                hook(self, record)
        return vector

    def _backward(
        self, losses: Tensor | list[Tensor] | tuple[Tensor, ...], accumulate: bool
    ) -> Tensor:
        params = self._params()
        if not params:
            raise ValueError("the wrapped optimizer holds no parameter that requires grad")
        exchange = current_exchange()
        if exchange is not None or accumulate or self._pending is not None:
            return self._combined_backward(losses, params, accumulate, exchange)
        scaler = self.grad_scaler
        scaling = scaler is not None and scaler.is_enabled()
        with torch.enable_grad():
            # Under an enabled GradScaler, non-finite losses are an overflow: the scaler skips.
            vector = as_loss_vector(losses, check_finite=not scaling)
            if self.gramian_engine is not None:
                if isinstance(self.aggregator, GramianWeightedAggregator):
                    return self._gramian_backward(vector, params)
                self.gramian_engine.clear()  # this aggregator needs the whole Jacobian
            jacobians = self.engine.jacobians(vector, params)
        with torch.no_grad():
            return self._write_aggregation(vector.detach(), params, jacobians)

    def _gramian_backward(self, vector: Tensor, params: list[Tensor]) -> Tensor:
        scale = self._scale()
        summed_only = self._summed_only(params)
        self._write_gramian_step(
            lambda: self.gramian_engine.gramian_step(
                vector,
                params,
                self.aggregator.weights_from_gramian,
                summed_only=summed_only,
                unscale=scale,
            ),
            params,
        )
        return vector.detach()

    def _scale(self) -> float:
        scaler = self.grad_scaler
        return scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0

    def _summed_only(self, params: list[Tensor]) -> frozenset[int]:
        if self.shared_params is None:
            return frozenset()
        return frozenset(id(p) for p in params) - {id(p) for p in self.shared_params}

    def _combined_backward(
        self,
        losses: Tensor | list[Tensor] | tuple[Tensor, ...],
        params: list[Tensor],
        accumulate: bool,
        exchange: Exchange | None,
    ) -> Tensor:
        """Accumulate a micro-batch, or combine the kept ones (and the ranks) and aggregate."""
        scaler = self.grad_scaler
        scaling = scaler is not None and scaler.is_enabled()
        scale = self._scale()
        summed_only = self._summed_only(params)
        pieces = (
            isinstance(self.gramian_engine, PerSampleEngine)
            and isinstance(self.aggregator, GramianWeightedAggregator)
            and self.cross_rank == "concat"
        )
        pending, self._pending = self._pending, None
        if pending is None:
            summed = [id(p) in summed_only for p in params]
            pending = [] if pieces else JacobianAccumulator(self.cross_rank, summed)
        elif isinstance(pending, list) != pieces:
            raise RuntimeError("the aggregator or the parameters changed during accumulation")
        error, vector = None, None
        try:
            with torch.enable_grad():
                vector = as_loss_vector(losses, check_finite=not scaling)
                if pieces:
                    pending.append(
                        self.gramian_engine.collect(
                            vector, params, summed_only=summed_only, unscale=scale
                        )
                    )
                else:
                    if self.gramian_engine is not None:
                        self.gramian_engine.clear()  # the Jacobian path serves this step
                    jacobians = self.engine.jacobians(vector, params)
                    pending.add(
                        vector.shape[0],
                        [
                            j.sum(dim=0, keepdim=True)
                            if j is not None and id(p) in summed_only
                            else j
                            for p, j in zip(params, jacobians, strict=True)
                        ],
                    )
        except Exception as e:
            if exchange is None or accumulate:
                raise
            error = e  # raised on every rank by the exchange below
        if accumulate:
            self._pending = pending
            return vector.detach()
        if exchange is not None and not self._ranks_synced:
            exchange.sync_state(self.aggregator)
            self._ranks_synced = True
        if not pieces:
            blocks = pending.result(params, exchange, error)
            with torch.no_grad():
                self._write_aggregation(vector.detach(), params, blocks)
        else:
            gather = signatures = None
            if exchange is not None:
                local = None if error is not None else [p.signature(params) for p in pending]
                signatures = exchange.agree(local, error)
                gather = exchange.gather
            self._write_gramian_step(
                lambda: combine_parts(
                    pending,
                    params,
                    self.aggregator.weights_from_gramian,
                    summed_only,
                    gather=gather,
                    signatures=signatures,
                ),
                params,
            )
        if exchange is not None:
            self.cross_rank_bytes = exchange.bytes_sent
        return vector.detach()

    def _write_gramian_step(
        self, run: Callable[[], tuple[list[Tensor | None], Tensor]], params: list[Tensor]
    ) -> None:
        scaler = self.grad_scaler
        scaling = scaler is not None and scaler.is_enabled()
        scale = self._scale()
        try:
            updates, _ = run()
            reached = [(p, u) for p, u in zip(params, updates, strict=True) if u is not None]
            # One host sync: a NaN or inf in any update makes its sum non-finite.
            if reached and not bool(
                torch.isfinite(torch.stack([u.sum() for _, u in reached])).all()
            ):
                raise NonFiniteGramianError("the per-sample gradients hold NaN or inf")
        except NonFiniteGramianError:
            if not scaling:
                raise
            # Overflow under a GradScaler: non-finite .grad makes scaler.step skip the step.
            with torch.no_grad():
                self._write_grads([(p, torch.full_like(p, float("inf"))) for p in params])
            return
        with torch.no_grad():
            self._write_grads([(p, u * scale) for p, u in reached])

    def _write_aggregation(
        self, vector: Tensor, params: list[Tensor], jacobians: list[Tensor | None]
    ) -> Tensor:
        scaler = self.grad_scaler
        if all(j is None for j in jacobians):
            raise ValueError("the losses do not depend on any parameter of the wrapped optimizer")
        reached = [(p, j) for p, j in zip(params, jacobians, strict=True) if j is not None]
        if scaler is not None and scaler.is_enabled():
            scale = scaler.get_scale()
            if not all(bool(torch.isfinite(j).all()) for _, j in reached):
                self._write_grads([(p, torch.full_like(p, float("inf"))) for p, _ in reached])
                return vector
            reached = [(p, j / scale) for p, j in reached]
            grads = self._aggregate(reached)
            self._write_grads([(p, g * scale) for p, g in grads])
        else:
            check_finite_jacobians([j for _, j in reached])
            self._write_grads(self._aggregate(reached))
        return vector

    def _aggregate(self, reached: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """Aggregate the Jacobian blocks of the shared parameters; sum the rows of the others."""
        if self.shared_params is None:
            shared, others = reached, []
        else:
            shared_ids = {id(p) for p in self.shared_params}
            shared = [(p, j) for p, j in reached if id(p) in shared_ids]
            others = [(p, j.sum(dim=0)) for p, j in reached if id(p) not in shared_ids]
            if not shared:
                raise ValueError("the losses do not depend on any of the shared_params")
        updates = aggregate_jacobians([j for _, j in shared], self.aggregator)
        return [*((p, u) for (p, _), u in zip(shared, updates, strict=True)), *others]

    @staticmethod
    def _write_grads(grads: list[tuple[Tensor, Tensor]]) -> None:
        for p, g in grads:
            g = g.to(p.dtype)
            p.grad = g if p.grad is None else p.grad + g

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of the wrapped optimizer and delete any ``.jac`` left on them."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._grad_written = False
        if self.gramian_engine is not None:
            self.gramian_engine.clear()
        for p in self._params():
            if hasattr(p, "jac"):
                del p.jac

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to the wrapped optimizer; it joins the next Jacobian."""
        self.optimizer.add_param_group(param_group)
        if self.gramian_engine is not None:
            self.gramian_engine.clear()

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's ``state_dict`` plus one ``"jdoptim"`` key (aggregator state).

        ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` keeps only
        ``"state"`` and ``"param_groups"``: the ``"jdoptim"`` key is dropped there, so checkpoint a
        stateful aggregator's ``state_dict()`` separately when using DCP.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self.optimizer.state_dict()
        state_dict[_STATE_KEY] = {"aggregator": _aggregator_state(self.aggregator)}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state returned by :meth:`state_dict` (strictly: every key must match)."""
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        extra = state_dict.pop(_STATE_KEY, None)
        aggregator_state = {} if extra is None else extra.get("aggregator", {})
        if extra is None and _aggregator_state(self.aggregator):
            raise KeyError(
                f"the state dict has no {_STATE_KEY!r} key but {self.aggregator!r} is stateful"
            )
        load = getattr(self.aggregator, "load_state_dict", None)
        if load is None and aggregator_state:
            raise ValueError("the state dict holds aggregator state the aggregator cannot load")
        # A failed load (aggregator or inner optimizer) leaves both as they were.
        previous = copy.deepcopy(_aggregator_state(self.aggregator))
        try:
            if load is not None:
                load(aggregator_state)
            self.optimizer.load_state_dict(state_dict)
        except BaseException:
            if load is not None:
                load(previous)
            raise
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


@contextlib.contextmanager
def _autocast_off() -> Iterator[None]:
    """Run the Jacobian and the aggregation in the parameters' dtypes, even inside an autocast
    region (Lightning's mixed precision runs the whole training step, ``step`` included, under
    autocast; the losses were already computed there)."""
    with contextlib.ExitStack() as stack:
        for device in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


_HABIT = (
    "JacobianOptimizer needs the losses themselves: return them from the closure (a vector, "
    "or a list of scalar losses) without calling loss.backward(); for the two-phase form, call "
    "opt.backward(losses) and then opt.step()"
)


def _check_not_backpropagated(
    losses: Any, params: list[Tensor], saved_grads: list[Tensor | None]
) -> None:
    """Raise if the closure returned nothing or wrote ``.grad`` itself (``loss.backward()``)."""
    written = [
        i
        for i, (p, g) in enumerate(zip(params, saved_grads, strict=True))
        if p.grad is not None and p.grad is not g
    ]
    if losses is None:
        raise TypeError(
            f"expected the losses, got NoneType (does the closure return the losses?): {_HABIT}"
        )
    if written:
        raise RuntimeError(
            f"the closure wrote .grad of {len(written)} parameter(s) itself (did it call "
            f"loss.backward()?): {_HABIT}"
        )


def _detached(losses: Any) -> Tensor:
    if isinstance(losses, (list, tuple)):
        return torch.stack([torch.as_tensor(loss).detach().reshape(()) for loss in losses])
    return torch.as_tensor(losses).detach().reshape(-1)


def _aggregator_state(aggregator: Callable[[Tensor], Tensor]) -> dict[str, Any]:
    get = getattr(aggregator, "state_dict", None)
    return {} if get is None else get()
