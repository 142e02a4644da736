"""A package whose names are imported one by one, as they are asked for: the zygote's.

cancelflow's ``__init__`` imports all of it (asyncio, the executor, the pools' parent
side), and a worker, a fork of its zygote, carries whatever the zygote imported: the more
it maps, the longer the kernel takes to tear it down after a SIGKILL (a fork of a
28 MB interpreter ~0.9 ms here, of a 19.5 MB one ~0.65 ms; a caller waits for that).
So the zygote does not run the ``__init__`` of the packages it names; :func:`install`
puts in ``sys.modules`` a module for each of them, with its ``__path__`` (its submodules
import as usual) and a module ``__getattr__`` that serves the names its ``__init__``
binds by importing only the module each one comes from. ``cancelflow.CancelledException``
in a task costs nothing (the worker has it), ``cancelflow.PipelineExecutor`` imports the
executor in that worker.

Guaranteed: every name the real ``__init__`` binds by import, and its literal
assignments (``__all__``), is served, the same object as in any other process; a public
class or function of ``cancelflow`` says it lives there (as its ``__init__`` does); a
submodule's name imports the submodule. Not guaranteed: other statements of the
``__init__`` do not run (cancelflow's and ``cancelflow._process``'s have none that
matter to a worker: the tests check that a task reaches every public name); a public
class whose module a task imports without asking ``cancelflow`` for it (a
``ThreadPool`` that ``to_thread`` makes) says it lives in its private module
(``cancelflow._thread_pool``) until some code asks ``cancelflow`` for its name; the
classes the zygote has say ``cancelflow`` from the start (:func:`serve_loaded`).

Loaded by file path before ``cancelflow`` exists, so it imports nothing of cancelflow.
"""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import importlib.util
import inspect
import os
import sys
import types
from typing import Any

__all__ = ("install", "pin_standard_library", "serve_loaded", "standard_library_locations")

_installed: list[tuple[types.ModuleType, dict[str, _Source]]] = []
_public = ""  # the package whose public classes and functions say they live in it


class _Source:
    """Where one name of a package comes from: a module's attribute, or a literal."""

    __slots__ = ("attribute", "module", "value")

    def __init__(self, module: str | None, attribute: str, value: Any = None) -> None:
        self.module = module  # absolute module name, None for a literal
        self.attribute = attribute
        self.value = value


def _sources(package: str, init_file: str) -> tuple[str | None, dict[str, _Source]]:
    """The package's docstring and the names its ``__init__`` binds, read from its
    source."""
    with open(init_file, encoding="utf-8") as source:
        tree = ast.parse(source.read(), init_file)
    names: dict[str, _Source] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            for alias in node.names:
                bound = alias.asname or alias.name
                if node.module is None:  # from . import submodule
                    names[bound] = _Source(f"{base}.{alias.name}", "")
                else:
                    names[bound] = _Source(base, alias.name)
        elif isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name):
                try:
                    names[target.id] = _Source(None, target.id, ast.literal_eval(node.value))
                except (ValueError, TypeError, SyntaxError):  # not a literal: not served
                    pass
    return ast.get_docstring(tree, clean=False), names


def _serve(package: types.ModuleType, sources: dict[str, _Source], name: str) -> Any:
    source = sources.get(name)
    if source is None:
        submodule = f"{package.__name__}.{name}"
        if not name.startswith("__") and importlib.util.find_spec(submodule) is not None:
            return importlib.import_module(submodule)
        raise AttributeError(f"module {package.__name__!r} has no attribute {name!r}")
    # No lock of ours around the import: the import system's own module locks serialise
    # it, and two threads that serve one name store the same object.
    if source.module is None:
        value = source.value
    elif not source.attribute:
        value = importlib.import_module(source.module)
    else:
        value = getattr(importlib.import_module(source.module), source.attribute)
    if (
        package.__name__ == _public
        and not name.startswith("_")
        and (inspect.isclass(value) or inspect.isroutine(value))
        and getattr(value, "__module__", "").startswith(f"{package.__name__}._")
    ):
        try:  # what the real __init__ does: cancelflow.X in reprs and tracebacks
            value.__module__ = package.__name__
        except (AttributeError, TypeError):
            pass
    vars(package)[name] = value
    return value


