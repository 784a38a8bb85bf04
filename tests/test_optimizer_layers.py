"""The package's layers: imports only go down (optimizer -> path -> engines -> aggregation).

Following ``losses`` from ``JacobianOptimizer.backward`` must never lead back up to a module that
called it; this pins the order of the layers on the import statements of every module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import jdoptim

# Lower number: higher layer. A module may import from its own layer or any lower one.
LAYERS = {
    "jdoptim": 0,
    "jdoptim.optimizer": 1,
    "jdoptim.diagnostics": 2,
    "jdoptim.functional": 1,
    "jdoptim.autojac": 1,
    "jdoptim.autogram": 1,
    "jdoptim._path": 2,
    "jdoptim._scalarized": 2,
    "jdoptim._distributed": 3,
    "jdoptim._fsdp": 3,
    "jdoptim._aggregator_state": 3,
    "jdoptim._validation": 3,
    "jdoptim.engine": 4,
    "jdoptim.scalarization": 4,
    "jdoptim.aggregation": 5,
    "jdoptim.linalg": 6,
    "jdoptim._module": 7,
}


def _layer(module: str) -> int:
    while module not in LAYERS:
        module = module.rpartition(".")[0]
    return LAYERS[module]


def _imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return [name for name in found if name == "jdoptim" or name.startswith("jdoptim.")]


def test_every_import_goes_down_the_layers():
    root = Path(jdoptim.__file__).parent
    upward = []
    paths = sorted(root.rglob("*.py"))
    assert root / "_path" / "_weigh.py" in paths
    for path in paths:
        parts = path.relative_to(root.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for target in _imports(path):
            if _layer(target) < _layer(module):
                upward.append(f"{module} imports {target}")
    assert not upward, upward
