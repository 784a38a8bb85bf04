"""Serve MathJax from the built site, so that math renders without network access.

MathJax 3 ships on PyPI inside ``sphinx-mathjax-offline`` (a package whose import name has a
dash). Only its self-contained ``tex-svg-full.js`` bundle (every TeX extension, SVG output with
the glyphs inlined, no font files, about 2 MB) is copied into ``_static/mathjax/``; the pages load
it from there instead of a CDN.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.errors import ExtensionError
from sphinx.util.fileutil import copy_asset_file

BUNDLE = "tex-svg-full.js"


def bundle_path() -> Path:
    """The MathJax bundle installed by ``pip install sphinx-mathjax-offline``."""
    spec = importlib.util.find_spec("sphinx-mathjax-offline")
    if spec is None or spec.origin is None:
        raise ExtensionError(
            "offline math needs the MathJax bundle: pip install sphinx-mathjax-offline "
            "(or pip install -e '.[docs]')"
        )
    path = Path(spec.origin).parent / "static" / "mathjax" / BUNDLE
    if not path.is_file():
        raise ExtensionError(f"the MathJax bundle {path} is missing")
    return path


def _copy_bundle(app: Sphinx, exception: Exception | None) -> None:
    if exception is None and app.builder.format == "html":
        target = Path(app.outdir) / "_static" / "mathjax"
        target.mkdir(parents=True, exist_ok=True)
        copy_asset_file(bundle_path(), target / BUNDLE)


def setup(app: Sphinx) -> dict[str, object]:
    bundle_path()  # fail early, with the install command, when the bundle is absent
    app.config.mathjax_path = f"mathjax/{BUNDLE}"
    app.connect("build-finished", _copy_bundle)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
