"""The forward hook shared by the Gramian engines: find the layers that own our parameters."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from jdoptim.engine._jacobian import JacobianEngine


class RecordingEngine:
    """Base of the engines that record module calls through a global module forward hook.

    Subclasses say which modules they record (:meth:`_claims`, cached per module for the current
    parameter list) and what they keep of a call (:meth:`_record_call`). The hook does nothing when
    grad is disabled or the output does not require grad, and goes away with the engine.

    Parameters
    ----------
    params:
        A callable returning the parameters whose layers are recorded (it may grow with
        ``add_param_group``; it is re-read after each :meth:`clear`).
    parallel_chunk_size:
        Chunk size of the batched VJPs of the parameters without a closed form.
    """

    def __init__(
        self, params: Callable[[], list[Tensor]], parallel_chunk_size: int | None = None
    ) -> None:
        self._params = params
        self._fallback = JacobianEngine(parallel_chunk_size)
        self._owners: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
        self._param_ids: frozenset[int] | None = None  # None: re-read at the next record
        self._owned_ids: frozenset[int] = frozenset()  # the ids that _owners was built for
        self._handle: RemovableHandle | None = None
        self.clear()
        self.attach()

    def attach(self) -> None:
        """Install the global forward hook (done at construction)."""
        if self._handle is None:
            self_ref = weakref.ref(self)

            def hook(module: nn.Module, args: Any, output: Any) -> None:
                engine = self_ref()
                if engine is not None:
                    engine._record(module, args, output)

            self._handle = nn.modules.module.register_module_forward_hook(hook)
            weakref.finalize(self, self._handle.remove)

    def detach(self) -> None:
        """Remove the forward hook and forget every record."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.clear()

    def clear(self) -> None:
        """Forget the recorded calls; the parameter list is re-read at the next record."""
        self._param_ids = None

    def __getstate__(self) -> dict[str, Any]:
        return {"params": self._params, "chunk": self._fallback.parallel_chunk_size}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["params"], state["chunk"])

    def _owns(self, module: nn.Module) -> bool:
        """Whether ``module`` is one this engine records, for the current parameters."""
        if self._param_ids is None:
            ids = frozenset(id(p) for p in self._params())
            if ids != self._owned_ids:
                self._owned_ids = ids
                self._owners = weakref.WeakKeyDictionary()
            self._param_ids = ids
        owned = self._owners.get(module)
        if owned is None:
            owned = self._claims(module, self._param_ids)
            self._owners[module] = owned
        return owned

    def _record(self, module: nn.Module, args: Any, output: Any) -> None:
        if not torch.is_grad_enabled() or not args or not isinstance(output, Tensor):
            return
        if output.requires_grad:
            self._record_call(module, args[0], output)

    def _claims(self, module: nn.Module, param_ids: frozenset[int]) -> bool:
        raise NotImplementedError

    def _record_call(self, module: nn.Module, input: Any, output: Tensor) -> None:
        raise NotImplementedError
