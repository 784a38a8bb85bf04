"""Validation of what users pass in: raised where the bad value enters, naming the problem."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from jdoptim.aggregation import GramianWeightedAggregator
from jdoptim.linalg._finite import all_finite


def as_loss_vector(losses: object, *, check_finite: bool = True) -> Tensor:
    """Return ``losses`` as a 1-D tensor that requires grad, or raise a precise error.

    Accepts a tensor of any shape (flattened) or a non-empty list/tuple of scalar tensors.
    """
    if isinstance(losses, (list, tuple)):
        if len(losses) == 0:
            raise ValueError("got an empty sequence of losses: expected at least one loss")
        for i, loss in enumerate(losses):
            if not isinstance(loss, Tensor):
                raise TypeError(
                    f"losses[{i}] is a {type(loss).__name__}: expected a scalar torch.Tensor"
                )
            if loss.numel() != 1:
                raise ValueError(
                    f"losses[{i}] has shape {tuple(loss.shape)}: each loss in a sequence must be "
                    "a scalar tensor (or return one tensor of losses instead of a sequence)"
                )
        vector = torch.stack([loss.reshape(()) for loss in losses])
    elif isinstance(losses, Tensor):
        vector = losses.reshape(-1)
    else:
        raise TypeError(
            f"expected the losses as a torch.Tensor or a list/tuple of scalar tensors, got "
            f"{type(losses).__name__} (does the closure return the losses?)"
        )
    if vector.numel() == 0:
        raise ValueError("got an empty loss tensor: expected at least one loss")
    if not vector.is_floating_point():
        raise TypeError(f"losses must be floating-point, got dtype {vector.dtype}")
    if not vector.requires_grad:
        raise ValueError(
            "the losses do not require grad: were they computed under torch.no_grad(), "
            "detached, or from parameters with requires_grad=False?"
        )
    if check_finite and not all_finite([vector.detach()]):
        bad = (~torch.isfinite(vector.detach())).nonzero().flatten()
        raise ValueError(
            f"the losses contain NaN or inf at indices {bad.tolist()[:10]}: "
            f"values {vector.detach()[bad[:10]].tolist()}"
        )
    return vector


def check_options(
    optimizer: object,
    aggregator: object,
    shared_params: Iterable[Tensor] | None,
    grad_scaler: object,
    batch_dim: object,
    path: object,
    cross_rank: object,
    mixing_check_every: object = 100,
    module: object = None,
) -> tuple[list[Tensor] | None, str]:
    """Check ``JacobianOptimizer``'s arguments; return the shared parameters and ``cross_rank``.

    A parameter listed twice in ``shared_params`` is one parameter (kept once).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer instance, got {type(optimizer).__name__}"
        )
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if isinstance(aggregator, type):
        raise TypeError(
            f"aggregator must be an instance, got the class {aggregator.__name__}: "
            f"pass {aggregator.__name__}() instead"
        )
    if not callable(aggregator):
        raise TypeError(f"aggregator must be callable, got {type(aggregator).__name__}")
    if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
        raise TypeError(
            f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}"
        )
    shared = None
    if shared_params is not None:
        shared = list({id(p): p for p in as_tensor_list(shared_params, "shared_params")}.values())
        for i, p in enumerate(shared):
            if id(p) not in owned:
                raise ValueError(
                    f"shared_params[{i}] (shape {tuple(p.shape)}) is not a parameter of the "
                    "wrapped optimizer"
                )
        if not shared:
            raise ValueError("shared_params is empty")
    if batch_dim is not None and (isinstance(batch_dim, bool) or batch_dim != 0):
        raise ValueError(
            f"batch_dim must be 0 (batch-first per-sample losses) or None, got {batch_dim!r}"
        )
    if mixing_check_every is not None and (
        isinstance(mixing_check_every, bool)
        or not isinstance(mixing_check_every, int)
        or mixing_check_every < 1
    ):
        raise ValueError(
            "mixing_check_every must be a positive int (check on the first per-sample step, "
            f"then every that many steps) or None (never check), got {mixing_check_every!r}"
        )
    if module is not None:
        if not isinstance(module, torch.nn.Module):
            raise TypeError(
                f"module must be a torch.nn.Module or None, got {type(module).__name__}"
            )
        if not any(id(p) in owned for p in module.parameters()):
            raise ValueError(
                f"module ({type(module).__name__}) holds none of the wrapped optimizer's "
                "parameters: pass the model whose parameters the optimizer trains"
            )
    if path not in ("auto", "jacobian", "gramian"):
        raise ValueError(f"path must be 'auto', 'jacobian' or 'gramian', got {path!r}")
    if cross_rank is None:
        cross_rank = "concat" if batch_dim is not None else "mean"
    if cross_rank not in ("mean", "concat"):
        raise ValueError(f"cross_rank must be 'mean', 'concat' or None, got {cross_rank!r}")
    if path == "gramian" and not isinstance(aggregator, GramianWeightedAggregator):
        raise ValueError(
            f"path='gramian' needs an aggregator that works from the Gramian "
            f"(a GramianWeightedAggregator), got {aggregator!r}"
        )
    return shared, cross_rank  # type: ignore[return-value]


