"""Owned forward hooks: record the calls of the modules that own the optimizer's parameters.

A :class:`Recorder` registers one forward hook on each module that directly owns one of the
parameters (and that the engine can use), never a process-wide hook. The owners are found by a
walk of the module trees the caller names (the optimizer's ``module=``, autogram's modules) or,
without one, by a scan of the garbage collector's referrers. Each call of such a module,
run with grad enabled, leaves a small record (the module and its detached input) in the metadata
of the autograd node that produced its output. The record therefore lives exactly as long as the
graph: a forward that is never backpropagated leaves nothing behind once its outputs are dropped,
and ``zero_grad`` between the forward and the backward loses nothing. At the step, a walk of the
loss graph (:class:`jdoptim.engine._graph.GraphWalk`) finds the records, and the output gradients
are asked of autograd through the nodes' gradient edges.

The hooks hold the recorder weakly: dropping the engine (with its optimizer) removes them, and so
does :meth:`Recorder.remove`. Under ``torch.compile`` the hooks return at once (no graph break,
no side effect in the traced graph); the engine then differentiates every parameter exactly by
batched VJPs.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

if TYPE_CHECKING:
    from jdoptim.engine._jacobian import JacobianEngine


class Record:
    """One module call: the module, its detached first input (and the input's version at the
    call), where its output sits among the outputs of its graph node, and what else the engine's
    rule needs to replay the call from that input (``context``, e.g. attention's masks; ``None``
    when the call cannot be replayed)."""

    __slots__ = ("context", "input", "module", "output_nr", "shape", "version")

    def __init__(
        self, module: nn.Module, input: Any, output: Tensor, context: tuple[Any, ...] | None
    ) -> None:
        self.module, self.context = module, context
        self.input = input.detach() if isinstance(input, Tensor) else input
        self.version = input._version if isinstance(input, Tensor) else 0
        self.output_nr, self.shape = output.output_nr, output.shape

    @property
    def usable(self) -> bool:
        """Whether the engine's rule can replay the call."""
        return self.context is not None

    def intact(self) -> bool:
        """Whether the input was not modified in place since the call."""
        return not isinstance(self.input, Tensor) or self.input._version == self.version


def owning_modules(
    params: list[Tensor], roots: Sequence[nn.Module] | None = None
) -> list[nn.Module]:
    """The modules that hold one of ``params`` directly (in their ``_parameters``).

    With ``roots``, those among the roots and their submodules: a walk of the module trees.
    Without, parameters do not know their modules: the garbage collector's referrer lists lead
    from a parameter to the ``_parameters`` dict that holds it, then (through the module's
    ``__dict__`` or directly, depending on the Python version) to the module. Three scans of
    the whole heap: 60 ms for a 3-layer MLP in a bare process, 160 ms for a 12-layer
    Transformer encoder, 0.75 s for the latter with a million more objects alive (see
    :doc:`/performance`).
    """
    if roots is not None:
        ids = {id(p) for p in params}
        walked = {id(m): m for root in roots for m in root.modules()}
        return [m for m in walked.values() if any(id(p) in ids for p in m._parameters.values())]
    if not params:
        return []
    ids = {id(p) for p in params}
    found: dict[int, nn.Module] = {}
    frontier = [r for r in gc.get_referrers(*params) if type(r) is dict]
    for _ in range(2):
        if not frontier:
            break
        referrers = gc.get_referrers(*frontier)
        for r in referrers:
            if isinstance(r, nn.Module) and any(id(p) in ids for p in r._parameters.values()):
                found.setdefault(id(r), r)
        frontier = [r for r in referrers if type(r) is dict]
    return list(found.values())


