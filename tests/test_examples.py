"""The examples run in quick mode (``JDOPTIM_QUICK=1``), draw their figures and print what they
promise. They run in this process (as sphinx-gallery runs them), from a temporary directory."""

from __future__ import annotations

import math
import re
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
GALLERY = sorted(EXAMPLES.glob("plot_*.py"))

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")
matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
plt = pytest.importorskip("matplotlib.pyplot")

pytestmark = [
    pytest.mark.filterwarnings("ignore:FigureCanvasAgg is non-interactive"),
    pytest.mark.filterwarnings(r"ignore:.*LeafSpec"),
]


@pytest.fixture
def quick(monkeypatch, tmp_path):
    monkeypatch.setenv("JDOPTIM_QUICK", "1")
    monkeypatch.setenv("JDOPTIM_LOG_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.delitem(sys.modules, "_digits", raising=False)  # re-read JDOPTIM_QUICK
    plt.close("all")
    yield tmp_path
    plt.close("all")
    sys.modules.pop("_digits", None)


def _floats(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", text)]


def _check_multitask(out: str, log_dir: Path) -> None:
    assert "UPGrad: the update increased some task loss at 0% of the records" in out


def _check_accumulation(out: str, log_dir: Path) -> None:
    difference = float(re.search(r"largest parameter difference after one step: (\S+)", out)[1])
    assert difference < 1e-5


def _check_lightning(out: str, log_dir: Path) -> None:
    assert out.count("global_step = 5") == 2


def _check_monitoring(out: str, log_dir: Path) -> None:
    assert "logged 6 steps" in out and "engine: layer-gramian" in out
    # UPGrad's update never increases a task loss (to first order).
    assert "increased some task loss at 0 of 6 steps" in out
    written = list(log_dir.glob("steps.csv")) + list(log_dir.glob("events.out.tfevents.*"))
    assert written
    if written[0].suffix == ".csv":
        assert len(written[0].read_text().splitlines()) == 1 + 6


CHECKS = {
    "plot_multitask_digits": _check_multitask,
    "plot_gradient_accumulation": _check_accumulation,
    "plot_lightning": _check_lightning,
    "plot_monitoring": _check_monitoring,
}


@pytest.mark.parametrize("path", GALLERY, ids=[p.stem for p in GALLERY])
def test_gallery_example_runs_and_draws(path, quick, capsys):
    if path.stem == "plot_lightning":
        pytest.importorskip("lightning")
    runpy.run_path(str(path), run_name="__main__")
    assert plt.get_fignums(), "the example drew no figure"
    out = capsys.readouterr().out
    assert all(math.isfinite(v) for v in _floats(out)), out
    CHECKS.get(path.stem, lambda *_: None)(out, quick)


def test_gallery_examples_have_a_titled_docstring():
    for path in GALLERY:
        doc = path.read_text().split('"""')[1].strip().splitlines()
        assert len(doc) > 2 and set(doc[1]) == {"="} and len(doc[1]) == len(doc[0]), path.name


def test_readme_demo_prints_a_table_over_seeds_and_writes_its_figure(quick, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["multitask_demo.py", "--out", "demo.png"])
    runpy.run_path(str(EXAMPLES / "multitask_demo.py"), run_name="__main__")
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("test metrics after 8 steps, mean ± std over 2 seeds")
    assert lines[1].split()[0] == "method" and lines[1].split()[-1] == "ms/step"
    assert [line.split()[0] for line in lines[2:6]] == ["sum", "UPGrad", "MGDA", "IMTL-G"]
    for line in lines[2:6]:
        cells = re.findall(r"(\d+\.\d+) ± (\d+\.\d+)", line)
        assert len(cells) == 4, line
        assert all(float(m) >= 0 and float(s) >= 0 for m, s in cells)
        assert float(line.split()[-1]) > 0
    assert (quick / "demo.png").stat().st_size > 10_000