CLOSURE_HABIT = (
    "JacobianOptimizer needs the losses themselves: return them from the closure (a vector, "
    "or a list of scalar losses) without calling loss.backward(); for the two-phase form, call "
    "opt.backward(losses) and then opt.step()"
)


def check_closure_losses(
    losses: object, params: Sequence[Tensor], saved_grads: Sequence[Tensor | None]
) -> None:
    """Raise if the closure returned nothing or wrote ``.grad`` itself (``loss.backward()``)."""
    written = [
        i
        for i, (p, g) in enumerate(zip(params, saved_grads, strict=True))
        if p.grad is not None and p.grad is not g
    ]
    if losses is None:
        raise TypeError(
            "expected the losses, got NoneType (does the closure return the losses?): "
            f"{CLOSURE_HABIT}"
        )
    if written:
        raise RuntimeError(
            f"the closure wrote .grad of {len(written)} parameter(s) itself (did it call "
            f"loss.backward()?): {CLOSURE_HABIT}"
        )


@contextlib.contextmanager
def explaining_backpropagated_losses() -> Iterator[None]:
    """Say what to do when the closure's losses were already backpropagated (autograd's
    "backward through the graph a second time")."""
    try:
        yield
    except RuntimeError as e:
        if "backward through the graph a second time" not in str(e):
            raise
        raise RuntimeError(
            f"{CLOSURE_HABIT} (the closure's losses were already backpropagated: {e})"
        ) from e


def detached_losses(losses: Any) -> Tensor:
    """The losses a closure returned, flattened and detached (no check: already weighed)."""
    if isinstance(losses, (list, tuple)):
        return torch.stack([torch.as_tensor(loss).detach().reshape(()) for loss in losses])
    return torch.as_tensor(losses).detach().reshape(-1)


def as_tensor_list(tensors: Tensor | Iterable[Tensor], what: str) -> list[Tensor]:
    """Return ``tensors`` (one tensor or an iterable of them) as a list, checking each item."""
    items = [tensors] if isinstance(tensors, Tensor) else list(tensors)
    for i, t in enumerate(items):
        if not isinstance(t, Tensor):
            raise TypeError(f"{what}[{i}] is a {type(t).__name__}, expected a torch.Tensor")
    return items


def check_requires_grad(tensors: Sequence[Tensor], what: str) -> None:
    """Raise if any tensor of ``tensors`` does not require grad."""
    for i, t in enumerate(tensors):
        if not t.requires_grad:
            raise ValueError(f"{what}[{i}] (shape {tuple(t.shape)}) does not require grad")


class NonFiniteError(ValueError):
    """Gradients or updates hold NaN or inf (under a ``GradScaler``: an overflow, skipped)."""


def check_finite_jacobians(jacobians: Sequence[Tensor | None]) -> None:
    """Raise a :class:`NonFiniteError` naming the rows of the Jacobian that hold NaN or inf."""
    present = [(k, j) for k, j in enumerate(jacobians) if j is not None]
    if all_finite([j for _, j in present]):
        return
    for k, j in present:
        finite_rows = torch.isfinite(j.reshape(j.shape[0], -1)).all(dim=1)
        if not bool(finite_rows.all()):
            rows = (~finite_rows).nonzero().flatten().tolist()
            raise NonFiniteError(
                f"the Jacobian w.r.t. tensor {k} (shape {tuple(j.shape[1:])}) holds NaN or inf "
                f"in the rows of losses {rows[:10]}"
            )


def check_dense_gradients(losses: Tensor, params: Sequence[Tensor]) -> None:
    """Raise if the graph of ``losses`` gives a parameter of ``params`` a sparse gradient.

    ``nn.Embedding(sparse=True)``, ``nn.EmbeddingBag(sparse=True)`` and their functional forms
    save ``sparse=True`` on their graph node; the Jacobian engines need dense rows.
    """
    index = {id(p): k for k, p in enumerate(params)}
    seen: set[object] = set()
    stack = [losses.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        children = [child for child, _ in node.next_functions]
        if getattr(node, "_saved_sparse", False) is True:
            for child in children:
                k = index.get(id(getattr(child, "variable", None)), -1)
                if k >= 0:
                    raise ValueError(
                        f"parameter {k} of the optimizer (shape {tuple(params[k].shape)}) gets a "
                        f"sparse gradient from {node.name()}: jdoptim differentiates dense "
                        "Jacobian rows; build the layer with sparse=False (or use batch_dim=0, "
                        "whose per-sample engine supports sparse embeddings)"
                    )
        stack.extend(children)
