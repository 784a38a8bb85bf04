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


def replayable(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a call is self-attention (``q is k is v``) without masks, which the closed form
    replays; other calls of the module fall back to batched VJPs."""
    if not supports(module):
        return True
    q, k, v = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")])[:3]
    masks = ("key_padding_mask", "attn_mask")
    return (
        q is k
        and k is v
        and all(kwargs.get(n) is None for n in masks)
        and not kwargs.get("is_causal", False)
    )


def projections(module: nn.MultiheadAttention, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """``(O, G_qkv)`` of one self-attention call: the attention output before ``out_proj`` and
    the gradient w.r.t. the packed ``[Q K V]``, from input ``x`` and output gradient ``g``."""
    b, t, d = x.shape
    h = module.num_heads
    weight = module.in_proj_weight.detach().to(x.dtype)
    bias = None if module.in_proj_bias is None else module.in_proj_bias.detach().to(x.dtype)
    with torch.enable_grad():
        qkv = F.linear(x, weight, bias).requires_grad_()
        q, k, v = (z.reshape(b, t, h, d // h).transpose(1, 2) for z in qkv.chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        g_out = g @ module.out_proj.weight.detach().to(g.dtype)
        (g_qkv,) = torch.autograd.grad(out, qkv, g_out)
    return out.detach(), g_qkv
