"""Run the README's demo when the docs build, and put its table and figure on a page.

``examples/multitask_demo.py`` prints a table (each task's test metric over several seeds) and
writes a figure. The getting-started page shows both from this run, so the page never disagrees
with the code. The run is skipped when its outputs are newer than the scripts and were made in
the same mode (``JDOPTIM_QUICK=1`` trains a few steps only); ``JDOPTIM_DOCS_RERUN=1`` forces it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.errors import ExtensionError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCRIPTS = [EXAMPLES / "multitask_demo.py", EXAMPLES / "_digits.py"]


def _mode() -> str:
    return "quick" if os.environ.get("JDOPTIM_QUICK") == "1" else "full"


def _up_to_date(out: Path) -> bool:
    files = [out / "multitask_demo.png", out / "table.txt", out / "mode.txt"]
    if os.environ.get("JDOPTIM_DOCS_RERUN") == "1" or not all(f.is_file() for f in files):
        return False
    newest_script = max(s.stat().st_mtime for s in SCRIPTS)
    fresh = min(f.stat().st_mtime for f in files) > newest_script
    return fresh and (out / "mode.txt").read_text() == _mode()


def run_demo(app: Sphinx) -> None:
    out = Path(app.srcdir) / "_generated" / "demo"
    if _up_to_date(out):
        return
    out.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, str(SCRIPTS[0]), "--out", str(out / "multitask_demo.png")],
        capture_output=True,
        text=True,
        cwd=EXAMPLES,
        env={**os.environ, "MPLBACKEND": "agg", "TQDM_DISABLE": "1"},
        timeout=1800,
    )
    if result.returncode != 0:
        raise ExtensionError(f"examples/multitask_demo.py failed:\n{result.stderr}")
    table = [line for line in result.stdout.splitlines() if not line.startswith("figure:")]
    (out / "table.txt").write_text("\n".join(table) + "\n", encoding="utf-8")
    note = (
        "This site was built with ``JDOPTIM_QUICK=1``: the demo ran a few steps of two seeds "
        "only, so the numbers below show that the demo runs, not how the methods compare."
        if _mode() == "quick"
        else "The run made when this site was built, on the build machine:"
    )
    (out / "note.inc").write_text(note + "\n", encoding="utf-8")
    (out / "mode.txt").write_text(_mode(), encoding="utf-8")


def setup(app: Sphinx) -> dict[str, object]:
    app.connect("builder-inited", run_demo)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
