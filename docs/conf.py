"""Sphinx configuration of the jdoptim documentation.

Build with warnings as errors::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jdoptim  # noqa: E402

project = "jdoptim"
author = "jdoptim developers"
copyright = "jdoptim developers"
release = jdoptim.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx.ext.doctest",  # docs/lightning.rst's testcode (the docs branch's conf has it too)
]

# NumPy-style docstrings only.
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_default_options = {"show-inheritance": True}
# Cross-references into torch cannot be resolved without intersphinx (no network at build time).
nitpicky = False

exclude_patterns = ["_build"]
templates_path: list[str] = []
html_theme = "alabaster"
html_static_path: list[str] = []


def _public_bases(app, name, obj, options, bases):
    """Hide private bases (``_Stateful``) from the "Bases:" line; keep the public ones."""
    bases[:] = [b for b in bases if not getattr(b, "__name__", "").startswith("_")]


def setup(app):
    app.connect("autodoc-process-bases", _public_bases)
