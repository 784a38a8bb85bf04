"""Base classes of the aggregation package.

An :class:`Aggregator` turns a Jacobian matrix ``J`` of shape ``[m, n]`` (one row per loss) into an
update vector of shape ``[n]``. Most methods of the literature are *weightings*: they compute a
weight vector ``w`` of shape ``[m]`` and return ``Jᵀ w``. Those whose weights depend on ``J`` only
through its Gramian ``G = J Jᵀ`` are :class:`GramianWeightedAggregator` instances; the engine then
never needs to concatenate ``J`` and computes ``G`` and ``Jᵀ w`` block by block.

Aggregators and weightings are ``torch.nn.Module`` instances, so ``register_forward_hook`` sees
their inputs and outputs (the Jacobian or Gramian, the update or the weights). Calls run under
``torch.no_grad()``: the aggregation is not differentiated.

State. A stateful method (an exponential average, a step counter, a random generator) keeps its
state as plain attributes allocated when it is built, and exposes it through ``torch.nn.Module``'s
*extra state* protocol: ``get_extra_state()`` returns it as a dict of tensors and Python values,
``set_extra_state(state)`` validates and restores it, and ``reset()`` forgets it. So the standard
``state_dict()`` / ``load_state_dict()`` carry it under an ``"_extra_state"`` key (prefixed by the
submodule's name, e.g. ``"gramian_weighting._extra_state"``): a checkpoint of a model holding an
aggregator, or of a :class:`~jdoptim.JacobianOptimizer`, restores it bit for bit into a freshly
built instance, and ``load_state_dict`` is strict and leaves the state unchanged when it raises.
Stateless methods have an empty ``state_dict()``. There are no parameters or buffers: the state
follows the device of the inputs and stays in float64, so ``.to()`` has nothing to move (it returns
the module, as for any module without tensors).

Why not keep a ``state_dict()`` of our own: a parent module calls its children's ``state_dict``
with ``destination``/``prefix``/``keep_vars`` and loads them through ``_load_from_state_dict``, so
a method of another signature or meaning breaks any model (a ``LightningModule``, say) that holds
an aggregator as an attribute. The extra-state hooks are torch's documented place for state that
is not parameters or buffers, and they keep the state explicit and allocated at construction.
Subclasses call ``super().__init__()`` first, as every ``nn.Module``.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from torch import Tensor

from jdoptim._module import StateModule
from jdoptim.linalg import gramian, trim_gramian
from jdoptim.linalg._finite import all_finite

__all__ = [
    "Aggregator",
    "GramianWeightedAggregator",
    "WeightedAggregator",
    "Weighting",
    "check_gramian",
    "check_matrix",
    "checked_finite",
    "gramian_of",
]

# The matrix (with its version) whose entries the caller has just found finite: see checked_finite.
_FINITE: ContextVar[tuple[Tensor, int] | None] = ContextVar("_FINITE", default=None)


@contextlib.contextmanager
def checked_finite(matrix: Tensor) -> Iterator[None]:
    """Within the block, :func:`check_matrix` does not read ``matrix`` again for NaN and inf:
    the caller has just checked it (this tensor, while unmodified in place; any other tensor is
    checked as usual). The Gramian engines check their Gramian once, with their own error, then
    hand it to the aggregator and its weighting, which would each check it again."""
    token = _FINITE.set((matrix, matrix._version))
    try:
        yield
    finally:
        _FINITE.reset(token)


def check_matrix(matrix: Tensor) -> None:
    """Raise a ``ValueError`` unless ``matrix`` is a finite floating-point ``[m, n]`` tensor."""
    if not isinstance(matrix, Tensor):
        raise TypeError(f"expected a torch.Tensor matrix, got {type(matrix).__name__}")
    if matrix.ndim != 2:
        raise ValueError(f"expected a matrix of shape [m, n], got shape {tuple(matrix.shape)}")
    if not matrix.is_floating_point():
        raise ValueError(f"expected a floating-point matrix, got dtype {matrix.dtype}")
    trusted = _FINITE.get()
    if trusted is not None and trusted[0] is matrix and trusted[1] == matrix._version:
        return
    if not all_finite([matrix]):
        raise ValueError("the matrix contains NaN or inf values")


def check_gramian(gramian: Tensor) -> None:
    """Raise a ``ValueError`` unless ``gramian`` is a finite, square floating-point matrix."""
    check_matrix(gramian)
    if gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"expected a square Gramian, got shape {tuple(gramian.shape)}")


def gramian_of(matrix: Tensor) -> Tensor:
    """The Gramian ``J Jᵀ`` of a matrix, as the weightings of Gramian-based aggregators see it.

    It is formed in float64 by :func:`jdoptim.linalg.gramian` (no overflow or underflow for any
    finite float32, float16 or bfloat16 ``J``: entries near ``1e19`` or ``1e-23`` in float32
    included), and :func:`jdoptim.linalg.trim_gramian` removes the directions that the rounding
    of ``J`` to its dtype creates (a no-op in float64).
    """
    return trim_gramian(gramian(matrix), torch.finfo(matrix.dtype).eps)


_SAFE_EXPONENT = 450  # float64 entries within 2^±450: every product of two fits float64


def _scale_free(weighting: Weighting) -> bool:
    """Whether the claims table says the aggregator of ``weighting`` is positively homogeneous
    and stateless: then ``Jᵀ W((sJ)(sJ)ᵀ) = Jᵀ W(J Jᵀ)`` for every ``s > 0``."""
    from jdoptim.aggregation._claims import CLAIMS  # the table imports this module

    return any(c.weighting is type(weighting) and c.homogeneous and c.stateless for c in CLAIMS)


def _in_gramian_range(matrix: Tensor, weighting: Weighting) -> Tensor:
    """``J`` divided by the power of two that brings its largest entry into ``[1/2, 1)``, when
    ``J Jᵀ`` would overflow or underflow float64 (float64 entries beyond ``2^±450``, e.g. rows
    near ``1e±154``) and the aggregator is homogeneous and stateless (its update is then the
    same, weight for weight); otherwise ``J`` itself. Exact: only the exponents change.

    A narrower dtype never needs it: its Gramian is formed in float64.
    """
    if matrix.dtype != torch.float64 or matrix.numel() == 0:
        return matrix
    exponent = int(torch.frexp(matrix.abs().amax()).exponent)  # 0 for a zero matrix
    if abs(exponent) <= _SAFE_EXPONENT or not _scale_free(weighting):
        return matrix
    half = exponent // 2  # two factors: 2^-exponent alone may not be representable
    return matrix * 2.0**-half * 2.0 ** (half - exponent)


class Weighting(StateModule, ABC):
    """Maps a statistic of the Jacobian to a weight vector of shape ``[m]``.

    Subclasses implement :meth:`forward`. A weighting used by a :class:`GramianWeightedAggregator`
    receives the Gramian ``J Jᵀ``; one used by a :class:`WeightedAggregator` receives ``J`` itself.
    """

    @abstractmethod
    def forward(self, stat: Tensor, /) -> Tensor:
        """Return the weights, of shape ``[m]``, for the statistic ``stat``."""

    def __call__(self, stat: Tensor, /) -> Tensor:
        """Run :meth:`forward` and the forward hooks, without recording gradients."""
        with torch.no_grad():
            return super().__call__(stat)


class Aggregator(StateModule, ABC):
    """Maps a Jacobian ``J`` of shape ``[m, n]`` to an update of shape ``[n]``.

    Calling an aggregator validates its input (a finite floating-point matrix) and then runs
    :meth:`forward` and the forward hooks, without recording gradients.
    """

    @abstractmethod
    def forward(self, matrix: Tensor, /) -> Tensor:
        """Return the aggregation of ``matrix`` (already validated)."""

    def __call__(self, matrix: Tensor, /) -> Tensor:
        """Validate ``matrix``, then run :meth:`forward` and the hooks, without gradients."""
        check_matrix(matrix)
        with torch.no_grad():
            return super().__call__(matrix)


class WeightedAggregator(Aggregator):
    """An aggregator of the form ``A(J) = Jᵀ W(J)`` for a weighting ``W`` of the matrix.

    Parameters
    ----------
    weighting:
        ``W``, applied to the matrix; available as the ``weighting`` submodule.
    """

    def __init__(self, weighting: Weighting) -> None:
        if not isinstance(weighting, Weighting):
            raise TypeError(f"expected a Weighting, got {type(weighting).__name__}")
        super().__init__()
        self.weighting = weighting

    def weights(self, matrix: Tensor) -> Tensor:
        """Return the weights ``W(J)`` of shape ``[m]``."""
        return self.weighting(matrix)

    def forward(self, matrix: Tensor, /) -> Tensor:
        return self.weights(matrix) @ matrix

    def extra_repr(self) -> str:
        return self.weighting.extra_repr()


class _GramianComposition(Weighting):
    """The weighting ``J ↦ W(J Jᵀ)`` of a :class:`GramianWeightedAggregator` (its ``weighting``).

    The Gramian weighting is held but not registered as a submodule: it is registered once, as the
    aggregator's ``gramian_weighting``, so that its state appears once in ``state_dict``.
    """

    def __init__(self, gramian_weighting: Weighting) -> None:
        super().__init__()
        self.__dict__["_gramian_weighting"] = gramian_weighting

    def forward(self, matrix: Tensor, /) -> Tensor:
        weighting = self._gramian_weighting
        return weighting(gramian_of(_in_gramian_range(matrix, weighting))).to(matrix.dtype)

    def extra_repr(self) -> str:
        return repr(self._gramian_weighting)


class GramianWeightedAggregator(WeightedAggregator):
    """An aggregator ``A(J) = Jᵀ W(J Jᵀ)`` whose weights depend on ``J`` only through its Gramian.

    The engine recognises this class and computes the Gramian block by block instead of the
    concatenated Jacobian, then calls :meth:`weights_from_gramian`.

    Parameters
    ----------
    gramian_weighting:
        ``W``, applied to the Gramian; available as the ``gramian_weighting`` submodule (hook it to
        see the weights on every path). The ``weighting`` submodule is ``J ↦ W(J Jᵀ)``.
    """

    def __init__(self, gramian_weighting: Weighting) -> None:
        if not isinstance(gramian_weighting, Weighting):
            raise TypeError(f"expected a Weighting, got {type(gramian_weighting).__name__}")
        super().__init__(_GramianComposition(gramian_weighting))
        self.gramian_weighting = gramian_weighting

    @property
    def observes_matrix(self) -> bool:
        """Whether forward hooks (or pre-hooks) are registered on the aggregator itself.

        They receive ``J``, so the Jacobian path then forms ``J`` and calls the aggregator instead
        of working from the Gramian block by block (same update; hooks on ``gramian_weighting``
        fire either way). The Gramian engines of :class:`~jdoptim.JacobianOptimizer` (``batch_dim``,
        ``path="gramian"``) never form ``J``: there, hook ``gramian_weighting``.
        """
        return bool(self._forward_hooks or self._forward_pre_hooks)

    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        """Return the weights ``W(G)`` of shape ``[m]`` for a Gramian ``G``."""
        check_gramian(gramian)
        with checked_finite(gramian):  # the weighting's own check would read it again
            return self.gramian_weighting(gramian)

    def extra_repr(self) -> str:
        return self.gramian_weighting.extra_repr()
