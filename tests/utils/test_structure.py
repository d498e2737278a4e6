"""The package's structure rules, checked on its source: no import of the package root, no import
of our own modules inside functions (a dodged cycle), no reads of another module's private names,
and functions short enough to read at once. The layer contracts themselves are import-linter's
(``lint-imports``, run by CI); ``test_layers_contract`` runs it too."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(REPO, "xcodec2_jax")
MAX_FUNCTION_LINES = 60
LONG_REASON = "# long:"


def _modules():
    for dirpath, dirnames, filenames in os.walk(PACKAGE):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                rel = rel.removesuffix(".__init__")
                with open(path, encoding="utf-8") as f:
                    yield rel, path, ast.parse(f.read(), path)


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom in ``module`` names."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    # Relative to the module's package: a package's __init__ is its own package.
    base = parts[: len(parts) - node.level + (1 if _is_package(module) else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_package(module: str) -> bool:
    return os.path.isfile(os.path.join(REPO, *module.split("."), "__init__.py"))


MODULES = list(_modules())


def test_no_module_imports_the_package_root():
    offenders = []
    for module, _path, tree in MODULES:
        if module == "xcodec2_jax":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and _resolve(module, node) == "xcodec2_jax":
                offenders.append(f"{module}:{node.lineno}")
            if isinstance(node, ast.Import) and any(a.name == "xcodec2_jax" for a in node.names):
                offenders.append(f"{module}:{node.lineno}")
    assert not offenders, offenders


def test_no_import_of_our_modules_inside_functions():
    """Lazy imports of heavy optional dependencies are fine; of our own modules they hide cycles."""
    offenders = []
    for module, _path, tree in MODULES:
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and _resolve(module, node).startswith("xcodec2_jax"):
                    offenders.append(f"{module}.{fn.name}:{node.lineno}")
    assert not offenders, offenders


def test_no_module_reads_another_modules_private_names():
    """``from x import _name`` and ``x._name`` on an imported module of ours are not allowed."""
    offenders = []
    for module, _path, tree in MODULES:
        ours = {}  # local name -> our module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(module, node)
                if not target.startswith("xcodec2_jax"):
                    continue
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        offenders.append(f"{module}:{node.lineno} imports {target}.{alias.name}")
                    elif _is_package(f"{target}.{alias.name}") or os.path.isfile(
                        os.path.join(REPO, *target.split("."), alias.name + ".py")
                    ):
                        ours[alias.asname or alias.name] = f"{target}.{alias.name}"
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in ours
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                offenders.append(f"{module}:{node.lineno} reads {ours[node.value.id]}.{node.attr}")
    assert not offenders, offenders


def test_functions_are_short_or_say_why():
    offenders = []
    for module, path, tree in MODULES:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = fn.end_lineno - fn.lineno + 1
                header = lines[max(fn.lineno - 2, 0) : fn.lineno + 1]
                if length > MAX_FUNCTION_LINES and not any(LONG_REASON in line for line in header):
                    offenders.append(f"{module}.{fn.name}: {length} lines")
    assert not offenders, offenders


@pytest.mark.subprocess
def test_layers_contract():
    """import-linter's contracts in pyproject.toml: layers, no cycles (imports inside functions
    counted), private modules."""
    result = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "broken" in result.stdout and "0 broken" in result.stdout
