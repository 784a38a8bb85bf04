"""``JacobianOptimizer``: Jacobian descent as a drop-in ``torch.optim.Optimizer``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from jdoptim._aggregator_state import load_state_dict_into, state_dict_of
from jdoptim._path import autocast_off
from jdoptim._path._engines import trainable
from jdoptim._path._options import CONFIGURATION, configure, fresh, setup_of
from jdoptim._validation import (
    check_closure_losses,
    detached_losses,
    explaining_backpropagated_losses,
)
from jdoptim.diagnostics import StepRecord

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
    A failed ``backward`` or ``step`` changes nothing; parameters listed twice, of several dtypes
    or with sparse gradients: :ref:`optimizer-parameters`.

    Parameters
    ----------
    optimizer:
        The optimizer that applies the update (``SGD``, ``Adam``, ...).
    aggregator:
        Maps ``J`` to the update; :class:`~jdoptim.aggregation.UPGrad` by default. Any callable
        ``[m, n] -> [n]`` works; a :class:`~jdoptim.aggregation.GramianWeightedAggregator` lets the
        engine work from the Gramian ``J Jᵀ``. A :class:`~jdoptim.scalarization.Scalarizer`
        combines the losses into one scalar for one plain ``backward()`` instead
        (:ref:`optimizer-scalarizers`).
    shared_params:
        If given, the Jacobian is taken only w.r.t. these parameters (a shared trunk); every other
        parameter gets the plain gradient of the summed losses (task-specific heads).
    grad_scaler:
        The ``torch.amp.GradScaler`` of a mixed-precision loop: pass ``scaler.scale(losses)`` to
        :meth:`backward`, then ``scaler.step(opt)`` applies the exact fp32 aggregation (the
        Jacobian is unscaled before it); on overflow ``.grad`` is made non-finite: it skips.
    parallel_chunk_size:
        Number of Jacobian rows computed per batched backward pass (``None``: all at once).
    batch_dim:
        ``0`` declares per-sample losses: loss ``i`` depends only on sample ``i`` (row ``i`` of
        every batched tensor). With a Gramian aggregator a step then costs one forward and one
        backward, through forward hooks on the modules that own the parameters.
    path:
        ``"auto"`` (default): the cheapest exact engine (:ref:`choosing-the-engine`);
        ``"jacobian"``: batched VJPs, no hook; ``"gramian"``: a Gramian engine, which needs a
        :class:`~jdoptim.aggregation.GramianWeightedAggregator`.
    cross_rank:
        How the loss vectors of several ranks and of micro-batches (``accumulate=True``) form one
        global loss vector: their mean (``"mean"``) or their concatenation (``"concat"``);
        ``None`` (default): ``"concat"`` with ``batch_dim=0``, ``"mean"`` otherwise
        (:ref:`cross-rank-modes`).
    mixing_check_every:
        With ``batch_dim=0``: one more backward pass, on the first per-sample backward and then
        every ``mixing_check_every`` of them, checks that the losses do not mix samples
        (:ref:`sample-mixing`); ``None``: never.
    module:
        The model that holds the parameters, where the Gramian engines find the modules that own
        them; without it, a slower scan of the garbage collector's referrers (:ref:`owned-hooks`).
        Held weakly: neither kept alive nor copied or pickled with the optimizer.
    process_group:
        The ranks that exchange: a ``ProcessGroup`` or a 1-D ``DeviceMesh``; ``None`` (default):
        every process. Under FSDP2, the parameters' mesh (:ref:`fsdp2`).

    Raises
    ------
    TypeError
        An argument of the wrong type (an aggregator class, a ``JacobianOptimizer`` to wrap).
    ValueError
        An invalid value, or options that do not go together; the message names them.

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
        mixing_check_every: int | None = 100,
        module: torch.nn.Module | None = None,
        process_group: ProcessGroup | DeviceMesh | None = None,
    ) -> None:
        if isinstance(optimizer, JacobianOptimizer):
            raise TypeError("optimizer is already a JacobianOptimizer: do not wrap it twice")
        configuration = configure(
            optimizer,
            aggregator,
            shared_params,
            grad_scaler,
            parallel_chunk_size,
            batch_dim,
            path,
            cross_rank,
            mixing_check_every,
            module,
            process_group,
        )
        # Initialise like every Optimizer (hook dicts, patched step) without a second copy of
        # the parameter groups: those live in the wrapped optimizer.
        Optimizer.__setstate__(self, configuration)

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
        # Copies and pickles keep the configuration, but no micro-batches and no hooks.
        return {name: getattr(self, name) for name in CONFIGURATION} | fresh(self.aggregator)

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

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Compute the losses with ``closure``, write the aggregated ``.grad`` and step.

        Parameters
        ----------
        closure:
            Re-evaluates the model and returns the losses: a tensor of any shape (flattened) or a
            list/tuple of scalar tensors; called once, with grad enabled. Without a closure (or
            after :meth:`backward` wrote ``.grad``: :ref:`optimizer-closures`), only the wrapped
            optimizer's step runs, on ``.grad``.

        Returns
        -------
        Tensor or None
            The losses, flattened and detached; ``None`` without a closure.
        """
        if closure is None:
            self.optimizer.step()
            self._grad_written = False
            return None
        params = trainable(self.optimizer)
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
            ``True`` keeps this micro-batch's part and writes nothing; the next call without it
            (or :meth:`step` with a closure) combines the kept micro-batches with its own as
            ``cross_rank`` says, aggregates once and writes ``.grad``
            (:ref:`gradient-accumulation`).

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
        >>> x, y = torch.randn(8, 3), torch.randn(8, 2)  # two micro-batches of 4 samples
        >>> _ = opt.backward(((model(x[:4]) - y[:4]) ** 2).mean(dim=0), accumulate=True)
        >>> _ = opt.backward(((model(x[4:]) - y[4:]) ** 2).mean(dim=0))  # aggregates once
        >>> opt.step()
        """
        if not isinstance(accumulate, bool):
            raise TypeError(f"accumulate must be a bool, got {type(accumulate).__name__}")
        params = trainable(self.optimizer)
        if not params:
            raise ValueError("the wrapped optimizer holds no parameter that requires grad")
        setup = setup_of(self)
        records = self._step_record_hooks.watching(self, self._path, not accumulate, setup.scale)
        with autocast_off(), records:
            vector = self._path.backward(losses, params, setup, accumulate)
        self._grad_written = self._grad_written or not accumulate
        return vector

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of the wrapped optimizer and delete any ``.jac`` left on them."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._grad_written = False
        for p in trainable(self.optimizer):
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
        """The wrapped optimizer's ``state_dict`` plus one ``"jdoptim"`` key (aggregator state),
        which DCP's ``get_optimizer_state_dict`` drops: save a stateful aggregator's apart."""
        return state_dict_of(self, self.optimizer, self.aggregator)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state returned by :meth:`state_dict` (strictly: every key must match)."""
        load_state_dict_into(self, self.optimizer, self.aggregator, state_dict)
