r"""A cheap check that per-sample losses do not mix samples.

With ``batch_dim=0`` the closed forms assume that loss ``i`` depends only on sample ``i``. Then,
for the output ``Y`` of any recorded layer (batch first) and any weights ``w``,

.. math::

    \frac{∂ (wᵀ L)}{∂ Y_i} = \sum_j w_j \frac{∂ L_j}{∂ Y_i} = w_i \frac{∂ L_i}{∂ Y_i}
    = w_i \frac{∂ (1ᵀ L)}{∂ Y_i},

so one more backward pass with random positive weights, compared row by row with the gradients
already captured, exposes losses that mix samples *above* a recorded layer (batch-centred
outputs, softmax or attention across the batch, a loss over several samples, BatchNorm in training
mode without affine parameters). Mixing below the first recorded layer (in the data) does not
change the per-sample gradients of the parameters and is not an error. The weights come from a
private generator: the check leaves the global RNG, the parameters and ``.grad`` untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class UnsupportedLayerError(RuntimeError):
    """Raised for layers whose per-sample gradients are not defined (they mix samples)."""


def mixes_samples(module: nn.Module) -> bool:
    """Whether ``module`` normalises with statistics of the whole batch (BatchNorm in training
    mode, or without running statistics), so that no per-sample loss depends on one sample."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and (
        module.training or module.running_mean is None
    )


def mixing_error(module: nn.Module) -> UnsupportedLayerError:
    """The error raised when a sample-mixing layer is in the graph of per-sample losses."""
    return UnsupportedLayerError(
        f"{type(module).__name__} in training mode normalises with statistics of the whole batch, "
        "so each per-sample loss depends on every sample and batch_dim=0 does not hold: put the "
        "layer in eval mode, use GroupNorm/LayerNorm, or build the optimizer without batch_dim"
    )


class SampleMixingError(UnsupportedLayerError):
    """The losses declared per-sample (``batch_dim=0``) depend on several samples."""


def check_per_sample(
    losses: Tensor,
    edges: Sequence[object],
    grads: Sequence[Tensor | None],
    modules: Sequence[nn.Module],
    *,
    keep: bool,
    seed: int = 0,
) -> None:
    """Raise :class:`SampleMixingError` if the gradients w.r.t. ``edges`` (the recorded layer
    outputs, whose gradients of ``losses.sum()`` are ``grads``) show that the losses mix samples.

    One backward pass of a random positive weighting of ``losses``; ``keep`` retains the graph.
    """
    generator = torch.Generator().manual_seed(seed)
    w = (torch.rand(losses.shape[0], generator=generator, dtype=torch.float64) + 0.5).to(
        device=losses.device, dtype=losses.dtype
    )
    second = torch.autograd.grad(
        losses, list(edges), grad_outputs=w, retain_graph=keep, allow_unused=True
    )
    checked = [
        (module, g, h)
        for module, g, h in zip(modules, grads, second, strict=True)
        if g is not None and h is not None and g.shape[:1] == w.shape
    ]
    if not checked:
        return
    with torch.no_grad():
        ratios = []
        for _, g, h in checked:
            expected = g.double() * w.double().view(-1, *[1] * (g.ndim - 1))
            diff = torch.linalg.vector_norm(h.double() - expected)
            scale = torch.linalg.vector_norm(expected) + torch.linalg.vector_norm(h.double())
            tol = torch.finfo(g.dtype).eps ** 0.5
            ratios.append(diff / (tol * scale).clamp_min(torch.finfo(torch.float64).tiny))
        # Non-finite gradients (a GradScaler overflow) prove nothing: the step reports them.
        worst = torch.stack(ratios).nan_to_num(nan=0.0, posinf=0.0)
        k = int(worst.argmax())
        if not bool(worst[k] <= 1):
            module, g, _ = checked[k]
            relative = float(worst[k]) * torch.finfo(g.dtype).eps ** 0.5
            raise SampleMixingError(_message(losses, module, relative))


def _message(losses: Tensor, module: nn.Module, relative: float) -> str:
    text = (
        f"batch_dim=0 declares that loss i depends only on sample i, but these losses mix "
        f"samples: the gradient of a random weighting of the losses w.r.t. the output of "
        f"{type(module).__name__} is not the same weighting of the per-sample gradients "
        f"(relative difference {relative:.2g}). Batch-centred outputs, softmax or attention "
        "across the batch, or a loss over several samples do this. Build the optimizer without "
        "batch_dim (the exact Jacobian path), or make each loss depend on its own sample only."
    )
    if _has_batch_norm(losses):
        text += (
            " The graph holds a batch normalisation: BatchNorm in training mode normalises with "
            "statistics of the whole batch; put it in eval mode or use GroupNorm/LayerNorm."
        )
    return text


def _has_batch_norm(losses: Tensor) -> bool:
    seen, stack = set(), [losses.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "BatchNorm" in node.name():
            return True
        stack.extend(child for child, _ in node.next_functions)
    return False
