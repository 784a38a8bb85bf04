r"""Closed forms of per-sample gradients, Gramians and weighted updates, layer by layer.

When loss ``i`` depends only on sample ``i``, the gradient of loss ``i`` w.r.t. a layer's weight
is a function of that sample's layer input and output gradient alone. For a linear map applied at
``T`` positions (a ``Linear`` on ``[B, T, d]``, a convolution after ``unfold``), with inputs
``A_i`` (``[T, d]``) and output gradients ``Gₒ_i`` (``[T, o]``):

.. math::

    ∇_W L_i = Gₒ_iᵀ A_i, \qquad
    G_{ij} = ⟨Gₒ_iᵀ A_i, Gₒ_jᵀ A_j⟩ = \sum_{t,s} (A_i A_jᵀ)_{ts} (Gₒ_i Gₒ_jᵀ)_{ts},
    \qquad \sum_i w_i ∇_W L_i = \sum_i w_i Gₒ_iᵀ A_i.

Each rule turns the recorded inputs and output gradients of one module into, for each of its
parameters, a :class:`PerSample` object with the Gramian block (float64, formed from rows scaled
by powers of two: see :mod:`jdoptim.engine._scaled`) and the weighted update.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jdoptim.engine import _attention as attention
from jdoptim.engine._scaled import (
    ScaledRows,
    add,
    coefficients,
    exponents,
    exponents_each,
    rescale,
    scale_rows,
    unscale_gramian,
)
from jdoptim.engine._tokens import token_gramian


@dataclass
class PerSample:
    """What the engine needs of one parameter: its float64 Gramian block and weighted update.

    ``update(w)`` is ``Σ_i w_i ∇L_i`` for float64 weights ``w``, in the rule's compute dtype.
    """

    gramian: Callable[[], Tensor]
    update: Callable[[Tensor], Tensor]


def _rows(
    per_sample: Tensor, shape: torch.Size, prescaled: bool = False, exps: Tensor | None = None
) -> PerSample:
    """A parameter whose per-sample gradients ``[B, *shape]`` are small enough to hold (already
    scaled by ``2^{-exps}`` when ``exps`` is given)."""
    rows = ScaledRows(per_sample, prescaled=prescaled, exps=exps)
    return PerSample(gramian=rows.gramian, update=lambda w: rows.combine(w).view(shape))


def _linear_map(
    inputs: Tensor,
    grads: Tensor,
    shape: torch.Size,
    bias: torch.Size | None = None,
    exps: list[Tensor | None] | None = None,
) -> tuple[PerSample, PerSample | None]:
    """Per-sample closed form of ``y_t = W a_t (+ b)`` over positions ``t``: ``inputs
    [B, T, d]``, ``grads [B, T, o]`` (or ``[B, d]``, ``[B, o]``: ``T = 1``); the weight has
    ``shape`` with ``o·d`` elements, the bias (if any) the shape ``bias``. Returns the rules of
    the weight and of the bias.

    Two exact ways to the weight's Gramian; the one with fewer operations is used. The kernel
    form ``Σ_{t,s} (A_i A_jᵀ)_{ts} (Gₒ_i Gₒ_jᵀ)_{ts}`` costs ``(BT)²(d + o)`` and never forms a
    per-sample gradient; materialising the ``B`` per-sample gradients ``Gₒ_iᵀ A_i`` costs
    ``BTod + B²od`` and ``B·o·d`` memory (small layers, long sequences). The bias's per-sample
    gradient is ``1ᵀ Gₒ_i``, so its Gramian ``Σ_{t,s} (Gₒ_i Gₒ_jᵀ)_{ts}`` reuses the kernel
    form's ``Gₒ Gₒᵀ`` (a quarter to a half of the Gramian's work at large ``B``).
    Inputs and gradients are scaled per sample by powers of two (:mod:`jdoptim.engine._scaled`),
    by ``exps`` when given (the :func:`exponents` of ``inputs`` and of ``grads``).
    """
    (b, d), o = (inputs.shape[0], inputs.shape[-1]), grads.shape[-1]
    t = 1 if inputs.ndim == 2 else inputs.shape[1]
    exps_a, exps_g = exponents_each([[inputs], [grads]]) if exps is None else exps
    scaled_a, scaled_g = scale_rows(inputs, exps_a), scale_rows(grads, exps_g)
    exps = add(exps_a, exps_g)
    summed_g = scaled_g if scaled_g.ndim == 2 else scaled_g.sum(dim=1)  # the bias's gradients
    bias_rule = None if bias is None else _rows(summed_g, bias, True, exps_g)
    if (b * t) ** 2 * (d + o) > b * t * o * d + b * b * o * d:
        g3, a3 = scaled_g.reshape(b, t, o), scaled_a.reshape(b, t, d)
        weight = _rows(torch.einsum("bto,btd->bod", g3, a3), shape, True, exps)
        return weight, bias_rule
    flat_a, flat_g = _flat(scaled_a), _flat(scaled_g)
    kernels: list[Tensor] = []  # G_o G_oᵀ, formed once for the weight and the bias

    def gg() -> Tensor:
        if not kernels:
            kernels.append(flat_g @ flat_g.T)
        return kernels[0]

    def per_sample(kernel: Tensor) -> Tensor:
        return kernel if t == 1 else kernel.view(b, t, b, t).sum(dim=(1, 3))

    def gramian() -> Tensor:
        return unscale_gramian(per_sample((flat_a @ flat_a.T) * gg()), exps)

    def weighted(w: Tensor) -> Tensor:
        coef, shift = coefficients(w, exps, flat_a.dtype)
        scaled = _flat(scaled_g * coef.view(b, *(1,) * (scaled_g.ndim - 1)))
        return rescale(scaled.T @ flat_a, shift).view(shape)

    if bias_rule is not None:
        bias_rule.gramian = lambda: unscale_gramian(per_sample(gg()), exps_g)
    return PerSample(gramian=gramian, update=weighted), bias_rule


def _weight_and_bias(
    inputs: Tensor,
    grads: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    prefix: str = "",
    exps: list[Tensor | None] | None = None,
) -> dict[str, PerSample]:
    """The rules of a linear map's ``weight`` and ``bias`` (named with ``prefix``)."""
    w, b = _linear_map(inputs, grads, weight.shape, None if bias is None else bias.shape, exps)
    return {f"{prefix}weight": w} | ({} if b is None else {f"{prefix}bias": b})


