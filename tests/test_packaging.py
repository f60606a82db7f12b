"""Packaging: what a wheel carries and how the engine finds it (the full wheel check, install in a
fresh venv and run from a foreign folder, is scripts/check_wheel.sh)."""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import tomllib
from pathlib import Path

import pytest

from engine import models
from engine.data.tokens import FALLBACK_PATH
from engine.resources import RESOURCES

ROOT = Path(__file__).resolve().parent.parent


def test_package_data_covers_every_resource_file():
    """A file under engine/resources/ that no package-data glob names would be missing from the
    wheel (it loads from a checkout, not from an install)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["engine.resources"]
    carried = {p for g in globs for p in RESOURCES.glob(g)}
    present = {p for p in RESOURCES.rglob("*")
               if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts}
    assert present and present <= carried, sorted(str(p.relative_to(RESOURCES)) for p in present - carried)


def test_resources_are_found_inside_the_engine_package():
    assert RESOURCES == Path(models.__file__).resolve().parent / "resources"
    assert models.PRESET_DIR.parent == RESOURCES and FALLBACK_PATH.is_relative_to(RESOURCES)
    assert {"gpt2", "tiny-gpt2", "tiny-llama", "tiny-bert"} <= set(models.list_presets())
    assert not (ROOT / "resources").exists()  # one home: the package


class _BrokenModule(importlib.abc.MetaPathFinder):
    """Makes importing one module fail as a half-edited file does."""

    def __init__(self, name: str, error: type[Exception]) -> None:
        self.name, self.error = name, error

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name:
            raise self.error(f"broken on purpose ({self.name})")
        return None


def _break(monkeypatch, module: str, *importers: str, error: type[Exception] = SyntaxError) -> None:
    for name in (module, *importers):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "meta_path", [_BrokenModule(module, error), *sys.meta_path])


@pytest.mark.parametrize("error", [SyntaxError, ImportError])
def test_a_broken_engine_module_surfaces_in_the_cli(monkeypatch, error):
    """No guard turns a broken engine module into "not available yet" (exit 2)."""
    from engine import cli

    _break(monkeypatch, "engine.estimate", error=error)
    with pytest.raises(error, match=r"engine\.estimate"):
        cli.main(["estimate", "--model", "tiny-gpt2", "--json"])


@pytest.mark.parametrize("module, importer", [("engine.estimate", "app.estimator"),
                                              ("engine.export", "app.main_window"),
                                              ("engine.measure.process", "app.widgets.run_panel"),
                                              ("engine.techniques.base", "app.widgets.technique_panel")])
def test_a_broken_engine_module_surfaces_in_the_app(monkeypatch, module, importer):
    pytest.importorskip("PySide6")
    _break(monkeypatch, module, importer)
    with pytest.raises(SyntaxError, match=module.replace(".", r"\.")):
        importlib.import_module(importer)
