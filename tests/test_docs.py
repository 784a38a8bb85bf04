"""The Sphinx docs build with warnings as errors, and the usage page mirrors the README."""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_docs_build_without_warnings(tmp_path):
    pytest.importorskip("sphinx", reason="sphinx is not installed (pip install -e '.[docs]')")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "-d",
            str(tmp_path / "doctrees"),
            str(DOCS),
            str(tmp_path / "html"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    api = (tmp_path / "html" / "api.html").read_text()
    for name in [
        "jdoptim.JacobianOptimizer",
        "jdoptim.jac",
        "jdoptim.backward",
        "jdoptim.jac_to_grad",
        "jdoptim.mtl_backward",
        "jdoptim.linalg.project_weights",
        "jdoptim.linalg.project_weights_quadprog",
    ]:
        assert f'id="{name}"' in api, name
    import jdoptim.aggregation

    for name in jdoptim.aggregation.__all__:
        assert f'id="jdoptim.aggregation.{name}"' in api, name


def test_usage_page_mirrors_the_readme_python_blocks():
    readme = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    usage = (DOCS / "usage.rst").read_text()
    rst_blocks = re.findall(
        r"\.\. code-block:: python\n\n((?:(?:   .*)?\n)+)", usage + "\n", flags=re.MULTILINE
    )
    rst_blocks = [textwrap.dedent(b).strip() for b in rst_blocks]
    assert rst_blocks == [b.strip() for b in readme]
