"""Tests of the package's layout: the tools sit beside the library, never inside it.

The tools are the ``cancelflow`` command and what it runs, ``demo`` and ``bench``, all in
:mod:`cancelflow._cli`. Everything else in ``src/cancelflow`` is the library: it never
imports the tools, and ``import cancelflow`` loads neither them nor any peer the bench
measures. Only ``cancelflow/__main__.py`` (``python -m cancelflow``) imports the command.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import cancelflow

PACKAGE = Path(cancelflow.__file__).resolve().parent
TOOLS = "cancelflow._cli"
#: ``python -m cancelflow`` runs the command: an entry point of the tools, not the library.
ENTRY_POINT = PACKAGE / "__main__.py"
#: Imported by the tools only: the peers the bench measures, its plot, the demo's bars.
TOOL_ONLY = ("pebble", "loky", "anyio", "trio", "trio_parallel", "matplotlib", "rich")
#: Modules that worker processes import by reference (a task function, a node).
WORKER_SIDE = ("cancelflow._cli.bench.tasks", "cancelflow._cli.demo.nodes")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module an import in ``path`` names, at any depth (relative ones resolved);
    for ``from X import a`` both ``X`` and ``X.a`` (``a`` may be a submodule)."""
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _is_tools(module: str) -> bool:
    return module == TOOLS or module.startswith(TOOLS + ".")


def _library_files() -> list[Path]:
    tools = PACKAGE / "_cli"
    return sorted(
        path for path in PACKAGE.rglob("*.py") if tools not in path.parents and path != ENTRY_POINT
    )


def _modules_loaded_by(code: str) -> list[str]:
    """``sys.modules`` of a fresh interpreter once it has run ``code``."""
    script = (
        f"{code}\n"
        "import json, sys, cancelflow\n"
        "print(json.dumps([cancelflow.__file__, sorted(sys.modules)]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    where, modules = json.loads(done.stdout.splitlines()[-1])
    assert Path(where).resolve() == Path(cancelflow.__file__).resolve()  # the same package
    loaded: list[str] = modules
    return loaded


def _tool_only(modules: list[str]) -> list[str]:
    return [m for m in modules if m.split(".")[0] in TOOL_ONLY or _is_tools(m)]


class TestTheLibraryNeverImportsTheTools:
    def test_the_walk_sees_the_library_and_the_tools(self) -> None:
        """Test that the walk below covers the library's modules (backends included) and
        not the tools', and that it resolves relative imports."""
        names = {_module_name(path) for path in _library_files()}
        assert {"cancelflow", "cancelflow._token", "cancelflow._backends._dask_worker"} <= names
        assert not any(_is_tools(name) for name in names)
        assert "cancelflow._token" in _imports(PACKAGE / "__init__.py")
        assert TOOLS in _imports(ENTRY_POINT)

    def test_no_library_module_imports_the_tools(self) -> None:
        """Test that no module of ``src/cancelflow`` outside ``_cli/`` imports the tools,
        not even lazily inside a function."""
        offenders = {
            _module_name(path): sorted(m for m in _imports(path) if _is_tools(m))
            for path in _library_files()
        }
        assert {name: found for name, found in offenders.items() if found} == {}

    def test_nothing_in_the_package_imports_the_benchmarks(self) -> None:
        """Test that no module of ``src/cancelflow``, the tools included, imports
        ``benchmarks/`` (the benchmarks use the bench, not the other way round)."""
        offenders = {
            _module_name(path): sorted(m for m in _imports(path) if m.split(".")[0] == "benchmarks")
            for path in PACKAGE.rglob("*.py")
        }
        assert {name: found for name, found in offenders.items() if found} == {}

    def test_import_cancelflow_loads_no_tool_and_no_peer(self) -> None:
        """Test that ``import cancelflow`` in a fresh interpreter loads no module of the
        tools and none of the peers, the plot or the progress bars they use."""
        assert _tool_only(_modules_loaded_by("import cancelflow")) == []


class TestTheToolsLoadLazily:
    def test_building_the_command_loads_no_peer(self) -> None:
        """Test that building the command's parser (``cancelflow --help``) imports no peer:
        the bench imports one only when it measures it."""
        loaded = _modules_loaded_by("from cancelflow._cli import build_parser; build_parser()")
        assert "cancelflow._cli.bench.cli" in loaded
        assert "cancelflow._cli.demo.cli" in loaded
        assert [m for m in loaded if m.split(".")[0] in TOOL_ONLY] == []

    @pytest.mark.parametrize("module", WORKER_SIDE)
    def test_a_worker_imports_only_the_module_it_needs(self, module: str) -> None:
        """Test that importing a module of task functions loads no other module of the
        tools than its packages (whose ``__init__`` imports nothing)."""
        parts = module.split(".")
        packages = {".".join(parts[:n]) for n in range(2, len(parts) + 1)}
        loaded = _modules_loaded_by(f"import {module}")
        assert sorted(m for m in loaded if _is_tools(m)) == sorted(packages)
        assert [m for m in loaded if m.split(".")[0] in TOOL_ONLY] == []


#: Private names of the standard library the library uses on purpose, each for a reason
#: its module documents (the same traceback text as ``ProcessPoolExecutor``).
STDLIB_PRIVATE_IMPORTS = {("concurrent.futures.process", "_RemoteTraceback")}


def _reach_ins(name: str, source: str, *, is_package: bool = False) -> list[str]:
    """``from M import _name`` of a private name that is not a module, and
    ``module._name`` on a module of the package imported by name: the ways one module
    reaches into another's private parts (attributes of objects are out of reach of an
    AST walk; package-internal handles are public names of private modules)."""
    package = name.split(".") if is_package else name.split(".")[:-1]
    tree = ast.parse(source, name)
    modules: set[str] = set()  # local names bound to a module of the package
    found: list[str] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
        module = ".".join(part for part in (base, node.module or "") if part)
        for alias in node.names:
            target = f"{module}.{alias.name}"
            is_module = _is_package_module(target)
            if is_module:
                modules.add(alias.asname or alias.name)
            private = alias.name.startswith("_") and not alias.name.startswith("__")
            if private and not is_module and (module, alias.name) not in STDLIB_PRIVATE_IMPORTS:
                found.append(f"line {node.lineno}: from {module} import {alias.name}")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return found


def _is_package_module(dotted: str) -> bool:
    if not dotted.startswith("cancelflow."):
        return False
    path = PACKAGE.joinpath(*dotted.split(".")[1:])
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


class TestNoReachIns:
    def test_the_check_finds_a_reach_in(self) -> None:
        """Test that the walk below reports both kinds of reach-in it looks for, and
        not a private module imported by name."""
        source = (
            "from ._token import _Cell\nfrom . import _context\n_context._critical_hook = None\n"
        )
        assert _reach_ins("cancelflow._probe", source) == [
            "line 1: from cancelflow._token import _Cell",
            "line 3: _context._critical_hook",
        ]

    def test_no_library_module_reaches_into_another(self) -> None:
        """Test that no module of the library imports another module's private name or
        reads a private attribute of another module: it goes through the documented
        package-internal handles (public names of the private modules) instead."""
        offenders = {
            _module_name(path): _reach_ins(
                _module_name(path),
                path.read_text(encoding="utf-8"),
                is_package=path.name == "__init__.py",
            )
            for path in _library_files()
        }
        assert {name: found for name, found in offenders.items() if found} == {}
