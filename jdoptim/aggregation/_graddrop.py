"""GradDrop: gradient sign dropout (Chen et al., NeurIPS 2020)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from jdoptim.aggregation._bases import Aggregator
from jdoptim.aggregation._hyper import Hyper
from jdoptim.aggregation._random import RandomState, Seeded


def _identity(purity: Tensor) -> Tensor:
    return purity


def _check_leak(leak: Tensor | None) -> Tensor | None:
    if leak is None:
        return None
    if not isinstance(leak, Tensor):
        raise TypeError(f"leak must be a Tensor or None, got {type(leak).__name__}")
    if leak.ndim != 1 or not leak.is_floating_point():
        raise ValueError(f"leak must be a 1-D floating-point tensor, got {leak!r}")
    if not bool(((leak >= 0) & (leak <= 1)).all()):
        raise ValueError(f"leak must hold values in [0, 1], got {leak.tolist()}")
    return leak.detach().clone()


def _check_f(f: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    return f


class GradDrop(Seeded, Aggregator):
    r"""Keep, in each coordinate, only the gradient components of one randomly chosen sign.

    *Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout*, Chen, Ngiam,
    Huang, Luong, Kretzschmar, Chai & Anguelov, NeurIPS 2020 (https://arxiv.org/abs/2010.06808).
    For each column ``k`` of ``J`` (one parameter), with the positive sign purity ``P_k``, one
    uniform draw ``U_k ∈ [0, 1)`` shared by all rows, and the leak ``ℓ_i`` of row ``i``:

    .. math::

        P_k = \frac12 \Big(1 + \frac{\sum_i J_{ik}}{\sum_i |J_{ik}|}\Big), \qquad
        M_{ik} = \mathbb 1[f(P_k) > U_k]\, \mathbb 1[J_{ik} > 0]
               + \mathbb 1[f(P_k) < U_k]\, \mathbb 1[J_{ik} < 0],

    .. math::

        \mathcal A(J)_k = \sum_i \big(ℓ_i + (1 - ℓ_i) M_{ik}\big) J_{ik}.

    The paper applies the mask to the gradients of the losses with respect to an activation layer
    (summed over the batch), before back-propagating further; here it is applied to the columns of
    the Jacobian, i.e. to the gradients with respect to each parameter. A column that is all zero
    has no purity and contributes 0 (no epsilon is involved: ``P`` is a ratio, exact at any scale).

    Properties: random (one ``U`` per column and call, from a generator saved in ``state_dict``;
    ``reset()`` re-seeds it), positively homogeneous for given draws (purity and signs are
    scale-free), permutation invariant for given draws when ``leak`` is ``None`` (or permuted
    with the rows). Not Gramian-only (it acts coordinate by coordinate: not of the form ``Jᵀw``),
    not non-conflicting, not linear.

    Parameters
    ----------
    f:
        A monotone map applied elementwise to the purity tensor, with values in ``[0, 1]``
        (default: the identity).
    leak:
        The leak ``ℓ ∈ [0, 1]^m`` of each row (``None``: no leak, ``ℓ = 0``).
    seed:
        Seed of the generator of ``U`` (``None``: drawn from torch's global generator).

    Examples
    --------
    >>> import torch
    >>> from jdoptim.aggregation import GradDrop
    >>> J = torch.tensor([[1.0, 2.0, -1.0], [3.0, -2.0, -2.0]], dtype=torch.float64)
    >>> GradDrop(seed=0)(J)  # purities 1, 0.5, 0: the first and last columns keep every row
    tensor([ 4., -2., -3.], dtype=torch.float64)
    """

    f = Hyper(_check_f)
    leak = Hyper(_check_leak)

    def __init__(
        self,
        f: Callable[[Tensor], Tensor] = _identity,
        leak: Tensor | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.f = f
        self.leak = leak
        self._rng = RandomState(seed)

    def forward(self, matrix: Tensor, /) -> Tensor:
        m, n = matrix.shape
        if self.leak is not None and self.leak.shape[0] != m:
            raise ValueError(f"leak has {self.leak.shape[0]} entries but the matrix has {m} rows")
        uniform = torch.rand(n, generator=self._rng.generator, dtype=torch.float64)
        # Rounding to a narrower dtype can turn a draw just below 1 into 1 (about 3e-8 of the
        # draws in float32): keep U < 1, so that a pure column (f(P) = 1) is always kept.
        uniform = uniform.to(device=matrix.device, dtype=matrix.dtype)
        uniform = uniform.clamp(max=1.0 - torch.finfo(matrix.dtype).eps / 2)
        total = matrix.sum(dim=0)
        magnitude = matrix.abs().sum(dim=0)
        safe = torch.where(magnitude > 0, magnitude, torch.ones_like(magnitude))
        purity = (0.5 * (1 + total / safe)).clamp(0.0, 1.0)
        transformed = self.f(purity)
        if not isinstance(transformed, Tensor) or transformed.shape != purity.shape:
            raise ValueError(f"f must map the purity tensor of shape {(n,)} to the same shape")
        keep_positive = transformed > uniform
        keep_negative = transformed < uniform
        mask = (keep_positive & (matrix > 0)) | (keep_negative & (matrix < 0))
        kept = matrix * mask
        if self.leak is None:
            return kept.sum(dim=0)
        leak = self.leak.to(device=matrix.device, dtype=matrix.dtype)[:, None]
        return (leak * matrix + (1 - leak) * kept).sum(dim=0)

    def extra_repr(self) -> str:
        f_name = getattr(self.f, "__name__", repr(self.f))
        return f"f={f_name}, leak={self.leak!r}, seed={self._rng.seed}"
