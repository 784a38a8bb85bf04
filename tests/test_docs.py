"""The documentation builds with warnings as errors, runs its code, and shows what it promises.

One HTML build (gallery in quick mode, re-run) and one doctest build share a doctree cache; the
other tests inspect their output or the sources.
"""

from __future__ import annotations

import configparser
import html
import importlib
import inspect
import os
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
HAND_WRITTEN = [
    p for p in DOCS.rglob("*.rst") if not {"_generated", "auto_examples"} & set(p.parts)
]
# A LaTeX command, or a braced sub/superscript, inside an inline code literal: renders as raw TeX.
TEX = re.compile(r"\\[A-Za-z]+|[_^]\{")
LITERAL = re.compile(r'<code class="docutils literal notranslate">(.*?)</code>', re.DOTALL)

for module in ("sphinx", "furo", "sphinx_gallery", "matplotlib", "sphinx_copybutton"):
    pytest.importorskip(module, reason=f"{module} is not installed (pip install -e '.[docs]')")


def _sphinx(builder: str, out: Path, doctrees: Path, **env: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", builder]
    command += ["-d", str(doctrees), str(DOCS), str(out)]
    environ = {**os.environ, "JDOPTIM_QUICK": "1", "MPLBACKEND": "agg", **env}
    environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), environ.get("PYTHONPATH", "")])
    return subprocess.run(
        command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=environ
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The HTML site, built once with ``-W``; the gallery's examples are run again (quick mode)."""
    tmp = tmp_path_factory.mktemp("docs")
    result = _sphinx("html", tmp / "html", tmp / "doctrees", JDOPTIM_DOCS_RERUN="1")
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp


def _pages(site: Path) -> dict[str, str]:
    html_dir = site / "html"
    return {
        str(p.relative_to(html_dir)): p.read_text(encoding="utf-8")
        for p in html_dir.rglob("*.html")
        if not {"_modules", "_sources"} & set(p.relative_to(html_dir).parts)
    }


def test_every_code_block_of_the_pages_runs(site):
    result = _sphinx("doctest", site / "doctest", site / "doctrees")
    assert result.returncode == 0, result.stdout + result.stderr
    report = (site / "doctest" / "output.txt").read_text()
    ran = sum(int(n) for n in re.findall(r"(\d+) passed and 0 failed", report))
    blocks = sum(len(re.findall(r"^\.\. testcode::", p.read_text(), re.M)) for p in HAND_WRITTEN)
    assert ran >= blocks > 5, report


def test_pages_have_no_untested_python_blocks():
    # Python on a page is a ``testcode`` block (run by the doctest builder), never a plain
    # ``code-block:: python`` or a ``>>>`` literal block that nothing runs.
    for page in HAND_WRITTEN:
        text = page.read_text()
        assert not re.search(r"code-block::\s*(python|pycon)", text), page
        assert not re.search(r"^\s*>>> ", text, re.M), page


def test_docstring_examples_run_in_the_suite():
    # The API pages render the docstrings' examples; pytest runs them (--doctest-modules) over
    # the package, in their module's namespace.
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert "--doctest-modules" in config["tool:pytest"]["addopts"].split()
    assert "jdoptim" in config["tool:pytest"]["testpaths"].split()


def test_every_public_name_is_documented(site):
    import pkgutil

    import jdoptim

    anchors = set(re.findall(r'id="([^"]+)"', "".join(_pages(site).values())))
    public = [
        f"jdoptim.{info.name}"
        for info in pkgutil.iter_modules(jdoptim.__path__)
        if not info.name.startswith("_") and info.name != "engine"  # the engines are internal
    ]
    for package in ["jdoptim", *public]:
        module = importlib.import_module(package)
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue  # submodules, constants: no entry of their own
            home = obj.__module__.split("._")[0]
            documented = {f"{package}.{name}", f"{home}.{name}", f"jdoptim.{name}"}
            assert documented & anchors, f"{package}.{name} has no entry in the docs"


def test_each_aggregation_method_has_its_own_page(site):
    from jdoptim.aggregation import Aggregator, GramianWeightedAggregator, Weighting
    from jdoptim.aggregation._claims import claims_of

    module = importlib.import_module("jdoptim.aggregation")
    pages = _pages(site)
    for name in module.__all__:
        cls = getattr(module, name)
        if not inspect.isclass(cls) or inspect.isabstract(cls) or "_bases" in cls.__module__:
            continue
        assert issubclass(cls, Aggregator | Weighting), name
        claims = claims_of(cls)
        page = pages.get(
            f"_generated/aggregation/{re.sub(r'[^a-z0-9]', '', claims.name.lower())}.html"
        )
        assert page is not None, f"no page for {name}"
        assert f'id="jdoptim.aggregation.{name}"' in page, name
        assert claims.paper is None or claims.paper.url in page, name
        if issubclass(cls, Aggregator):  # the page's cost agrees with the class hierarchy
            assert ("Gramian only" in page) == issubclass(cls, GramianWeightedAggregator), name


def test_pages_list_the_constructor_arguments_with_their_defaults():
    # The hyper-parameters shown come from the claims table: they must be the constructor's.
    from jdoptim.aggregation._claims import CLAIMS

    for claims in CLAIMS:
        for cls in filter(None, (claims.aggregator, claims.weighting)):
            # A class without an __init__ of its own shows nn.Module's (*args, **kwargs): none.
            parameters = [
                p
                for p in inspect.signature(cls).parameters.values()
                if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            ]
            assert [h.name for h in claims.hyperparameters] == [p.name for p in parameters]
            for shown, p in zip(claims.hyperparameters, parameters, strict=True):
                if p.default is inspect.Parameter.empty:
                    assert shown.default == "(required)", (claims.name, p.name)
                elif callable(p.default):
                    assert shown.default == p.default.__name__.lstrip("_"), (claims.name, p.name)
                else:
                    assert shown.default == repr(p.default), (claims.name, p.name)


def test_math_renders_offline(site):
    pages = _pages(site)
    assert (site / "html" / "_static" / "mathjax" / "tex-svg-full.js").stat().st_size > 1e6
    with_math = [name for name, text in pages.items() if 'class="math' in text]
    assert "index.html" in with_math and len(with_math) > 20
    for name in with_math:
        assert "_static/mathjax/tex-svg-full.js" in pages[name], name
    for name, text in pages.items():
        remote = re.findall(r'<(?:script|link)[^>]+(?:src|href)="(?:https?:)?//[^"]+"', text)
        assert not remote, (name, remote)


def test_no_tex_inside_code_literals(site):
    for name, text in _pages(site).items():
        for literal in LITERAL.findall(text):
            code = html.unescape(re.sub(r"<[^>]+>", "", literal))
            assert not TEX.search(code), f"{name}: TeX inside a code literal: {code!r}"


def test_gallery_runs_the_examples_with_their_figures(site):
    examples = sorted(p.stem for p in (ROOT / "examples").glob("plot_*.py"))
    assert examples
    for stem in examples:
        page = (site / "html" / "auto_examples" / f"{stem}.html").read_text()
        figures = re.findall(rf'src="\.\./_images/(sphx_glr_{stem}_\d+\.png)"', page)
        assert figures, f"{stem} shows no figure"
        assert all((site / "html" / "_images" / f).stat().st_size > 1000 for f in figures)


def test_performance_page_draws_the_benchmark_figures(site):
    page = (site / "html" / "performance.html").read_text()
    figures = re.findall(r'src="(_images/benchmark_plots_\w+\.png)"', page)
    assert sorted(figures) == [
        "_images/benchmark_plots_aggregators.png",
        "_images/benchmark_plots_steps.png",
        "_images/benchmark_plots_weighting.png",
    ]
    assert all((site / "html" / f).stat().st_size > 5000 for f in figures)


def test_getting_started_runs_the_readme_python_blocks_in_order():
    readme = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    page = (DOCS / "getting_started.rst").read_text() + "\n"
    blocks = re.findall(r"^\.\. testcode::\n\n((?:(?:   .*)?\n)+)", page, flags=re.MULTILINE)
    blocks = iter(textwrap.dedent(b).strip() for b in blocks)
    for block in readme:  # a subsequence: the page may add blocks between the README's
        assert block.strip() in blocks, block


# The build-time helpers of docs/_ext, on inputs written here.


@pytest.fixture
def ext(monkeypatch):
    monkeypatch.syspath_prepend(str(DOCS / "_ext"))
    return importlib.import_module


def test_benchmark_tables_read_titles_headers_and_cells(ext, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        "# Bench\n\n**mlp, B=4 (m=4)**\n\n| benchmark | median (ms) | vs plain |\n|---|---:|---:|\n"
        "| `test_mlp_plain` | 1.50 | 1.0x |\n| `test_mlp_jd[UPGrad]` | 3.00 | 2.0x |\n\n"
        "### Aggregators\n\n| aggregator | m = 2 | m = 128 |\n|---|---:|---:|\n"
        "| UPGrad | 0.5 | 20.25 |\n| Krum | - | 4 |\n"
    )
    tables = ext("benchmark_tables")
    steps = tables.step_tables(readme)
    assert [t.title for t in steps] == ["mlp, B=4 (m=4)"]
    assert steps[0].column("benchmark") == ["test_mlp_plain", "test_mlp_jd[UPGrad]"]
    assert [tables.parse_float(c) for c in steps[0].column("vs plain")] == [1.0, 2.0]
    ms, times = tables.aggregator_times(readme)
    assert ms == [2, 128]
    assert times == {"UPGrad": [0.5, 20.25], "Krum": [None, 4.0]}
    readme.write_text("# Nothing measured\n")
    with pytest.raises(ValueError, match="aggregator"):
        tables.aggregator_times(readme)
    with pytest.raises(ValueError, match="step table"):
        tables.step_tables(readme)


def test_scalarizer_pages_follow_the_package(ext, monkeypatch):
    pages = ext("jdoptim_pages")
    fake = types.ModuleType("jdoptim.scalarization")

    class Chebyshev:
        """The weighted maximum of the losses.

        More text.
        """

        def __init__(self, weights, p: float = 2.0) -> None: ...

    def helper() -> None:
        """A function."""

    fake.Chebyshev, fake.helper, fake.__all__ = Chebyshev, helper, ["Chebyshev", "helper"]
    monkeypatch.setitem(sys.modules, "jdoptim.scalarization", fake)
    generated = pages.scalarization_pages()
    assert sorted(generated) == ["scalarization/chebyshev", "scalarization/index"]
    page = generated["scalarization/chebyshev"]
    assert ".. autoclass:: Chebyshev" in page and "The weighted maximum of the losses." in page
    assert "``weights`` (required), ``p=2.0``" in page
    assert ".. autofunction:: helper" in generated["scalarization/index"]
    monkeypatch.setitem(sys.modules, "jdoptim.scalarization", None)  # import fails: no pages
    assert pages.scalarization_pages() == {}


def test_tex_literals_become_math_and_plain_code_stays(ext):
    convert = ext("tex_literals").convert
    assert convert("see ``x >= 0`` here") == "see ``x >= 0`` here"
    assert convert("so ``Jᵀλ^{(i)}`` is") == r"so :math:`J^\top λ^{(i)}` is"
    assert convert("``ρ = max{j : u_{j} > 0}``") == r":math:`ρ = \max\{j : u_{j} > 0\}`"
    assert convert("``‖d‖ <= max_norm\n · \\sqrt{wᵀGw}``") == (
        r":math:`\|d\| \le  \texttt{max\_norm} · \sqrt{w^\top Gw}`"
    )
    assert convert(r"``\operatorname{diag}(A)^{1/2}``") == r":math:`\operatorname{diag}(A)^{1/2}`"


def test_code_blocks_fit_the_page_width():
    # Furo's column shows about 85 characters of code; longer lines scroll sideways. The
    # README's blocks (mirrored on the getting-started page) keep the README's own width.
    readme = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    readme_lines = {line for block in readme for line in block.splitlines()}
    for page in HAND_WRITTEN:
        text = page.read_text() + "\n"
        for block in re.findall(
            r"^\.\. test(?:code|output)::\n(?:   :.*\n)*\n((?:(?:   .*)?\n)+)", text, re.M
        ):
            for line in textwrap.dedent(block).splitlines():
                assert len(line) <= 85 or line in readme_lines, (page.name, line)


def test_getting_started_shows_the_demo_run_at_build_time(site):
    page = (site / "html" / "getting_started.html").read_text()
    assert re.search(r'<img [^>]*src="_images/multitask_demo\.png"', page)
    assert (site / "html" / "_images" / "multitask_demo.png").stat().st_size > 5000
    table = html.unescape(re.sub(r"<[^>]+>", "", page))
    for method in ("sum", "UPGrad", "MGDA", "IMTL-G"):
        assert re.search(rf"^{re.escape(method)}\s+\d\.\d+ ± \d\.\d+", table, re.M), method
    assert "JDOPTIM_QUICK=1" in table  # the quick build says its numbers mean nothing


def test_gallery_output_has_no_progress_bars(site):
    for name, text in _pages(site).items():
        if name.startswith("auto_examples/"):
            assert not re.search(r"\d+/\d+ \[\d\d:\d\d<", text), name
