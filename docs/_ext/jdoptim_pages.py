"""Generate the per-method pages of the docs from the code, at each build.

One page per record of the claims table ``jdoptim.aggregation._claims`` (the aggregator and its
weighting together, or a weighting alone; the property tests check the same records) and one per
scalarizer of ``jdoptim.scalarization`` when that package exists. They are written under
``docs/_generated/`` (not committed) when the builder starts. Each page shows the record
(summary, paper, cost, hyper-parameters, properties), the measured time from
``benchmarks/README.md`` and the classes' docstrings (formula, details, example). Nothing is
written by hand per method, so a page cannot drift from the code.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.errors import ExtensionError

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchmark_tables
import claims_view
import tex_literals

OUT = "_generated"


def aggregation_methods() -> tuple[list, list[str]]:
    """The claims records, one per method, and the public names that no record covers.

    Those are the base classes and helpers (documented together on the overview page). A
    concrete aggregator or weighting without a record is an error: its page would say nothing.
    """
    module = importlib.import_module("jdoptim.aggregation")
    claims_module = importlib.import_module("jdoptim.aggregation._claims")
    covered = {c for claims in claims_module.CLAIMS for c in (claims.aggregator, claims.weighting)}
    bases = []
    for name in module.__all__:
        obj = getattr(module, name)
        if obj in covered:
            continue
        if inspect.isclass(obj) and not (
            inspect.isabstract(obj) or obj.__module__ == module._bases.__name__
        ):
            raise ExtensionError(f"jdoptim.aggregation.{name} has no record in the claims table")
        bases.append(name)
    methods = sorted(claims_module.CLAIMS, key=lambda c: c.name.lower())
    return methods, bases


def _measured(claims) -> tuple[list[int], list[float | None] | None]:
    ms, times = benchmark_tables.aggregator_times()
    names = {claims.name, claims.name.replace("-", "")}
    row = next((v for k, v in times.items() if k.split("-")[0] in names or k in names), None)
    return ms, row


def measured_text(claims) -> str:
    ms, row = _measured(claims)
    if row is None:
        return "not measured"
    cells = [f"{t:g} ms (m = {m})" for m, t in zip(ms, row, strict=True) if t is not None]
    return ", ".join(cells) + (
        "; :math:`J` of shape ``[m, 10 000]``, float32, 2 CPU threads (:doc:`/performance`)"
    )


def method_page(claims) -> str:
    title = claims.name
    rows = [*claims_view.rows(claims), ("Measured time", measured_text(claims))]
    lines = [
        title,
        "=" * len(title),
        "",
        ".. currentmodule:: jdoptim.aggregation",
        "",
        ".. list-table::",
        "   :stub-columns: 1",
        "   :widths: 1 4",
        "",
    ]
    for key, value in rows:
        lines.append(f"   * - {key}")
        if isinstance(value, list):
            lines += [f"     - * {value[0]}", *[f"       * {v}" for v in value[1:]]]
        else:
            lines.append(f"     - {value}")
    lines.append("")
    for cls in (claims.aggregator, claims.weighting):
        if cls is not None:
            lines += [f".. autoclass:: {cls.__name__}", ""]
    return "\n".join(lines)


def methods_table(methods: list) -> str:
    header = ["Method", "Cost", *claims_view.table_columns(), "ms (m=128)"]
    lines = [".. list-table::", "   :header-rows: 1", "", "   * - " + header[0]]
    lines += [f"     - {h}" for h in header[1:]]
    for claims in methods:
        ms, row = _measured(claims)
        at = row[ms.index(128)] if row is not None and 128 in ms else None
        cells = [
            f":doc:`{claims.name} </{OUT}/aggregation/{claims_view.slug(claims)}>`",
            "G" if claims.gramian_only else "J",
            *claims_view.table_cells(claims),
            "–" if at is None else f"{at:g}",
        ]
        lines += ["   * - " + cells[0], *[f"     - {c}" for c in cells[1:]]]
    return "\n".join(lines) + "\n"


def substitutions(methods: list) -> str:
    """``|stateful_methods|`` and the like: the guide's lists, from the same records."""
    groups = {
        "non_conflicting_methods": lambda c: c.non_conflicting,
        "not_homogeneous_methods": lambda c: not c.homogeneous,
        "stateful_methods": lambda c: not c.stateless,
        "random_methods": lambda c: not c.deterministic,
        "jacobian_methods": lambda c: not c.gramian_only,
    }
    lines = []
    for name, keep in groups.items():
        links = [
            f":doc:`{c.name} </{OUT}/aggregation/{claims_view.slug(c)}>`"
            for c in methods
            if keep(c)
        ]
        lines.append(f".. |{name}| replace:: {', '.join(links) or 'none'}")
    return "\n".join(lines) + "\n"


