"""The ``nn.Module`` base of every jdoptim method that has (or may have) state."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from torch import nn

__all__ = ["StateModule"]


class StateModule(nn.Module):
    """What aggregators, weightings and scalarizers share: ``reset``, an atomic load, a flat repr.

    Explicit state (not parameters or buffers) goes through torch's extra-state protocol: a
    stateful subclass overrides ``get_extra_state`` / ``set_extra_state`` and ``reset``.
    """

    def reset(self) -> None:
        """Forget the state accumulated over previous calls (no-op when stateless).

        Stateful methods override this and call ``super().reset()``, which resets the submodules.
        """
        for child in self.children():
            if isinstance(child, StateModule):
                child.reset()

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """``torch.nn.Module.load_state_dict``, except that a load that raises changes nothing."""
        previous = copy.deepcopy(self.state_dict())
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except BaseException:
            super().load_state_dict(previous)
            raise

    def extra_repr(self) -> str:
        """The constructor arguments shown by ``repr``."""
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"