def _remove(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


class Recorder:
    """Forward hooks on the modules that own ``params()`` and that ``accepts`` says to record.

    Parameters
    ----------
    params:
        A callable returning the parameters whose modules are recorded; re-read by
        :meth:`refresh` (after ``add_param_group``).
    accepts:
        Whether a module owning some of the parameters is recorded.
    replay:
        What a call ``(module, args, kwargs)`` needs besides its first input to be replayed
        (a tuple, kept in its :class:`Record`), or ``None`` when it cannot be (judged at the
        call, where the arguments' identities are known).
    roots:
        The modules whose trees hold the owners, held weakly (``None``: a heap scan finds
        them).

    Examples
    --------
    >>> import torch
    >>> from jdoptim.engine._graph import GraphWalk
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> recorder = Recorder(lambda: list(model.parameters()), lambda m: True, roots=[model])
    >>> out = model(torch.randn(5, 3))
    >>> [type(r.module).__name__ for _, r in GraphWalk([out], recorder.key).records]
    ['Linear', 'Linear']
    >>> recorder.remove()
    >>> len(model[0]._forward_hooks)
    0
    """

    def __init__(
        self,
        params: Callable[[], list[Tensor]],
        accepts: Callable[[nn.Module], bool],
        replay: Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], tuple[Any, ...] | None] = (
            lambda module, args, kwargs: ()
        ),
        roots: Sequence[nn.Module] | None = None,
    ) -> None:
        self._params, self._accepts, self._replay = params, accepts, replay
        # Held weakly: the optimizer does not keep the model alive, nor pickle or copy it.
        self._roots = None if roots is None else [weakref.ref(m) for m in roots]
        self.key = object()  # this recorder's entry in the graph nodes' metadata
        self._handles: list[RemovableHandle] = []
        self._finalizer = weakref.finalize(self, _remove, self._handles)
        self.refresh()

    @property
    def roots(self) -> list[nn.Module] | None:
        """The live modules to walk; ``None`` (a heap scan) when none was given or all died."""
        alive = [m for m in (ref() for ref in self._roots or []) if m is not None]
        return alive or None

    @property
    def modules(self) -> list[nn.Module]:
        """The modules currently hooked."""
        return [m for m in (ref() for ref in self._hooked) if m is not None]

    def refresh(self) -> None:
        """Hook the modules owning the current parameters (and only those)."""
        _remove(self._handles)
        hook = _Hook(weakref.ref(self))
        modules = [m for m in owning_modules(self._params(), self.roots) if self._accepts(m)]
        self._handles += [m.register_forward_hook(hook, with_kwargs=True) for m in modules]
        self._hooked = [weakref.ref(m) for m in modules]

    def remove(self) -> None:
        """Remove every hook; the recorder records nothing more until :meth:`refresh`."""
        _remove(self._handles)
        self._hooked = []

    def _record(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            output = output[0]
        if not args or not isinstance(output, Tensor) or output.grad_fn is None:
            return
        record = Record(module, args[0], output, self._replay(module, args, kwargs))
        output.grad_fn.metadata.setdefault(self.key, []).append(record)


class HookedEngine:
    """What the Gramian engines share: a :class:`Recorder` and the batched-VJP fallback.

    A copy or an unpickled engine is built again from its constructor's arguments (the state),
    and hooks its owners afresh by a scan: it may hold a copy of the model, or none.
    """

    _recorder: Recorder
    _fallback: JacobianEngine

    def refresh(self) -> None:
        """Hook the modules of the current parameters (after ``add_param_group``)."""
        self._recorder.refresh()

    def remove_hooks(self) -> None:
        """Remove the forward hooks; every parameter is then differentiated by batched VJPs."""
        self._recorder.remove()

    def __getstate__(self) -> dict[str, object]:
        chunk = self._fallback.parallel_chunk_size
        return {"params": self._recorder._params, "parallel_chunk_size": chunk}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(**state)  # type: ignore[misc]


class _Hook:
    """The forward hook: records through a weak reference to its recorder.

    A copy (``copy.deepcopy`` or pickling of the model it is registered on) is inert: the copied
    model is not this recorder's, and a recorder cannot be pickled.
    """

    __slots__ = ("recorder",)

    def __init__(self, recorder: weakref.ref[Recorder] | None = None) -> None:
        self.recorder = recorder

    def __call__(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if self.recorder is None or torch.compiler.is_compiling() or not torch.is_grad_enabled():
            return
        owner = self.recorder()
        if owner is not None:
            owner._record(module, args, kwargs, output)

    def __reduce__(self) -> tuple[type[_Hook], tuple[()]]:
        return (_Hook, ())
