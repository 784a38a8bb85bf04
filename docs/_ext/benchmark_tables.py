"""Read the measured tables of ``benchmarks/README.md``, for the plots and tables of the docs.

The README is the one place where measured numbers live (the benchmark suite's report writes its
tables). The docs draw their figures from it at build time, so a rerun that updates the README
updates the figures too. A table this module cannot find is an error, not an empty plot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "benchmarks" / "README.md"


@dataclass
class Table:
    """One markdown table: its bold title (or the heading above it), header and rows."""

    title: str
    header: list[str]
    rows: list[list[str]]

    def column(self, name: str) -> list[str]:
        return [row[self.header.index(name)] for row in self.rows]


def _cells(line: str) -> list[str]:
    return [cell.strip().strip("`") for cell in line.strip().strip("|").split("|")]


def read_tables(path: Path = README) -> list[Table]:
    """Every markdown table of ``path``, titled by the closest bold line or heading above it."""
    tables: list[Table] = []
    title = ""
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        bold = re.fullmatch(r"\*\*(.+)\*\*", line)
        heading = re.fullmatch(r"#+\s+(.+)", line)
        if bold or heading:
            title = (bold or heading).group(1).strip()
        if line.startswith("|") and i + 1 < len(lines) and re.match(r"\|[-:| ]+\|$", lines[i + 1]):
            header, rows = _cells(line), []
            i += 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            tables.append(Table(title, header, rows))
            continue
        i += 1
    return tables


def step_tables(path: Path = README) -> list[Table]:
    """The step benchmarks that have a plain step to compare with (a ``vs plain`` column)."""
    found = [
        t
        for t in read_tables(path)
        if "median (ms)" in t.header and any(r[1] != "-" for r in t.rows)
    ]
    found = [t for t in found if any(row[0].endswith("_plain") for row in t.rows)]
    if not found:
        raise ValueError(f"no step table (with a *_plain row) in {path}")
    return found


def aggregator_times(path: Path = README) -> tuple[list[int], dict[str, list[float | None]]]:
    """The "aggregators alone" table: the values of ``m`` and each method's median times (ms)."""
    for table in read_tables(path):
        if table.header and table.header[0] == "aggregator":
            ms = [int(re.sub(r"\D", "", h)) for h in table.header[1:]]
            times = {
                row[0]: [None if c in {"-", ""} else float(c) for c in row[1:]]
                for row in table.rows
            }
            return ms, times
    raise ValueError(f"no table whose first column is 'aggregator' in {path}")


def median_ms(benchmark: str, path: Path = README) -> float:
    """The median time (ms) of one step or weighting benchmark, by its exact name."""
    for table in read_tables(path):
        if "median (ms)" in table.header and benchmark in table.column("benchmark"):
            return parse_float(
                table.column("median (ms)")[table.column("benchmark").index(benchmark)]
            )
    raise ValueError(f"no benchmark named {benchmark!r} in {path}")


def parse_float(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("x"))