# The numbers the guide quotes, by substitution name: (benchmark, plain or peer benchmark or None).
QUOTED = {
    "per_sample_upgrad": ("test_mlp_jacobian_optimizer_batch_dim[UPGrad]", "test_mlp_plain"),
    "per_sample_vs_peer": (
        "test_mlp_torchjd_autogram[UPGrad]",
        "test_mlp_jacobian_optimizer_batch_dim[UPGrad]",
    ),
    "mtl_upgrad": ("test_mtl_jacobian_optimizer[UPGrad-shared_params=trunk]", "test_mtl_plain"),
    "mtl_vs_peer": (
        "test_mtl_torchjd[UPGrad]",
        "test_mtl_jacobian_optimizer[UPGrad-shared_params=trunk]",
    ),
    "weights_64": ("test_upgrad_weighting[64]", None),
    "weights_128": ("test_upgrad_weighting[128]", None),
    "weights_512": ("test_upgrad_weighting[512]", None),
}


def measured_substitutions() -> str:
    """``|per_sample_upgrad|`` (a ratio such as ``6.6x``), ``|weights_128|`` (``9.96 ms``)...

    The guide quotes these from ``benchmarks/README.md`` at build time, so a rerun of the
    benchmarks updates the prose with the figures.
    """
    lines = []
    for name, (benchmark, reference) in QUOTED.items():
        value = benchmark_tables.median_ms(benchmark)
        if reference is None:
            text = f"{value:.3g} ms" if value < 1000 else f"{value / 1000:.2g} s"
        else:
            text = f"{value / benchmark_tables.median_ms(reference):.2g}x"
        lines.append(f".. |{name}| replace:: {text}")
    ms, times = benchmark_tables.aggregator_times()
    for method in ("UPGrad", "DualProj"):
        lines.append(
            f".. |{method.lower()}_alone_128| replace:: {times[method][ms.index(128)]:g} ms"
        )
    return "\n".join(lines) + "\n"


def hyper_parameters(cls: type) -> str:
    parts = []
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if p.default is inspect.Parameter.empty:
            parts.append(f"``{p.name}`` (required)")
        else:
            default = getattr(p.default, "__name__", None) or repr(p.default)
            parts.append(f"``{p.name}={default}``")
    return ", ".join(parts) or "none"


