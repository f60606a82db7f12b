"""Packaging: what a wheel carries and how the engine finds it (the full wheel check, install in a
fresh venv and run from a foreign folder, is scripts/check_wheel.sh)."""

from __future__ import annotations

import tomllib
from pathlib import Path

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
