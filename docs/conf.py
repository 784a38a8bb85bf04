"""Sphinx configuration of the jdoptim documentation.

Build (the suite does the same, with warnings as errors, in ``tests/test_docs.py``)::

    pip install -e ".[docs]"
    JDOPTIM_QUICK=1 python -m sphinx -W --keep-going -b html docs docs/_build/html

``JDOPTIM_QUICK=1`` makes the gallery's examples train for a few steps only. The per-method pages
are generated from the code at each build (``_ext/jdoptim_pages.py``), math is rendered by a
MathJax bundled with the site (``_ext/offline_mathjax.py``: no CDN), and the code blocks are run
by the doctest builder (``-b doctest``).
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent / "_ext"))

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
    "sphinx.ext.doctest",
    "matplotlib.sphinxext.plot_directive",
    "sphinx_gallery.gen_gallery",
    "sphinx_copybutton",
    "offline_mathjax",
    "tex_literals",
    "jdoptim_pages",
    "readme_demo",
]

# The examples report progress with tqdm; its bars would fill the gallery's captured output.
os.environ.setdefault("TQDM_DISABLE", "1")

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

exclude_patterns = ["_build", "**.ipynb_checkpoints"]
templates_path: list[str] = []

html_theme = "furo"
html_title = f"jdoptim {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
pygments_style = "friendly"
pygments_dark_style = "monokai"

# The doctest builder runs the pages' ``testcode`` blocks. The docstrings' examples run under
# ``pytest --doctest-modules``, in their module's namespace, as written: not a second time here.
doctest_test_doctest_blocks = ""
doctest_global_setup = "import torch\ntorch.manual_seed(0)"

# Figures of the performance page, drawn from benchmarks/README.md at build time.
plot_include_source = False
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 110)]
plot_rcparams = {"figure.autolayout": True, "font.size": 9}

# The gallery: every ``examples/plot_*.py`` (sphinx-gallery format: a titled module docstring,
# ``# %%`` cells) is run at build time with its figures; the other scripts (the README's demo, DDP
# under torchrun) stay out of it.
sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "ignore_pattern": r"^(?!plot_).*\.py$",
    "download_all_examples": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    "image_scrapers": ("matplotlib",),
    "matplotlib_animations": False,
    "run_stale_examples": os.environ.get("JDOPTIM_DOCS_RERUN") == "1",
    "abort_on_example_error": True,
    "show_memory": False,
    "min_reported_time": 1e9,  # no per-example timing footers
    "write_computation_times": False,
}

copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True


def _is_public(cls: type) -> bool:
    """Whether ``cls`` is exported by its package (``jdoptim.aggregation._bases`` -> ``...``)."""
    if not cls.__module__.startswith("jdoptim"):
        return True
    package = importlib.import_module(cls.__module__.split("._")[0])
    return getattr(package, cls.__name__, None) is cls


def _public_bases(app, name, obj, options, bases):
    """Hide private bases (``_Stateful``, ``Seeded``) from the "Bases:" line; keep the public."""
    bases[:] = [b for b in bases if _is_public(b)]


def setup(app):
    app.connect("autodoc-process-bases", _public_bases)
