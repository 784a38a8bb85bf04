"""``JacobianOptimizer``: Jacobian descent as a drop-in ``torch.optim.Optimizer``."""

from __future__ import annotations

import contextlib
import functools
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from jdoptim._aggregator_state import load_with, state_of
from jdoptim._distributed import resolve_group
from jdoptim._path import Path, Setup
from jdoptim._scalarized import ScalarPath, check_scalarizer_options
from jdoptim._validation import check_options
from jdoptim.aggregation import GramianWeightedAggregator, UPGrad
from jdoptim.diagnostics import StepRecord, record_of
from jdoptim.engine import JacobianEngine, LayerGramianEngine, PerSampleEngine
from jdoptim.scalarization import Scalarizer

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["JacobianOptimizer"]

_STATE_KEY = "jdoptim"


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
        engine work from the Gramian ``J Jᵀ`` block by block. A
        :class:`~jdoptim.scalarization.Scalarizer` instead combines the losses: each step computes
        ``scalarizer(losses)`` (the losses as returned, e.g. of shape ``[m]``) and runs one plain
        ``backward()``, so one training loop compares gradient-combining and loss-combining
        methods. Its state (``DWA``'s history, ``FAMO``'s logits and Adam moments, the
        parameters of ``UW``/``IMTLL``) is in :meth:`state_dict`; ``shared_params``,
        ``batch_dim``, ``path`` and ``accumulate=True`` need an aggregator. The per-step updates
        stay the user's calls, where the papers place them: ``famo.update(losses_after)`` after
        ``step``, with the losses recomputed on the same batch; ``dwa.step()`` at the end of each
        epoch (see the second example).
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
        VJPs. Forward hooks on the modules that own this optimizer's parameters record each call
        in the graph of its output (it goes away with the graph; nothing under ``no_grad`` or
        ``torch.compile``); they are removed when the optimizer is dropped or by
        :meth:`remove_hooks`. Losses that mix samples are rejected with an explanation
        (``BatchNorm`` in training mode, and a randomly weighted second backward on the first
        step and every 100 steps: see :doc:`/performance`).
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
        ``all_reduce``, or the Gramian engines gather the per-layer inputs and output gradients
        and form the mean Jacobian's Gramian from them. ``"concat"``: their concatenation, rank
        by rank (one loss per sample of the global batch); the Jacobian rows are gathered, or
        with ``batch_dim=0`` only the per-layer inputs and output gradients (the layer-Gramian
        engine falls back to the Jacobian path). ``None`` (default): ``"concat"`` with
        ``batch_dim=0``, ``"mean"`` otherwise. Every rank then runs the same aggregation and
        writes the same ``.grad``; ``step`` and ``backward`` return the local losses. After
        each exchange, ``cross_rank_bytes`` holds the bytes this rank sent. See
        :doc:`/distributed`.
    process_group:
        The ranks that exchange: a ``torch.distributed`` ``ProcessGroup`` (from ``new_group``) or
        a 1-D ``DeviceMesh``; ``None`` (default): every process. Each process must belong to its
        optimizer's group. Under FSDP2 (``fully_shard``) the ranks of the parameters' mesh
        exchange; a ``process_group`` given there must be that mesh's group.

    Notes
    -----
    A parameter listed twice (torch warns) is differentiated and written once. Parameters of
    several dtypes share one Gramian, accumulated in their promoted dtype (``float64`` for
    ``float32`` and ``float64``); each ``.grad`` is written in its parameter's dtype. Sparse
    gradients (``nn.Embedding(sparse=True)``) are supported with ``batch_dim=0``; elsewhere an
    error names the parameter before anything is touched. A ``backward`` that raises, and a
    ``step`` whose closure, aggregation or wrapped step raises before updating, leave the
    parameters, ``.grad``, ``.jac`` and the inner and aggregator states as they were.

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

    The same loop with a scalarizer, FAMO here, and its update after each step:

    >>> from jdoptim.scalarization import FAMO
    >>> famo = FAMO(2)
    >>> opt = JacobianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), famo)
    >>> losses = opt.step(closure)
    >>> with torch.no_grad():
    ...     famo.update(closure())  # the same batch, after the step
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
        process_group: ProcessGroup | DeviceMesh | None = None,
    ) -> None:
        if isinstance(optimizer, JacobianOptimizer):
            raise TypeError("optimizer is already a JacobianOptimizer: do not wrap it twice")
        aggregator = UPGrad() if aggregator is None else aggregator
        if isinstance(aggregator, type):
            raise TypeError(
                f"aggregator must be an instance, got the class {aggregator.__name__}: "
                f"pass {aggregator.__name__}() instead"
            )
        if isinstance(aggregator, Scalarizer):
            check_scalarizer_options(shared_params, batch_dim, path)
        shared, cross_rank = check_options(
            optimizer, aggregator, shared_params, grad_scaler, batch_dim, path, cross_rank
        )
        group = resolve_group(process_group)
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
                "process_group": group,
                "_path": _new_path(aggregator),  # kept micro-batches, the last step's record
                "_grad_written": False,  # by backward(), since the last step or zero_grad
            },
        )
        if path == "jacobian" or isinstance(aggregator, Scalarizer):
            return
        if batch_dim is not None:
            self.gramian_engine = PerSampleEngine(
                functools.partial(_trainable, optimizer), parallel_chunk_size
            )
        elif path == "gramian" or (
            shared is not None and isinstance(aggregator, GramianWeightedAggregator)
        ):
            aggregated = (
                functools.partial(_trainable, optimizer)
                if shared is None
                else functools.partial(list, shared)
            )
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
            "process_group": self.process_group,
            "_path": _new_path(self.aggregator),  # copies and pickles keep no micro-batches
            "_grad_written": False,
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(\n  optimizer={self.optimizer!r},\n"
            f"  aggregator={self.aggregator!r}\n)"
        )

    @property
    def cross_rank_bytes(self) -> int:
        """Bytes this rank sent in the last cross-rank exchange (``0`` in a single process)."""
        return self._path.bytes_sent

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
        copied by ``copy.deepcopy``, pickling or ``state_dict``.

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
        hooks = self.__dict__.setdefault("_step_record_hooks", OrderedDict())
        handle = RemovableHandle(hooks)
        hooks[handle.id] = hook
        return handle

    def _params(self) -> list[Tensor]:
        return _trainable(self.optimizer)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Compute the losses with ``closure``, write the aggregated ``.grad`` and step.

        Parameters
        ----------
        closure:
            Re-evaluates the model and returns the losses: a tensor of any shape (flattened) or a
            list/tuple of scalar tensors. It usually calls :meth:`zero_grad` first. It is called
            exactly once, with grad enabled. Without a closure, ``.grad`` must already hold the
            update (see :meth:`backward`) and only the wrapped optimizer's step runs. The same
            holds when :meth:`backward` wrote ``.grad`` inside the closure, or before a closure
            that returns ``None`` (Lightning's ``step()`` passes such a closure). A closure that
            calls ``loss.backward()`` itself is an error that says what to do.

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
        weighed = False
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
                weighed = True
            self.optimizer.step()  # one that raises before updating leaves everything as it was
        except BaseException:
            for p, g in zip(params, saved_grads, strict=True):
                p.grad = g
            if weighed:
                self._path.undo()
            self._grad_written = written_before
            raise
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
        params = self._params()
        if not params:
            raise ValueError("the wrapped optimizer holds no parameter that requires grad")
        setup = Setup(
            engine=self.engine,
            gramian_engine=self.gramian_engine,
            aggregator=self.aggregator,
            shared=self.shared_params,
            cross_rank=self.cross_rank,
            scaler=self.grad_scaler,
            process_group=self.process_group,
        )
        hooks = self.__dict__.get("_step_record_hooks")
        observe = bool(hooks) and not accumulate
        before, observing = self._path.record, self._path.observe
        self._path.observe = observing or observe
        try:
            with _autocast_off():
                vector = self._path.backward(losses, params, setup, accumulate)
        finally:
            self._path.observe = observing
        if observe and self._path.record is not before:  # this call weighed (no overflow skip)
            record = record_of(self._path.record, setup.scale())
            for hook in list(hooks.values()):
                hook(self, record)
        self._grad_written = self._grad_written or not accumulate
        return vector

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of the wrapped optimizer and delete any ``.jac`` left on them."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._grad_written = False
        for p in self._params():
            if hasattr(p, "jac"):
                del p.jac

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to the wrapped optimizer; it joins the next Jacobian."""
        self.optimizer.add_param_group(param_group)
        if self.gramian_engine is not None:
            self.gramian_engine.refresh()

    def remove_hooks(self) -> None:
        """Remove the Gramian engine's forward hooks (dropping the optimizer does it too); later
        steps differentiate every parameter exactly by batched VJPs."""
        if self.gramian_engine is not None:
            self.gramian_engine.remove_hooks()

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's ``state_dict`` plus one ``"jdoptim"`` key (aggregator state).

        ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` keeps only
        ``"state"`` and ``"param_groups"``: the ``"jdoptim"`` key is dropped there, so checkpoint a
        stateful aggregator's ``state_dict()`` separately when using DCP.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self.optimizer.state_dict()
        state_dict[_STATE_KEY] = {"aggregator": state_of(self.aggregator)}
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
        load_with(
            self.aggregator, extra, _STATE_KEY, lambda: self.optimizer.load_state_dict(state_dict)
        )
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


def _new_path(aggregator: object) -> Path | ScalarPath:
    """The route of ``backward``: the Jacobian path, or one plain backward for a scalarizer."""
    return ScalarPath() if isinstance(aggregator, Scalarizer) else Path()


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


def _trainable(optimizer: Optimizer) -> list[Tensor]:
    """The parameters that require grad, each once (torch warns about a parameter listed twice
    in a group and keeps it twice; its Jacobian columns and its ``.grad`` are counted once)."""
    params = {
        id(p): p for group in optimizer.param_groups for p in group["params"] if p.requires_grad
    }
    return list(params.values())
