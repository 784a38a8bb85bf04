r"""Closed forms of self-attention (``nn.MultiheadAttention``) per-sample gradients.

``nn.MultiheadAttention`` calls its projections functionally (its ``out_proj`` module is never
called), so no hook sees them. For batch-first self-attention with per-sample losses, both
projections are linear maps applied at ``T`` positions:

.. math::

    [Q\,K\,V]_i = X_i W_{in}ᵀ + b_{in}, \qquad Y_i = O_i W_{out}ᵀ + b_{out},

with ``O_i`` the attention output of sample ``i`` (before ``out_proj``). Given the recorded input
``X`` and the gradient ``Gₒ`` of the losses w.r.t. the layer output, one batched recomputation of
the attention (a forward and a backward of the fused kernel, no per-sample loop) gives ``O`` and
the gradient ``G_{qkv}`` w.r.t. the packed projection, and the ``[T, d]`` sequence form of
:mod:`jdoptim.engine._layer_rules` applies to both weights:
``G_{ij} = Σ_{t,s} (X_i X_jᵀ)_{ts} (G_{qkv,i} G_{qkv,j}ᵀ)_{ts}``, and likewise for ``(O, Gₒ)``.
The call's masks (``attn_mask``, 2-D or per sample and head, and ``key_padding_mask``; boolean
or additive) are recorded with it and replayed as the one additive mask that
``nn.MultiheadAttention`` forms from them: causal and padded self-attention keep the closed form
(a causal 2-layer encoder at B = 64 took 65x a plain step through batched VJPs, 2.4x now).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def supports(module: nn.Module) -> bool:
    """Whether ``module`` is a batch-first, packed ``nn.MultiheadAttention`` without extra
    key/value biases, dropout-free (or in eval mode), with its own ``forward``."""
    return (
        isinstance(module, nn.MultiheadAttention)
        and type(module).forward is nn.MultiheadAttention.forward
        and module.batch_first
        and module._qkv_same_embed_dim
        and module.bias_k is None
        and not module.add_zero_attn
        and (module.dropout == 0.0 or not module.training)
    )


_ARGUMENTS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")


def replay(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, ...] | None:
    """What a call needs to be replayed from its first input: ``()`` for every module but
    attention; for self-attention (``q is k is v``) its masks ``(attn_mask,
    key_padding_mask)`` (detached; ``()`` when it has none); ``None`` (not replayable: batched
    VJPs) for other attention calls.

    ``is_causal`` is only a hint in ``nn.MultiheadAttention``: the causal mask itself must be
    passed as ``attn_mask``, which is what the replay applies.
    """
    if not supports(module):
        return ()
    bound = dict(zip(_ARGUMENTS, args, strict=False)) | kwargs
    q, k, v = (bound.get(n) for n in _ARGUMENTS[:3])
    if not (q is k and k is v):
        return None
    masks = tuple(bound.get(n) for n in ("attn_mask", "key_padding_mask"))
    if all(mask is None for mask in masks):
        return ()
    return tuple(None if mask is None else mask.detach() for mask in masks)


def _additive_mask(
    attn_mask: Tensor | None, key_padding_mask: Tensor | None, b: int, h: int, dtype: torch.dtype
) -> Tensor | None:
    """The masks of a call as one additive ``[b or 1, h or 1, t, t]`` float mask, as
    ``nn.MultiheadAttention`` merges them (boolean ``True``: not attended, ``-inf``)."""
    merged = None
    for mask, shape in ((attn_mask, None), (key_padding_mask, (b, 1, 1, -1))):
        if mask is None:
            continue
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
                mask, -torch.inf
            )
        mask = mask.to(dtype)
        if shape is None:
            shape = (1, 1, *mask.shape) if mask.ndim == 2 else (b, h, *mask.shape[1:])
        mask = mask.reshape(shape)
        merged = mask if merged is None else merged + mask
    return merged


def projections(
    module: nn.MultiheadAttention,
    x: Tensor,
    g: Tensor,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(O, G_qkv)`` of one self-attention call: the attention output before ``out_proj`` and
    the gradient w.r.t. the packed ``[Q K V]``, from input ``x``, output gradient ``g`` and the
    call's masks."""
    b, t, d = x.shape
    h = module.num_heads
    weight = module.in_proj_weight.detach().to(x.dtype)
    bias = None if module.in_proj_bias is None else module.in_proj_bias.detach().to(x.dtype)
    with torch.enable_grad():
        qkv = F.linear(x, weight, bias).requires_grad_()
        q, k, v = (z.reshape(b, t, h, d // h).transpose(1, 2) for z in qkv.chunk(3, dim=-1))
        mask = _additive_mask(attn_mask, key_padding_mask, b, h, x.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, t, d)
        g_out = g @ module.out_proj.weight.detach().to(g.dtype)
        (g_qkv,) = torch.autograd.grad(out, qkv, g_out)
    return out.detach(), g_qkv
