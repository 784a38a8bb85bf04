"""Generate the per-method pages of the docs from the code, at each build.

One page per aggregation method (the aggregator and its weighting together, or a weighting alone)
and one per scalarizer, written under ``docs/_generated/`` (not committed) when the builder starts.
Each page's facts come from the code: the claims table ``jdoptim.aggregation._claims`` when it
exists (the one the property tests read), the class hierarchy (Gramian-only or not), the
constructor's signature (hyper-parameters), the docstrings (formula, paper, properties; rendered
by autodoc) and the measured times of ``benchmarks/README.md``. Nothing is written by hand per
method, so a page cannot drift from the code.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sphinx.application import Sphinx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchmark_tables
import claims_view
import tex_literals

OUT = "_generated"


@dataclass
class Method:
    """One aggregation method: its aggregator and/or weighting, and helpers defined with them."""

    name: str
    aggregator: type | None = None
    weighting: type | None = None
    functions: list[str] = field(default_factory=list)

    @property
    def main(self) -> type:
        return self.aggregator or self.weighting  # type: ignore[return-value]

    @property
    def slug(self) -> str:
        return self.name.lower()


def _is_base(module, cls: type) -> bool:
    return cls.__module__ == module._bases.__name__ or inspect.isabstract(cls)


def aggregation_methods() -> tuple[list[Method], list[str]]:
    """The methods of ``jdoptim.aggregation`` and the public base names (for the API page)."""
    module = importlib.import_module("jdoptim.aggregation")
    methods: dict[str, Method] = {}
    bases, functions = [], []
    for name in module.__all__:
        obj = getattr(module, name)
        if not inspect.isclass(obj):
            functions.append(name)
        elif _is_base(module, obj):
            bases.append(name)
        elif issubclass(obj, module.Weighting):
            key = name.removesuffix("Weighting")
            methods.setdefault(key, Method(key)).weighting = obj
        elif issubclass(obj, module.Aggregator):
            methods.setdefault(name, Method(name)).aggregator = obj
    for name in functions:  # helpers go with the classes of their module, else with the bases
        home = getattr(module, name).__module__
        owner = next((m for m in methods.values() if m.main.__module__ == home), None)
        if owner is None:
            bases.append(name)
        else:
            owner.functions.append(name)
    return sorted(methods.values(), key=lambda m: m.name.lower()), bases


def needs_only_gramian(method: Method) -> bool:
    module = importlib.import_module("jdoptim.aggregation")
    if method.aggregator is not None:
        return issubclass(method.aggregator, module.GramianWeightedAggregator)
    params = list(inspect.signature(method.weighting.forward).parameters)
    return len(params) > 1 and params[1] == "gramian"


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


def _measured(name: str) -> str:
    ms, times = benchmark_tables.aggregator_times()
    row = next((v for k, v in times.items() if k.split("-")[0] == name), None)
    if row is None:
        return "not measured"
    cells = [f"{t:g} ms (m = {m})" for m, t in zip(ms, row, strict=True) if t is not None]
    return (
        ", ".join(cells) + "; ``J`` of shape ``[m, 10 000]``, float32, 2 CPU threads "
        "(:doc:`/performance`)"
    )


def method_page(method: Method) -> str:
    title = method.name
    cost = (
        "Gramian only: the weights depend on ``J`` only through ``G = J Jᵀ``, so the per-sample "
        "and layer-Gramian engines apply (see :doc:`/performance`)"
        if needs_only_gramian(method)
        else "needs the Jacobian ``J`` itself: the optimizer uses the Jacobian engine"
    )
    rows = [
        ("Summary", summary(method.main)),
        ("Cost", cost),
        ("Hyper-parameters", hyper_parameters(method.main)),
        *claims_view.rows(method.name),
        ("Measured time", _measured(method.name)),
    ]
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
        lines += [f"   * - {key}", f"     - {value}"]
    lines.append("")
    for cls in (method.aggregator, method.weighting):
        if cls is not None:
            lines += [f".. autoclass:: {cls.__name__}", ""]
            if cls is method.weighting and hasattr(cls, "weights_from_cross_gramian"):
                lines += ["   .. automethod:: weights_from_cross_gramian", ""]
    lines += [f".. autofunction:: {name}\n" for name in method.functions]
    return "\n".join(lines)


def methods_table(methods: list[Method]) -> str:
    header = ["Method", "Cost", *claims_view.table_columns(), "Time, m = 128 (ms)"]
    lines = [".. list-table::", "   :header-rows: 1", "", "   * - " + header[0]]
    lines += [f"     - {h}" for h in header[1:]]
    ms, times = benchmark_tables.aggregator_times()
    for method in methods:
        row = next((v for k, v in times.items() if k.split("-")[0] == method.name), None)
        at = row[ms.index(128)] if row is not None and 128 in ms else None
        cells = [
            f":doc:`{method.name} </{OUT}/aggregation/{method.slug}>`",
            "Gramian" if needs_only_gramian(method) else "J",
            *claims_view.table_cells(method.name),
            "-" if at is None else f"{at:g}",
        ]
        lines += ["   * - " + cells[0], *[f"     - {c}" for c in cells[1:]]]
    return "\n".join(lines) + "\n"


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
    files = {f"aggregation/{m.slug}.rst": method_page(m) for m in methods}
    files["aggregation_toc.inc"] = _toctree(
        [f"{OUT}/aggregation/{m.slug}" for m in methods], hidden=True
    )
    files["aggregation_table.inc"] = methods_table(methods)
    files["aggregation_bases.inc"] = "\n".join(
        f".. autoclass:: {n}\n   :members:\n" if n[0].isupper() else f".. autofunction:: {n}\n"
        for n in bases
    )
    scalarization = scalarization_pages()
    files.update({f"{name}.rst": text for name, text in scalarization.items()})
    guide = ["migration"] if (srcdir / "migration.rst").is_file() else []
    reference = [f"{OUT}/scalarization/index"] if scalarization else []
    files["optional_guide_toc.inc"] = _toctree(guide)
    files["optional_reference_toc.inc"] = _toctree(reference)
    return files


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
