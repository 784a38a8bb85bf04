"""Hyper-parameters that validate on every assignment, and their aggregator-side aliases.

A weighting declares ``c = Hyper(check_c)``: ``weighting.c = value`` stores ``check_c(value)``
(which raises on a bad value, leaving the old one), in the constructor as after it. The aggregator
built on it declares ``c = delegated("c")``: reading or assigning ``aggregator.c`` reads or assigns
the weighting's, so there is one value and one validation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Hyper:
    """A data descriptor storing ``check(value)`` on assignment.

    Parameters
    ----------
    check:
        Returns the value to store (e.g. converted to ``float``) or raises on a bad value.

    Examples
    --------
    >>> def positive(value):
    ...     if value <= 0:
    ...         raise ValueError(f"size must be > 0, got {value}")
    ...     return int(value)
    >>> class Thing:
    ...     size = Hyper(positive)
    >>> t = Thing()
    >>> t.size = 3.0
    >>> t.size
    3
    >>> t.size = -1
    Traceback (most recent call last):
    ...
    ValueError: size must be > 0, got -1
    >>> t.size
    3
    """

    def __init__(self, check: Callable[[Any], Any]) -> None:
        self.check = check

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.slot = f"_hyper_{name}"

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        try:
            return obj.__dict__[self.slot]
        except KeyError:
            raise AttributeError(f"{type(obj).__name__} has no {self.name!r} yet") from None

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.slot] = self.check(value)


def delegated(name: str, owner: str = "gramian_weighting") -> property:
    """An aggregator property that reads and assigns ``getattr(self, owner).<name>``."""

    def get(self: Any) -> Any:
        return getattr(getattr(self, owner), name)

    def set_(self: Any, value: Any) -> None:
        setattr(getattr(self, owner), name, value)

    return property(get, set_, doc=f"The weighting's ``{name}`` (validated on assignment).")
