"""COSMOS: linear scalarization with a cosine-similarity reward (Ruchte & Grabocka, 2021)."""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.aggregation._hyper import Hyper
from jdoptim.scalarization._base import (
    Scalarizer,
    as_like,
    check_number,
    check_same_shape,
    norm,
    tensor_setting,
)


class COSMOS(Scalarizer):
    r"""A weighted sum of the values minus a reward for their alignment with the preference.

    *Scalable Pareto Front Approximation for Deep Multi-Objective Learning*, Ruchte & Grabocka,
    ICDM 2021 (https://arxiv.org/abs/2103.13392), Equation 3:

    .. math::

        \sum_i r_i L_i - λ \frac{r^\top L}{\lVert r \rVert\, \lVert L \rVert},

    with preference ``r`` (``weights``) and penalty ``λ`` (``lambda_``). The second term is
    ``λ cos(r, L)``: it pulls the vector of losses towards the ray of ``r``, which spreads the
    solutions along the Pareto front as ``r`` varies. The paper samples ``r`` from a Dirichlet
    distribution at each step (``cosmos.weights = Dirichlet(α).sample()``) and also feeds ``r``
    to the model; that conditioning is the user's model's business.

    The cosine is computed without an epsilon: when all values are 0 it is taken as 0 (its
    gradient there is undefined), and it is exact at every other scale (TorchJD clamps the norm
    product at 1e-8, which changes the result for losses below about 1e-4).

    Parameters
    ----------
    lambda_:
        ``λ >= 0`` (0: linear scalarization; the paper uses 0.01 to 8).
    weights:
        ``r``, of the shape of the values, not all zero.

    Examples
    --------
    >>> import torch
    >>> cosmos = COSMOS(lambda_=1.0, weights=torch.tensor([0.5, 0.5]))
    >>> cosmos(torch.tensor([1.0, 1.0]))  # 1 - cos(r, L) = 1 - 1
    tensor(0.)
    >>> cosmos(torch.tensor([2.0, 0.0]))  # 1 - 1/√2
    tensor(0.2929)
    """

    lambda_ = Hyper(lambda value: check_number("lambda_", value))
    weights = tensor_setting("weights")

    def __init__(self, lambda_: float, weights: Tensor) -> None:
        super().__init__()
        self.lambda_ = lambda_
        self.weights = weights

    def forward(self, values: Tensor, /) -> Tensor:
        check_same_shape("weights", self.weights, values)
        r = as_like(self.weights, values).flatten()
        losses = values.flatten()
        r_norm = norm(r)
        if float(r_norm) == 0.0:
            raise ValueError("COSMOS needs a non-zero preference vector, got weights = 0")
        linear = r @ losses
        losses_norm = norm(losses)
        positive = losses_norm > 0
        safe = torch.where(positive, losses_norm, torch.ones_like(losses_norm))
        cosine = torch.where(positive, (r / r_norm) @ (losses / safe), torch.zeros_like(linear))
        return linear - self.lambda_ * cosine

    def extra_repr(self) -> str:
        return f"lambda_={self.lambda_}, weights={self.weights!r}"
