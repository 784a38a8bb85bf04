"""The aggregator's state, as checkpoints save and load it and as a failed step rolls it back."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any


def state_of(aggregator: object) -> dict[str, Any]:
    """The aggregator's ``state_dict()`` (empty for a plain callable or a stateless method)."""
    get = getattr(aggregator, "state_dict", None)
    return {} if get is None else get()


def snapshot(aggregator: object) -> dict[str, Any] | None:
    """A deep copy of a stateful aggregator's state; ``None`` when it has none."""
    state = state_of(aggregator)
    return copy.deepcopy(state) if state else None


def load_with(
    aggregator: object, saved: dict[str, Any] | None, key: str, load_inner: Callable[[], None]
) -> None:
    """Load ``saved`` (the checkpoint's ``key`` entry) into the aggregator, then ``load_inner``.

    Strict: a stateful aggregator needs the entry, a stateless one refuses state. A failure of
    either load leaves both as they were.
    """
    state = {} if saved is None else saved.get("aggregator", {})
    if saved is None and state_of(aggregator):
        raise KeyError(f"the state dict has no {key!r} key but {aggregator!r} is stateful")
    load = getattr(aggregator, "load_state_dict", None)
    if load is None and state:
        raise ValueError("the state dict holds aggregator state the aggregator cannot load")
    previous = copy.deepcopy(state_of(aggregator))
    try:
        if load is not None:
            load(state)
        load_inner()
    except BaseException:
        if load is not None:
            load(previous)
        raise


KEY = "jdoptim"  # the one key a JacobianOptimizer adds to its wrapped optimizer's state dict


def state_dict_of(owner: Any, inner: Any, aggregator: object) -> dict[str, Any]:
    """``inner.state_dict()`` plus ``{KEY: {"aggregator": ...}}``, through ``owner``'s
    state-dict hooks (as ``torch.optim.Optimizer.state_dict`` runs them)."""
    for pre_hook in owner._optimizer_state_dict_pre_hooks.values():
        pre_hook(owner)
    state_dict = inner.state_dict()
    state_dict[KEY] = {"aggregator": state_of(aggregator)}
    for post_hook in owner._optimizer_state_dict_post_hooks.values():
        result = post_hook(owner, state_dict)
        if result is not None:
            state_dict = result
    return state_dict


def load_state_dict_into(
    owner: Any, inner: Any, aggregator: object, state_dict: dict[str, Any]
) -> None:
    """Load a :func:`state_dict_of` result into ``inner`` and the aggregator, strictly, through
    ``owner``'s load-state-dict hooks; a failure leaves both as they were."""
    state_dict = dict(state_dict)
    for pre_hook in owner._optimizer_load_state_dict_pre_hooks.values():
        result = pre_hook(owner, state_dict)
        if result is not None:
            state_dict = result
    extra = state_dict.pop(KEY, None)
    load_with(aggregator, extra, KEY, lambda: inner.load_state_dict(state_dict))
    for post_hook in owner._optimizer_load_state_dict_post_hooks.values():
        post_hook(owner)