def _joined(pieces: list[Tensor]) -> Tensor:
    """The calls' pieces along dim 1 (no copy for a single call)."""
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


def _sequence(x: Tensor) -> Tensor:
    """``[B, *, d]`` → ``[B, T, d]``."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _flat(x: Tensor) -> Tensor:
    """``[B, T, d]`` → ``[B·T, d]`` (``[B, d]`` as it is: no dispatched view)."""
    return x if x.ndim == 2 else x.reshape(-1, x.shape[-1])


Calls = list[tuple[Tensor, ...]]
"""The ``(input, output gradient)`` pairs of every call of a module during one forward pass
(followed by the call's context, for attention: its masks)."""


def _linear(
    module: nn.Linear, calls: Calls, exps: list[Tensor | None] | None = None
) -> dict[str, PerSample]:
    """``exps``: the exponents of the groups :func:`exponent_groups` names, when known."""
    if len(calls) == 1 and calls[0][0].ndim == 2:  # [B, d]: no reshapes, T = 1
        return _weight_and_bias(calls[0][0], calls[0][1], module.weight, module.bias, exps=exps)
    a, g = (_joined([_sequence(c[i]) for c in calls]) for i in (0, 1))
    return _weight_and_bias(a, g, module.weight, module.bias, exps=exps)


def exponent_groups(module: nn.Module, calls: Calls) -> list[list[Tensor]]:
    """The pieces whose :func:`exponents` the rule of ``module`` takes as ``exps=`` (so that one
    host read serves a whole step): a ``Linear``'s inputs and its output gradients, whose rows
    hold the same values as the rule's concatenations; none for the other rules."""
    return [[c[0] for c in calls], [c[1] for c in calls]] if rule_for(module) is _linear else []


def _unfold(module: nn.Conv1d | nn.Conv2d, inputs: Tensor, grads: Tensor) -> tuple[Tensor, Tensor]:
    """Patches ``[B, L, C·k]`` and output gradients ``[B, L, out]`` of one convolution call."""
    if isinstance(module, nn.Conv1d):
        inputs, grads = inputs.unsqueeze(2), grads.unsqueeze(2)
        as_2d = lambda v: (1, v[0])  # noqa: E731
        pad = (0, module.padding[0])
    else:
        as_2d, pad = tuple, module.padding
    patches = F.unfold(
        inputs,
        kernel_size=as_2d(module.kernel_size),
        dilation=as_2d(module.dilation),
        padding=pad,
        stride=as_2d(module.stride),
    )
    return patches.transpose(1, 2), grads.flatten(2).transpose(1, 2)


def _conv(module: nn.Conv1d | nn.Conv2d, calls: Calls) -> dict[str, PerSample]:
    unfolded = [_unfold(module, x, y) for x, y in calls]
    a = _joined([u[0] for u in unfolded])
    g = _joined([u[1] for u in unfolded])
    return _weight_and_bias(a, g, module.weight, module.bias)


def _embedding(module: nn.Embedding, calls: Calls) -> dict[str, PerSample]:
    b = calls[0][0].shape[0]
    idx = _joined([x.reshape(b, -1) for x, _ in calls])
    g = _joined([y.reshape(b, -1, y.shape[-1]) for _, y in calls])
    if module.padding_idx is not None:
        g = g * (idx != module.padding_idx).unsqueeze(-1).to(g.dtype)
    exps = exponents([g])
    g = scale_rows(g, exps)
    shape, t = module.weight.shape, idx.shape[1]

    def gramian() -> Tensor:
        flat_i, flat_g = idx.reshape(-1), g.reshape(-1, g.shape[-1])
        return unscale_gramian(token_gramian(flat_i, flat_g, b, t), exps)

    def weighted(w: Tensor) -> Tensor:
        coef, shift = coefficients(w, exps, g.dtype)
        out = torch.zeros(shape, dtype=g.dtype, device=g.device)
        out.index_add_(0, idx.reshape(-1), (coef[:, None, None] * g).reshape(-1, shape[1]))
        return rescale(out, shift)

    return {"weight": PerSample(gramian=gramian, update=weighted)}


def _affine(module: nn.Module, per_call: list[tuple[Tensor, Tensor]]) -> dict[str, PerSample]:
    """Elementwise affine parameters from per-call ``(Σ g∘x̂, Σ g)`` per-sample gradients."""
    rules = {}
    if module.weight is not None:
        rules["weight"] = _rows(sum(w for w, _ in per_call), module.weight.shape)
    if module.bias is not None:
        rules["bias"] = _rows(sum(b for _, b in per_call), module.bias.shape)
    return rules


def _layer_norm(module: nn.LayerNorm, calls: Calls) -> dict[str, PerSample]:
    k = len(module.normalized_shape)
    per_call = []
    for x, y in calls:
        x_hat = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
        g = y.reshape(y.shape[0], -1, *y.shape[y.ndim - k :])
        per_call.append(((g * x_hat.reshape(g.shape)).sum(1), g.sum(1)))
    return _affine(module, per_call)


def _group_norm(module: nn.GroupNorm, calls: Calls) -> dict[str, PerSample]:
    per_call = []
    for x, y in calls:
        b, c = x.shape[:2]
        x_hat = F.group_norm(x, module.num_groups, None, None, module.eps).reshape(b, c, -1)
        g = y.reshape(b, c, -1)
        per_call.append(((g * x_hat).sum(2), g.sum(2)))
    return _affine(module, per_call)


def _self_attention(module: nn.MultiheadAttention, calls: Calls) -> dict[str, PerSample]:
    """Both projections of self-attention (see :mod:`jdoptim.engine._attention`)."""
    replayed = [attention.projections(module, *call) for call in calls]  # (x, g, *masks)
    x = _joined([call[0] for call in calls])
    g = _joined([call[1] for call in calls])
    o = _joined([r[0] for r in replayed])
    g_qkv = _joined([r[1] for r in replayed])
    rules = _weight_and_bias(x, g_qkv, module.in_proj_weight, module.in_proj_bias, "in_proj_")
    out = _weight_and_bias(o, g, module.out_proj.weight, module.out_proj.bias)
    return rules | {f"out_proj.{name}": rule for name, rule in out.items()}


def covered(module: nn.Module) -> list[tuple[str, Tensor]]:
    """The parameters whose per-sample gradients a module's rule gives, by name (attention's
    include its ``out_proj``'s, which it calls functionally)."""
    return list(module.named_parameters(recurse=attention.supports(module)))


Rule = Callable[[nn.Module, Calls], dict[str, PerSample]]


def _plain(module: nn.Module, base: type[nn.Module]) -> bool:
    """Whether ``module`` is a ``base`` whose ``forward`` is ``base``'s own."""
    return isinstance(module, base) and type(module).forward is base.forward


def rule_for(module: nn.Module) -> Rule | None:
    """Return the closed-form rule of ``module``, or ``None`` (exact fallback by batched VJPs).

    Subclasses that override ``forward`` get no rule: their calls may use the parameters
    differently.
    """
    if _plain(module, nn.Linear):
        return _linear
    if _plain(module, nn.Conv1d) or _plain(module, nn.Conv2d):
        supported = (
            module.groups == 1
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
        )
        return _conv if supported else None
    if _plain(module, nn.Embedding):
        return None if module.max_norm is not None else _embedding
    if _plain(module, nn.LayerNorm):
        return _layer_norm
    if _plain(module, nn.GroupNorm):
        return _group_norm
    if attention.supports(module):
        return _self_attention
    return None
