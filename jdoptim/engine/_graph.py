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


# Nodes that only cast, transpose or reshape their single input: a parameter reached through one
# of them (autocast's cached cast of a weight, ``weight.t()``) is used once per use of that node.
_PASS_THROUGH = frozenset(
    {"ToCopyBackward0", "TBackward0", "ViewBackward0", "ReshapeAliasBackward0", "ExpandBackward0"}
)


class GraphWalk:
    """What one walk of the autograd graph of ``roots`` found.

    Attributes
    ----------
    records:
        ``(node, record)`` for each record stored under ``key`` in the metadata of a graph node
        (see :class:`jdoptim.engine._recording.Recorder`), in discovery order.
    uses:
        ``id(leaf) -> n``: the number of operations of the graph that use the leaf, counting
        through casts, transpositions and reshapes of it (a weight used by two layer calls has
        ``2`` even when autocast casts it once for both).
    """

    __slots__ = ("records", "uses")

    def __init__(self, roots: Sequence[Tensor], key: object) -> None:
        self.records: list[tuple[Any, Any]] = []
        parents: dict[Any, list[Any]] = {}
        leaves: dict[Any, int] = {}
        seen: set[Any] = set()
        stack = [root.grad_fn for root in roots if root.grad_fn is not None]
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            found = node.metadata.get(key)
            if found:
                self.records += [(node, record) for record in found]
            for child, _ in node.next_functions:
                if child is None:
                    continue
                parents.setdefault(child, []).append(node)
                variable = getattr(child, "variable", None)
                if variable is not None:
                    leaves[child] = id(variable)
                stack.append(child)

        def uses(node: Any) -> int:
            if node.name() not in _PASS_THROUGH or len(node.next_functions) != 1:
                return 1
            return sum(uses(parent) for parent in parents.get(node, ()))

        self.uses = {
            leaf: sum(uses(parent) for parent in parents[node]) for node, leaf in leaves.items()
        }