def install(packages: tuple[str, ...], public: str) -> None:
    """Put a module for each of ``packages`` (parents first) in ``sys.modules`` that
    serves its names one by one instead of running its ``__init__``; the public names
    of package ``public`` say they live there (its ``__init__`` does that)."""
    global _public
    _public = public
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None or spec.submodule_search_locations is None:
            raise ImportError(f"{name!r} is not a package")
        package = importlib.util.module_from_spec(spec)
        package.__doc__, sources = _sources(name, spec.origin)

        def __getattr__(
            attribute: str,
            package: types.ModuleType = package,
            sources: dict[str, _Source] = sources,
        ) -> Any:
            return _serve(package, sources, attribute)

        def __dir__(
            package: types.ModuleType = package, sources: dict[str, _Source] = sources
        ) -> list[str]:
            return sorted(set(vars(package)) | set(sources))

        package.__getattr__ = __getattr__  # type: ignore[method-assign]
        package.__dir__ = __dir__  # type: ignore[method-assign]
        sys.modules[name] = package
        _installed.append((package, sources))
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, package)


def serve_loaded() -> None:
    """Serve now every name whose module is already imported, in every package
    :func:`install` made (so that what those names are says it lives in the package
    before a task asks)."""
    lazy = {package.__name__: package for package, _ in _installed}
    for package, sources in reversed(_installed):  # a subpackage's names first
        for name, source in sources.items():
            if source.module in lazy:  # served by that package only if it has it now
                loaded = source.attribute in vars(lazy[source.module])
            else:
                loaded = source.module is None or source.module in sys.modules
            if loaded:
                _serve(package, sources, name)


def standard_library_locations() -> dict[str, str]:
    """Where this process found each top-level module of the standard library it has
    imported from a file: name → the ``sys.path`` entry it came from."""
    locations: dict[str, str] = {}
    for name, module in list(sys.modules.items()):
        if "." in name or name not in sys.stdlib_module_names:
            continue
        spec = getattr(module, "__spec__", None)
        if spec is None or not spec.has_location or not spec.origin:
            continue
        directory = os.path.dirname(spec.origin)
        if spec.submodule_search_locations is not None:  # a package: .../name/__init__.py
            directory = os.path.dirname(directory)
        locations[name] = directory
    return locations


class _WhereTheOwnerFoundIt:
    """Finds the standard library's top-level modules where the pool's owner found them."""

    def __init__(self, locations: dict[str, str]) -> None:
        self.locations = locations

    def find_spec(
        self, fullname: str, path: object = None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        directory = self.locations.get(fullname)
        if directory is None:
            return None
        return importlib.machinery.PathFinder.find_spec(fullname, [directory], target)


def pin_standard_library(locations: dict[str, str]) -> None:
    """From now on, a top-level module of the standard library that the owner had (and
    this process has not) is found where the owner found it, whatever ``sys.path`` says:
    the names served here import their modules late, in a worker, after the program's
    ``sys.path`` is in place, where a program's own ``secrets.py`` must not stand in for
    the one the owner's cancelflow imported. Only directories on this process's own
    ``sys.path`` (the standard library of the same interpreter) are used."""
    ours = set(sys.path)  # (another interpreter's directories are not pinned)
    finder = _WhereTheOwnerFoundIt({n: d for n, d in locations.items() if d in ours})
    for index, other in enumerate(sys.meta_path):
        if other is importlib.machinery.PathFinder:
            sys.meta_path.insert(index, finder)
            return
    sys.meta_path.append(finder)
