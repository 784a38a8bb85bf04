"""The README's python blocks run as written, top to bottom, in one interpreter."""

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run_in_order(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 3
    namespace: dict = {"__name__": "__readme__"}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert "torch.Size([64])" in capsys.readouterr().out
    assert all(p.grad is not None for p in namespace["model"].parameters())


def test_ci_runs_the_readme_test_command():
    ci = (README.parent / ".ci" / "run").read_text()
    first_block = re.search(r"```sh\n(.*?)```", README.read_text(), flags=re.DOTALL).group(1)
    assert "pytest" in first_block.splitlines()[1]
    assert "README.md" in ci and "pytest" in ci


def _sh_lines() -> list[str]:
    block = re.search(r"```sh\n(.*?)```", README.read_text(), flags=re.DOTALL).group(1)
    return block.strip().splitlines()


def test_the_first_command_runs_the_demo_with_the_examples_extra():
    install, _, run = _sh_lines()[0].partition("-e ")
    assert "torch==2.13.0" in install
    assert "examples" in re.match(r'"\.\[([^\]]*)\]"', run)[1].split(",")
    script = re.search(r"python (\S+\.py)", run)[1]
    assert (README.parent / script).is_file()
    assert script == "examples/multitask_demo.py"


def _extras() -> dict[str, list[str]]:
    """``[project]`` dependencies (key ``""``) and optional extras, as distribution names."""
    text = (README.parent / "pyproject.toml").read_text()
    groups = {"": re.search(r"^dependencies = \[(.*?)\]", text, re.M | re.S)[1]}
    extras = re.search(r"\[project\.optional-dependencies\]\n(.*?)\n\[", text, re.S)[1]
    groups |= dict(re.findall(r"^(\w+) = \[(.*?)\]", extras, re.M | re.S))
    return {
        k: [re.split(r"[<>=\[ ]", d)[0].lower() for d in re.findall(r'"([^"]+)"', v)]
        for k, v in groups.items()
    }


def test_the_test_command_installs_every_module_the_tests_and_examples_import():
    """Each third-party module imported by tests/, examples/ or a doctest's package comes from
    a distribution in the core dependencies or in an extra the test command installs."""
    line = _sh_lines()[1]
    assert "torch==2.13.0" in line
    installed_extras = re.search(r'"\.\[([^\]]*)\]"', line)[1].split(",")
    extras = _extras()
    allowed = set(extras[""]).union(*(extras[e] for e in installed_extras))
    local = {"jdoptim", "tests", "_digits", "_helpers"}
    modules = set()
    for path in [*README.parent.glob("tests/**/*.py"), *README.parent.glob("examples/*.py")]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", None) == "importorskip"
                and isinstance(node.args[0], ast.Constant)
            ):
                modules.add(node.args[0].value.split(".")[0])
    third_party = modules - set(sys.stdlib_module_names) - local - {"__future__"}
    providers = importlib.metadata.packages_distributions()
    missing = {}
    for module in sorted(third_party):
        names = {d.lower() for d in providers.get(module, [module])}
        if not names & allowed and module != "torchjd":  # the peer: an optional oracle
            missing[module] = sorted(names)
    assert not missing, f"imported but not installed by the README's test command: {missing}"
