"""Walks of the autograd graph."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor


def reachable_leaves(roots: Sequence[Tensor], stop_at: Iterable[Tensor] = ()) -> list[Tensor]:
    """Return the leaf tensors requiring grad that ``roots`` depend on, in discovery order.

    The walk does not go past the graph nodes of the tensors in ``stop_at`` (for instance shared
    features, to find the task-specific parameters of a loss).
    """
    stop_ids = {id(t) for t in stop_at}
    stop_nodes = {t.grad_fn for t in stop_at if t.grad_fn is not None}
    leaves: dict[int, Tensor] = {}
    stack = []
    for root in roots:
        if id(root) in stop_ids:
            continue
        if root.grad_fn is None:
            if root.requires_grad:
                leaves.setdefault(id(root), root)
        else:
            stack.append(root.grad_fn)
    seen = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in stop_nodes:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:  # an AccumulateGrad node: its variable is a leaf
            if id(variable) not in stop_ids:
                leaves.setdefault(id(variable), variable)
            continue
        stack.extend(child for child, _ in node.next_functions)
    return list(leaves.values())


def leaf_uses(roots: Sequence[Tensor]) -> tuple[dict[int, int], set[Any]]:
    """Count the graph edges into each leaf that ``roots`` depend on; return them and the nodes.

    The first result maps ``id(leaf)`` to the number of times the graph of ``roots`` uses the
    leaf (``1`` for a weight used by one layer call; ``2`` when it is tied or also used by a
    functional call). The second is the set of graph nodes reachable from ``roots``.
    """
    uses: dict[int, int] = {}
    seen: set[Any] = set()
    stack = [root.grad_fn for root in roots if root.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is None:
                continue
            variable = getattr(child, "variable", None)
            if variable is not None:
                uses[id(variable)] = uses.get(id(variable), 0) + 1
            stack.append(child)
    return uses, seen
