"""PBI: penalty-based boundary intersection (Zhang & Li, MOEA/D, 2007)."""

from __future__ import annotations

from torch import Tensor

from jdoptim.aggregation._hyper import Hyper
from jdoptim.scalarization._base import (
    Scalarizer,
    as_like,
    check_number,
    check_same_shape,
    norm,
    relative_to,
    tensor_setting,
)


class PBI(Scalarizer):
    r"""The distance along a preference direction plus a penalty on the distance to it.

    From *MOEA/D: A Multiobjective Evolutionary Algorithm Based on Decomposition*, Zhang & Li,
    IEEE TEVC 2007 (https://doi.org/10.1109/TEVC.2007.892759), Section III-C. With
    ``f = L - z^*`` and the unit direction ``\hat w = w / \lVert w \rVert``:

    .. math::

        d_1 = f^\top \hat w, \qquad d_2 = \lVert f - d_1 \hat w \rVert, \qquad
        g(L) = d_1 + θ\, d_2.

    ``d_2`` is computed exactly: where it is 0 (the values on the preference ray, or a single
    value) its gradient is undefined and the subgradient 0 is used, so the result is exact
    everywhere (TorchJD adds 1e-12 under the square root, which moves the result by up to 1e-6).

    Parameters
    ----------
    theta:
        The penalty ``θ >= 0`` (the paper uses 5; 0 is the projection on the direction).
    weights:
        ``w``, the preference direction, of the shape of the values, non-negative, not all 0.
    reference:
        ``z^*``, a lower bound of the values, of their shape; ``None`` is the origin.

    Examples
    --------
    >>> import torch
    >>> pbi = PBI(theta=5.0, weights=torch.tensor([1.0, 1.0]))
    >>> pbi(torch.tensor([1.0, 1.0]))  # on the ray: d1 = √2, d2 = 0
    tensor(1.4142)
    >>> pbi(torch.tensor([1.0, 0.0]))  # d1 = d2 = 1/√2
    tensor(4.2426)
    """

    theta = Hyper(lambda value: check_number("theta", value))
    weights = tensor_setting("weights")
    reference = tensor_setting("reference", optional=True)

    def __init__(self, theta: float, weights: Tensor, reference: Tensor | None = None) -> None:
        super().__init__()
        self.theta = theta
        self.weights = weights
        self.reference = reference

    def forward(self, values: Tensor, /) -> Tensor:
        check_same_shape("weights", self.weights, values)
        check_same_shape("reference", self.reference, values)
        shifted = relative_to(values, self.reference)
        f = shifted.flatten()
        w = as_like(self.weights, values).flatten()
        w_norm = norm(w)
        if float(w_norm) == 0.0:
            raise ValueError("PBI needs a non-zero preference direction, got weights = 0")
        direction = w / w_norm
        d1 = f @ direction
        perpendicular = f - d1 * direction
        return d1 + self.theta * norm(perpendicular)

    def extra_repr(self) -> str:
        return f"theta={self.theta}, weights={self.weights!r}, reference={self.reference!r}"
