"""DWA: dynamic weight average (Liu, Johns & Davison, CVPR 2019)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from jdoptim.aggregation._hyper import Hyper
from jdoptim.aggregation._random import check_state_keys
from jdoptim.scalarization._base import Scalarizer, check_number


class DWA(Scalarizer):
    r"""Weigh each loss by how slowly it has been decreasing over the last two epochs.

    *End-to-End Multi-Task Learning with Attention*, Liu, Johns & Davison, CVPR 2019
    (https://arxiv.org/abs/1803.10704), Equation 7. At epoch ``t``, with ``K`` values and
    ``\bar L_k(τ)`` the average of value ``k`` over the batches of epoch ``τ``:

    .. math::

        \sum_k λ_k(t) L_k, \qquad
        λ_k(t) = \frac{K \exp(r_k(t-1) / T)}{\sum_i \exp(r_i(t-1) / T)}, \qquad
        r_k(t-1) = \frac{\bar L_k(t-1)}{\bar L_k(t-2)}.

    The weights sum to ``K``; they are 1 during the first two epochs (no two averages yet). Each
    call adds the (detached) values to the current epoch's sums; call :meth:`step` once at the
    end of every epoch to close it. The state (the running sums, the number of batches and the
    last two averages, in float64) is in ``state_dict()`` and cleared by ``reset()``. The ratios
    assume losses that keep their sign (positive, as in the paper).

    Parameters
    ----------
    temperature:
        ``T > 0``; larger is more uniform (the paper uses 2).

    Examples
    --------
    >>> import torch
    >>> dwa = DWA(temperature=2.0)
    >>> for epoch_losses in ([2.0, 2.0], [1.0, 2.0]):  # task 0 halved, task 1 did not move
    ...     _ = dwa(torch.tensor(epoch_losses))
    ...     dwa.step()
    >>> dwa.weights(2)  # 2 softmax([0.5, 1] / 2): task 1 gets more weight
    tensor([0.8756, 1.1244], dtype=torch.float64)
    """

    temperature = Hyper(lambda value: check_number("temperature", value, positive=True))

    def __init__(self, temperature: float = 2.0) -> None:
        super().__init__()
        self.temperature = temperature
        self.reset()

    def weights(self, shape: int | tuple[int, ...] | torch.Size) -> Tensor:
        """The weights ``λ(t)`` of the current epoch (float64), for values of ``shape``."""
        size = torch.Size((shape,) if isinstance(shape, int) else shape)
        if len(self._averages) < 2:
            return torch.ones(size, dtype=torch.float64)
        older, newer = self._averages
        if older.shape != size:
            raise ValueError(
                f"DWA's averages have shape {tuple(older.shape)} but the values have shape "
                f"{tuple(size)}; call reset() to change the number of values"
            )
        rates = (newer / older).flatten()
        return (size.numel() * torch.softmax(rates / self.temperature, dim=0)).reshape(size)

    def forward(self, values: Tensor, /) -> Tensor:
        weights = self.weights(values.shape)
        current = values.detach().to(torch.float64).cpu()
        if self._sum is not None and self._sum.shape != current.shape:
            raise ValueError(
                f"DWA's running sums have shape {tuple(self._sum.shape)} but the values have "
                f"shape {tuple(current.shape)}; call reset() to change the number of values"
            )
        self._sum = current if self._sum is None else self._sum + current
        self._batches += 1
        return (weights.to(dtype=values.dtype, device=values.device) * values).sum()

    def step(self) -> None:
        """Close the current epoch: its average becomes the newest of the two kept."""
        if self._sum is None:
            return
        self._averages = [*self._averages, self._sum / self._batches][-2:]
        self._sum, self._batches = None, 0

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "sum": None if self._sum is None else self._sum.clone(),
            "batches": self._batches,
            "averages": [a.clone() for a in self._averages],
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        check_state_keys(state, {"sum", "batches", "averages"}, type(self).__name__)
        total, batches, averages = state["sum"], state["batches"], state["averages"]
        if not isinstance(batches, int) or batches < 0 or (total is None) != (batches == 0):
            raise ValueError(f"inconsistent DWA state: sum={total!r}, batches={batches!r}")
        if not isinstance(averages, list) or len(averages) > 2:
            raise ValueError(f"expected at most 2 averages, got {averages!r}")
        self._sum = None if total is None else total.detach().to(torch.float64).cpu().clone()
        self._batches = batches
        self._averages = [a.detach().to(torch.float64).cpu().clone() for a in averages]

    def reset(self) -> None:
        self._sum: Tensor | None = None
        self._batches = 0
        self._averages: list[Tensor] = []

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
