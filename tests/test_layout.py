"""The folder tree is the architecture: the rules of design.md's layout, checked on the source (import contracts with
import-linter, and what it does not see: circles through package __init__s, function-level imports, sizes, private
names, tests importing tests)."""

import ast
import subprocess
import sys
from pathlib import Path

import grimp
import pytest


ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hf_ewc"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES = 450
MAX_CLASS_LINES = 300


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_import_contracts_hold():
    pytest.importorskip("importlinter")
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout and "7 kept" in done.stdout, done.stdout[-2000:]


def test_no_import_circle_anywhere_in_the_package():
    """Every import, at module or function level, package __init__s included: a circle would mean a lower module
    reaches an upper one through some path."""
    graph = grimp.build_graph("hf_ewc", include_external_packages=False)
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                circle = path[path.index(target) :] + [target]
                pytest.fail("import circle: " + " → ".join(circle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_function_level_imports_are_only_for_optional_or_heavy_dependencies():
    found = []
    for path in MODULES:
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        line = lines[inner.lineno - 1]
                        comment = line.partition("#")[2].lower()
                        if "optional" not in comment and "heavy" not in comment:
                            found.append(f"{path.relative_to(ROOT)}:{inner.lineno}: {line.strip()}")
                        if isinstance(inner, ast.ImportFrom) and inner.level:
                            found.append(f"{path.relative_to(ROOT)}:{inner.lineno}: a package import in a function")
    assert not found, "function-level imports need a reason (optional/heavy dependency):\n" + "\n".join(found)


def test_modules_and_classes_stay_small():
    too_long = []
    for path in MODULES:
        tree = _tree(path)
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {lines} lines")
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                too_long.append(f"{path.relative_to(ROOT)}: class {node.name} {node.end_lineno - node.lineno + 1}")
    assert not too_long, too_long


def test_no_private_name_crosses_a_module_boundary():
    """``from .x import _name`` is a private name used outside its module; private *modules* (``_loop``) are
    checked by the import contract (only their own package imports them)."""
    found = []
    for path in MODULES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("hf_ewc")):
                private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__version__"]
                if private:
                    found.append(f"{path.relative_to(ROOT)}: from {'.' * node.level}{node.module} import {private}")
    assert not found, found


def test_tests_import_helpers_not_other_tests():
    found = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(_tree(path)):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            found += [f"{path.name} imports {n}" for n in names if n.startswith("test_")]
    assert not found, found


def test_readme_names_where_each_module_lives():
    """README's "Where things live" has one line per module and package of hf_ewc."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Where things live", 1)[1].split("\n## ", 1)[0]
    expected = [p.relative_to(ROOT).as_posix() for p in MODULES if p.name not in ("__init__.py", "__main__.py")]
    expected += [f"{p.relative_to(ROOT).as_posix()}/" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()]
    missing = [name for name in expected if f"`{name}`" not in section]
    assert not missing, missing
