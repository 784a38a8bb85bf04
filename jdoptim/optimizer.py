"""``JacobianOptimizer``: Jacobian descent as a drop-in ``torch.optim.Optimizer``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from jdoptim._aggregator_state import load_state_dict_into, state_dict_of
from jdoptim._distributed import resolve_group
from jdoptim._path import Setup, autocast_off
from jdoptim._path._engines import gramian_engine_for, trainable
from jdoptim._scalarized import check_scalarizer_options, path_for
from jdoptim._validation import (
    check_closure_losses,
    check_options,
    detached_losses,
    explaining_backpropagated_losses,
)
from jdoptim.aggregation import UPGrad
from jdoptim.diagnostics import StepRecord, StepRecordHooks
from jdoptim.engine import JacobianEngine
from jdoptim.scalarization import Scalarizer

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["JacobianOptimizer"]


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
        :class:`~jdoptim.scalarization.Scalarizer` instead combines the losses (as returned)
        into one scalar and runs one plain ``backward()``, so one training loop compares
        gradient-combining and loss-combining methods; its state is in :meth:`state_dict`, its
        per-step updates stay the user's calls (second example), and ``shared_params``,
        ``batch_dim``, ``path`` and ``accumulate=True`` need an aggregator.
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
        then costs one forward and one backward: per-layer Gramians in closed form (``Linear``,
        ``Conv1d``, ``Conv2d``, ``Embedding``, ``LayerNorm``, ``GroupNorm``), batched VJPs for
        the other parameters. Forward hooks on the modules that own this optimizer's parameters
        record each call in the graph of its output; they go with the optimizer or
        :meth:`remove_hooks` (see :doc:`/performance`). Losses that mix samples are rejected
        with an explanation (``BatchNorm`` in training mode, and ``mixing_check_every``).
    path:
        ``"auto"`` (default): with ``batch_dim``, the per-sample engine above; with
        ``shared_params`` and an aggregator that needs only the Gramian, the layer-Gramian engine
        (one batched backward of data gradients, each ``nn.Linear`` of the trunk in kernel form,
        found by the same hooks); otherwise the Jacobian engine (batched VJPs w.r.t. the
        parameters, no hook). ``"jacobian"`` forces the Jacobian engine; ``"gramian"`` a Gramian
        engine (layer-Gramian over all parameters without ``shared_params``) and needs a
        :class:`~jdoptim.aggregation.GramianWeightedAggregator`. Every path is exact.
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
    mixing_check_every:
        With ``batch_dim=0``: one more backward pass, of a random positive weighting of the
        losses, checks that they do not mix samples (batch-centred outputs, softmax or attention
        across the batch) and raises ``SampleMixingError`` otherwise, on the first per-sample
        backward and then every ``mixing_check_every`` of them (each micro-batch counts);
        ``None``: never. It costs one backward pass when it runs (see :doc:`/performance`).
    module:
        The model that holds the parameters, for the Gramian engines' hooks: the modules that
        own the optimizer's parameters are then found by walking ``module.modules()``. Without
        it they are found by a scan of the garbage collector's referrers, once at construction
        and at each ``add_param_group`` (tens to hundreds of ms, growing with the number of
        live Python objects: see :doc:`/performance`). It is held weakly: neither kept alive
        nor copied or pickled with the optimizer (a copy finds its owners by the scan).

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
        mixing_check_every: int | None = 100,
        module: torch.nn.Module | None = None,
        process_group: ProcessGroup | DeviceMesh | None = None,
    ) -> None:
        if isinstance(optimizer, JacobianOptimizer):
            raise TypeError("optimizer is already a JacobianOptimizer: do not wrap it twice")
        aggregator = UPGrad() if aggregator is None else aggregator
        if isinstance(aggregator, Scalarizer):
            check_scalarizer_options(shared_params, batch_dim, path)
        shared, cross_rank = check_options(
            optimizer,
            aggregator,
            shared_params,
            grad_scaler,
            batch_dim,
            path,
            cross_rank,
            mixing_check_every,
            module,
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
                "gramian_engine": gramian_engine_for(
                    optimizer,
                    aggregator,
                    shared,
                    batch_dim,
                    path,
                    parallel_chunk_size,
                    mixing_check_every,
                    module,
                ),
                "cross_rank": cross_rank,
                "process_group": group,
                **_fresh(aggregator),
            },
        )

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
            **_fresh(self.aggregator),  # copies and pickles keep no micro-batches, no hooks
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

        ``record`` is a :class:`~jdoptim.diagnostics.StepRecord` (the Gramian the aggregator used,
        the weights, the update's products with the loss gradients); when it is built and what
        it costs is in :mod:`jdoptim.diagnostics`. ``handle.remove()`` unregisters the hook.

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
        return self._step_record_hooks.register(hook)

    def _params(self) -> list[Tensor]:
        return trainable(self.optimizer)

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
                vector = None if losses is None else detached_losses(losses)
            else:
                check_closure_losses(losses, params, saved_grads)
                with explaining_backpropagated_losses():
                    vector = self.backward(losses)
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
            pieces) and writes nothing; the next call without ``accumulate`` (or :meth:`step`
            with a closure) combines every kept micro-batch with its own losses as
            ``cross_rank`` says (``"mean"``: the mean of the loss vectors; ``"concat"``: the rows
            stacked in call order), aggregates once and writes ``.grad``. ``zero_grad`` keeps
            what was accumulated; ``state_dict`` does not; a call that raises drops it. See
            :doc:`/distributed`.

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
        records = self._step_record_hooks.watching(self, self._path, not accumulate, setup.scale)
        with autocast_off(), records:
            vector = self._path.backward(losses, params, setup, accumulate)
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
        return state_dict_of(self, self.optimizer, self.aggregator)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state returned by :meth:`state_dict` (strictly: every key must match)."""
        load_state_dict_into(self, self.optimizer, self.aggregator, state_dict)


def _fresh(aggregator: object) -> dict[str, Any]:
    """What a new optimizer, a copy and an unpickled one start from: no kept micro-batches, no
    step-record hooks, no ``.grad`` written."""
    return {
        "_path": path_for(aggregator),  # kept micro-batches, the last step's record
        "_step_record_hooks": StepRecordHooks(),
        "_grad_written": False,  # by backward(), since the last step or zero_grad
    }
