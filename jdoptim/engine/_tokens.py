"""An embedding's per-sample Gramian, from its looked-up indices and output gradients."""

from __future__ import annotations

import torch
from torch import Tensor


def token_gramian(flat_i: Tensor, flat_g: Tensor, b: int, t: int) -> Tensor:
    """``Σ_{t,s} [i_{at} = i_{bs}] ⟨g_{at}, g_{bs}⟩`` for samples ``a, b``: an embedding's
    per-sample Gramian from its ``B·T`` looked-up indices and output gradients.

    Only positions holding the same index interact, so the positions are grouped by index and
    each group's ``n × n`` block of inner products is added into the ``B × B`` Gramian:
    ``Σ_v n_v² d`` operations (groups padded to the largest, ``U · n_max² · d``) instead of the
    kernel form's ``(BT)² d``, which stays the choice when one index fills most positions.
    """
    d = flat_g.shape[1]
    # One sort: positions in index order, then each index's group and its size.
    sorted_i, order = torch.sort(flat_i, stable=True)
    _, group, counts = torch.unique_consecutive(sorted_i, return_inverse=True, return_counts=True)
    n_max = int(counts.max())
    if counts.numel() * n_max * n_max * (d + 1) >= (b * t) ** 2 * (d + 2):
        kernel = (flat_i[:, None] == flat_i[None, :]).to(flat_g.dtype) * (flat_g @ flat_g.T)
        return kernel.view(b, t, b, t).sum(dim=(1, 3))
    pos = torch.arange(b * t, device=flat_g.device) - (torch.cumsum(counts, 0) - counts)[group]
    padded = flat_g.new_zeros(counts.numel(), n_max, d)
    padded[group, pos] = flat_g[order]
    # Padding positions belong to a dummy sample ``b``, dropped at the end.
    sample = torch.full((counts.numel(), n_max), b, dtype=torch.long, device=flat_g.device)
    sample[group, pos] = torch.arange(b, device=flat_g.device).repeat_interleave(t)[order]
    blocks = padded @ padded.transpose(1, 2)
    pairs = sample[:, :, None] * (b + 1) + sample[:, None, :]
    out = flat_g.new_zeros((b + 1) * (b + 1))
    out.index_add_(0, pairs.reshape(-1), blocks.reshape(-1))
    return out.view(b + 1, b + 1)[:b, :b]
