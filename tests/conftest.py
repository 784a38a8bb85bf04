"""Shared fixtures: per-sample Jacobians captured from real trainings (``tests/_realdata.py``)."""

from __future__ import annotations

import hashlib
import inspect
import tempfile
from pathlib import Path

import pytest
import torch

from tests import _realdata


def _cache_file() -> Path:
    """A cache keyed by the capture code and the torch version (stale files are never reused)."""
    key = hashlib.sha256((inspect.getsource(_realdata) + torch.__version__).encode()).hexdigest()
    return Path(tempfile.gettempdir()) / f"jdoptim-realdata-{key[:16]}.pt"


@pytest.fixture(scope="session")
def realdata() -> dict[str, _realdata.Capture]:
    """Every capture of ``_realdata.CAPTURES`` by name (generated once, then read from a cache)."""
    pytest.importorskip("sklearn")
    path = _cache_file()
    if path.exists():
        stored = torch.load(path)
    else:
        stored = {
            c.name: c.jacobian for spec in _realdata.CAPTURES for c in _realdata.capture(*spec)
        }
        partial = path.with_suffix(f".{id(stored)}.tmp")
        torch.save(stored, partial)
        partial.replace(path)  # atomic: concurrent runs never read a half-written cache
    return {name: _realdata.Capture(name, jacobian) for name, jacobian in stored.items()}
