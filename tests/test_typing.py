"""Type checkers see jdoptim's annotations once it is installed (``py.typed``, PEP 561)."""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_py_typed_is_shipped_as_package_data():
    assert (ROOT / "jdoptim" / "py.typed").is_file()
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'\[tool\.setuptools\.package-data\]\njdoptim = \[[^\]]*"py\.typed"', text)


def test_mypy_reads_the_installed_package(tmp_path):
    """An environment whose site-packages holds jdoptim: mypy analyses it instead of Any."""
    pytest.importorskip("mypy")
    env = tmp_path / "env"
    venv.create(env, with_pip=False)
    python = env / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert purelib != sysconfig.get_paths()["purelib"]
    (Path(purelib) / "jdoptim").symlink_to(ROOT / "jdoptim", target_is_directory=True)
    snippet = tmp_path / "snippet.py"
    snippet.write_text(
        "from jdoptim import JacobianOptimizer\n"
        "from jdoptim.aggregation import UPGrad\n"
        "reveal_type(UPGrad())\n"
        "reveal_type(JacobianOptimizer.backward)\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--python-executable",
            str(python),
            "--no-incremental",
            "--cache-dir",
            str(tmp_path / "cache"),
            str(snippet),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert 'Revealed type is "jdoptim.aggregation._upgrad.UPGrad"' in result.stdout, result.stdout
    assert "py.typed" not in result.stdout, result.stdout
