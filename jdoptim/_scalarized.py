"""The route of a :class:`~jdoptim.JacobianOptimizer` built with a scalarizer: one plain backward.

The losses are combined into one scalar by the scalarizer and differentiated by one ordinary
``backward()`` (so DDP's gradient hooks, ``retain_graph`` rules and ``.grad`` accumulation are
torch's own). It has the interface of :class:`jdoptim._path.Path` (``backward``, ``undo``,
``bytes_sent``, ``record``), so the optimizer does not branch on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from jdoptim._aggregator_state import snapshot
from jdoptim._path import Path
from jdoptim._validation import as_loss_vector
from jdoptim.scalarization import Scalarizer


def path_for(aggregator: object) -> Path | ScalarPath:
    """The route of ``backward``: the Jacobian path, or one plain backward for a scalarizer."""
    return ScalarPath() if isinstance(aggregator, Scalarizer) else Path()


def check_scalarizer_options(shared_params: object, batch_dim: object, path: object) -> None:
    """Reject the options that only mean something for a Jacobian (with a precise message)."""
    given = [
        text
        for text, unset in (
            ("shared_params", shared_params is None),
            (f"batch_dim={batch_dim!r}", batch_dim is None),
            (f"path={path!r}", path == "auto"),
        )
        if not unset
    ]
    if given:
        raise ValueError(
            f"{', '.join(given)} needs an aggregator: a scalarizer combines the losses and one "
            "backward pass gives every parameter the gradient of the scalar"
        )


class ScalarPath:
    """``backward``: scalarize the losses, one ``backward()``; ``undo``: restore the state."""

    bytes_sent = 0
    record = None
    observe = False  # no Jacobian, so nothing for a step record to observe

    def __init__(self) -> None:
        self._saved: dict[str, Any] | None = None
        self._scalarizer: Scalarizer | None = None

    def backward(
        self, losses: Any, params: Sequence[Tensor], setup: Any, accumulate: bool
    ) -> Tensor:
        """Add the gradient of ``scalarizer(losses)`` to ``.grad``; return the detached losses.

        Under an enabled ``GradScaler`` the losses come scaled by ``s``: the scalarizer sees
        ``losses / s`` and the scalar is multiplied by ``s`` again, which is exact for every
        scalarizer (most are not linear).
        """
        del params  # one plain backward reaches whatever the losses depend on, as loss.backward()
        if accumulate:
            raise ValueError(
                "accumulate=True needs an aggregator: with a scalarizer, call backward on each "
                "micro-batch (the gradients add up in .grad) and step once"
            )
        scaler = setup.scaler
        scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
        scalarizer = setup.aggregator
        with torch.enable_grad():
            vector = as_loss_vector(losses, check_finite=scale == 1.0)
            values = vector.reshape(losses.shape) if isinstance(losses, Tensor) else vector
            self._saved, self._scalarizer = snapshot(scalarizer), scalarizer
            try:
                scalar = scalarizer(values / scale if scale != 1.0 else values)
                if not isinstance(scalar, Tensor) or scalar.numel() != 1:
                    raise ValueError(f"the scalarizer must return a scalar tensor, got {scalar!r}")
                (scalar.reshape(()) * scale).backward()
            except BaseException:
                self.undo()
                raise
        return vector.detach()

    def undo(self) -> None:
        """Give the scalarizer the state it had before the last ``backward`` (a failed step)."""
        if self._saved is not None and self._scalarizer is not None:
            self._scalarizer.load_state_dict(self._saved)
        self._saved = self._scalarizer = None