def summary(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    return tex_literals.convert(doc.split("\n\n")[0].replace("\n", " ").strip())


def scalarization_pages() -> dict[str, str]:
    """One page per public class of ``jdoptim.scalarization``; empty when the package is absent."""
    try:
        module = importlib.import_module("jdoptim.scalarization")
    except ModuleNotFoundError as error:
        if error.name in {"jdoptim.scalarization", "jdoptim"}:
            return {}
        raise
    names = list(getattr(module, "__all__", []))
    pages = {}
    others = [n for n in names if not inspect.isclass(getattr(module, n))]
    for name in names:
        obj = getattr(module, name)
        if inspect.isclass(obj) and not inspect.isabstract(obj):
            pages[f"scalarization/{name.lower()}"] = "\n".join(
                [
                    name,
                    "=" * len(name),
                    "",
                    ".. currentmodule:: jdoptim.scalarization",
                    "",
                    summary(obj),
                    "",
                    f"Hyper-parameters: {hyper_parameters(obj)}.",
                    "",
                    f".. autoclass:: {name}",
                    "",
                ]
            )
    bases = [
        n
        for n in names
        if inspect.isclass(getattr(module, n)) and inspect.isabstract(getattr(module, n))
    ]
    index = [
        "Scalarizers",
        "===========",
        "",
        ".. automodule:: jdoptim.scalarization",
        "   :no-members:",
        "",
        ".. currentmodule:: jdoptim.scalarization",
        "",
        *[f".. autoclass:: {n}\n   :members:\n" for n in bases],
        *[f".. autofunction:: {n}\n" for n in others],
        ".. toctree::",
        "   :maxdepth: 1",
        "",
        *[f"   {Path(p).name}" for p in sorted(pages)],
        "",
    ]
    pages["scalarization/index"] = "\n".join(index)
    return pages


def all_pages(srcdir: Path) -> dict[str, str]:
    """Every generated file, by path under ``_generated`` (``.rst`` pages, ``.inc`` fragments)."""
    methods, bases = aggregation_methods()
    slugs = [claims_view.slug(c) for c in methods]
    files = {f"aggregation/{s}.rst": method_page(c) for s, c in zip(slugs, methods, strict=True)}
    files["aggregation_toc.inc"] = _toctree([f"{OUT}/aggregation/{s}" for s in slugs], hidden=True)
    files["aggregation_table.inc"] = methods_table(methods)
    files["claims_substitutions.inc"] = substitutions(methods) + measured_substitutions()
    files["aggregation_bases.inc"] = "\n".join(
        f".. autoclass:: {n}\n   :members:\n" if n[0].isupper() else f".. autofunction:: {n}\n"
        for n in bases
    )
    scalarization = scalarization_pages()
    files.update({f"{name}.rst": text for name, text in scalarization.items()})
    modules = api_modules()
    files.update({f"api/{name}.rst": api_page(name) for name in modules})
    files["api_table.inc"] = api_table(modules, bool(scalarization))
    files["api_toc.inc"] = _toctree([f"/{OUT}/api/{name}" for name in modules], hidden=True)
    guide = ["migration"] if (srcdir / "migration.rst").is_file() else []
    reference = [f"{OUT}/scalarization/index"] if scalarization else []
    files["optional_guide_toc.inc"] = _toctree(guide)
    files["optional_reference_toc.inc"] = _toctree(reference)
    return files


# Submodules with pages of their own elsewhere, or not part of the API (the engines are internal).
NOT_IN_API = {"aggregation", "scalarization", "engine", "optimizer", "functional"}


def api_modules() -> list[str]:
    """The public submodules of ``jdoptim`` (no leading underscore) that get an API page."""
    package = importlib.import_module("jdoptim")
    return sorted(
        info.name
        for info in pkgutil.iter_modules(package.__path__)
        if not info.name.startswith("_") and info.name not in NOT_IN_API
    )


def api_page(name: str) -> str:
    title = f"jdoptim.{name}"
    return "\n".join(
        [title, "=" * len(title), "", f".. automodule:: jdoptim.{name}", "   :members:", ""]
    )


def api_table(names: list[str], with_scalarization: bool) -> str:
    lines = [
        ".. list-table::",
        "   :header-rows: 1",
        "   :widths: 2 5",
        "",
        "   * - Module",
        "     - What it holds",
    ]
    rows = [
        (
            ":doc:`jdoptim </api/optimizer>`",
            ":class:`~jdoptim.JacobianOptimizer`, the ``torch.optim`` wrapper",
        ),
        (
            ":doc:`jdoptim (functions) </api/functional>`",
            "the functions exported by ``jdoptim`` itself",
        ),
        (
            ":doc:`jdoptim.aggregation </aggregators>`",
            "the aggregators and weightings, one page each, and their base classes",
        ),
    ]
    if with_scalarization:
        rows.append(
            (
                f":doc:`jdoptim.scalarization </{OUT}/scalarization/index>`",
                "the scalarizers, one page each",
            )
        )
    for name in names:
        doc = inspect.getdoc(importlib.import_module(f"jdoptim.{name}")) or ""
        rows.append(
            (
                f":doc:`jdoptim.{name} </{OUT}/api/{name}>`",
                tex_literals.convert(doc.split("\n\n")[0].replace("\n", " ")),
            )
        )
    for module, text in rows:
        lines += [f"   * - {module}", f"     - {text}"]
    return "\n".join(lines) + "\n"


def _toctree(entries: list[str], hidden: bool = False) -> str:
    """A toctree of ``entries``, or nothing (an empty toctree would be a warning)."""
    if not entries:
        return ""
    options = ["   :maxdepth: 1", *(["   :hidden:"] if hidden else [])]
    return "\n".join([".. toctree::", *options, "", *[f"   {e}" for e in entries], ""])


def write_pages(app: Sphinx) -> None:
    srcdir = Path(app.srcdir)
    out = srcdir / OUT
    files = all_pages(srcdir)
    for path in out.rglob("*"):  # drop pages of methods that no longer exist
        if path.is_file() and str(path.relative_to(out)) not in files:
            path.unlink()
    for rel, text in files.items():
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")  # unchanged files keep their mtime


def setup(app: Sphinx) -> dict[str, object]:
    app.connect("builder-inited", write_pages)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
