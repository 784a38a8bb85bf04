"""The random-number state of random methods (PCGrad's order, GradDrop's masks, ...)."""

from __future__ import annotations

from typing import Any

import torch


class RandomState:
    """A CPU ``torch.Generator`` owned by one method and saved in its ``state_dict``.

    With ``seed=None`` the seed is drawn from torch's global generator, so ``torch.manual_seed``
    makes a run reproducible; the generator's state is part of the optimizer's checkpoint, so a
    resumed run continues with the same random draws. Draw on the CPU with ``generator=`` and move
    the result to the device of the data.

    How this differs from TorchJD: its random methods draw from torch's global generator at each
    call, so their draws depend on everything else that uses it, and a checkpoint does not hold
    them. Here each method owns its generator: ``seed=`` fixes its draws whatever else runs, and
    its state travels in ``state_dict()`` (the method's ``_extra_state``), so a resumed run draws
    what the uninterrupted run would have drawn. With ``seed=None`` the two agree in one respect:
    ``torch.manual_seed`` before building the method makes a run reproducible.

    Parameters
    ----------
    seed:
        The seed of the generator, or ``None`` to draw one from the global generator.
    """

    def __init__(self, seed: int | None = None) -> None:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)))
        elif isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        """The generator's state, as a ``uint8`` tensor."""
        return {"rng_state": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state returned by :meth:`state_dict`."""
        check_state_keys(state_dict, {"rng_state"}, "RandomState")
        self.generator.set_state(state_dict["rng_state"])

    def reset(self) -> None:
        """Re-seed the generator with its initial seed."""
        self.generator.manual_seed(self.seed)


class Seeded:
    """Mixin for a method whose only state is its :class:`RandomState`, ``self._rng``."""

    _rng: RandomState

    def get_extra_state(self) -> dict[str, Any]:
        """The generator's state (see :meth:`RandomState.state_dict`)."""
        return self._rng.state_dict()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the generator's state saved by :meth:`get_extra_state`."""
        self._rng.load_state_dict(state)

    def reset(self) -> None:
        """Re-seed the generator with its initial seed."""
        self._rng.reset()


def check_state_keys(state_dict: dict[str, Any], expected: set[str], owner: str) -> None:
    """Raise a ``KeyError`` naming the missing and unexpected keys of a state dict (strict load)."""
    keys = set(state_dict)
    if keys != expected:
        raise KeyError(
            f"{owner}.load_state_dict: missing keys {sorted(expected - keys)}, "
            f"unexpected keys {sorted(keys - expected)}"
        )
