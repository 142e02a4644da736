"""Tests for the public surface, :mod:`cancelflow` itself."""

from __future__ import annotations
import __future__

import ast
import importlib
import inspect
import pathlib
import types

import pytest

import cancelflow

INIT = pathlib.Path(cancelflow.__file__)
SEED_NAMES = ("CancellationToken", "CancelledException")


def _bound_by_imports() -> list[str]:
    """Every name that an import statement of ``cancelflow/__init__.py`` binds."""
    names: list[str] = []
    for node in ast.parse(INIT.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            names.extend(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            names.extend(alias.asname or alias.name.split(".")[0] for alias in node.names)
    return names


def _defined_in_init() -> list[str]:
    """Names that ``cancelflow/__init__.py`` binds at top level other than by import."""
    names: list[str] = []
    for node in ast.parse(INIT.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names.extend(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.append(node.target.id)
    return names


def _public_names() -> list[str]:
    """The public surface: names ``cancelflow/__init__.py`` binds that do not start with _."""
    return sorted({n for n in _bound_by_imports() + _defined_in_init() if not n.startswith("_")})


PUBLIC = _public_names()


class TestPublicSurface:
    def test_public_surface_is_not_empty(self) -> None:
        """Test that the package exports something, the seed names included."""
        assert set(SEED_NAMES) <= set(PUBLIC)

    @pytest.mark.parametrize("name", SEED_NAMES)
    def test_seed_names_import_from_top_level(self, name: str) -> None:
        """Test that the seed's names import from ``cancelflow`` directly."""
        namespace: dict[str, object] = {}
        exec(f"from cancelflow import {name}", namespace)
        assert namespace[name] is getattr(cancelflow, name)

    @pytest.mark.parametrize("name", PUBLIC)
    def test_name_is_importable(self, name: str) -> None:
        """Test that a public name imports from the top level."""
        module = importlib.import_module("cancelflow")
        assert getattr(module, name) is getattr(cancelflow, name)

    @pytest.mark.parametrize("name", PUBLIC)
    def test_name_reports_public_module(self, name: str) -> None:
        """Test that a public class or function says it lives in ``cancelflow``."""
        value = getattr(cancelflow, name)
        if isinstance(value, types.ModuleType):
            assert value.__name__ == f"cancelflow.{name}"
        elif inspect.isclass(value) or inspect.isroutine(value):
            assert value.__module__ == "cancelflow"

    @pytest.mark.parametrize(
        "name", [n for n in PUBLIC if isinstance(getattr(cancelflow, n), types.ModuleType)] or ["-"]
    )
    def test_public_submodule_declares_all(self, name: str) -> None:
        """Test that a public submodule has an ``__all__`` tuple of names it defines."""
        if name == "-":
            pytest.skip("no public submodule yet")
        module = getattr(cancelflow, name)
        assert isinstance(module.__all__, tuple)
        for exported in module.__all__:
            assert hasattr(module, exported)

    def test_each_name_exported_once(self) -> None:
        """Test that no name is bound twice by the imports of ``__init__.py``."""
        bound = _bound_by_imports()
        duplicates = sorted({name for name in bound if bound.count(name) > 1})
        assert duplicates == []

    def test_every_public_name_comes_from_an_import_line(self) -> None:
        """Test that every public name is a re-export, not defined in ``__init__.py``."""
        assert set(PUBLIC) <= set(_bound_by_imports())

    def test_no_undeclared_public_attribute(self) -> None:
        """Test that the package has no public attribute beyond what ``__init__.py`` binds."""
        stray = sorted(
            name
            for name, value in vars(cancelflow).items()
            if not name.startswith("_")
            and name not in PUBLIC
            and not isinstance(value, (types.ModuleType, __future__._Feature))
        )
        assert stray == []

    def test_dunder_all_matches_if_present(self) -> None:
        """Test that ``__all__``, if the package declares one, lists exactly the public names."""
        declared = getattr(cancelflow, "__all__", None)
        if declared is None:
            pytest.fail("the package must declare __all__")
        assert sorted(declared) == PUBLIC


class TestDocumentation:
    def test_the_token_shows_its_real_signature(self) -> None:
        """Test that help() and IDEs see CancellationToken(*, timeout, name), not the
        (*args, **kwargs) of the __new__ that places it in shared memory."""
        import inspect

        parameters = inspect.signature(cancelflow.CancellationToken).parameters
        assert list(parameters) == ["timeout", "name"]

    def test_no_public_docstring_talks_about_design_documents(self) -> None:
        """Test that the docstrings users read (every public name and its methods) speak
        to users, not about the project's design documents ("seed")."""
        found = []
        for name in cancelflow.__all__:
            obj = getattr(cancelflow, name)
            docs = [(name, getattr(obj, "__doc__", None))]
            if isinstance(obj, type):
                docs += [(f"{name}.{k}", getattr(v, "__doc__", None)) for k, v in vars(obj).items()]
            found += [where for where, doc in docs if doc and "seed" in doc.lower()]
        assert found == []


def test_every_public_name_is_in_the_reference_site() -> None:
    """Test that each name of cancelflow.__all__ has a ``::: cancelflow.NAME`` entry in
    docs/reference/, so the reference site documents the whole public API."""
    reference = pathlib.Path(__file__).parent.parent / "docs" / "reference"
    entries = {
        line.removeprefix("::: cancelflow.").strip()
        for page in reference.glob("*.md")
        for line in page.read_text(encoding="utf-8").splitlines()
        if line.startswith("::: cancelflow.")
    }
    assert set(cancelflow.__all__) - entries == set()
