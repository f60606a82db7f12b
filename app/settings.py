"""Where the app keeps its state: QSettings (IniFormat) and the autosaved profiles folder.

``HEADROOM_SETTINGS_DIR`` overrides the location (tests point it at a temporary folder), so a test
never reads or writes the user's real settings.
"""

from __future__ import annotations

import os
from pathlib import Path

from PySide6.QtCore import QSettings, QStandardPaths


def settings_dir() -> Path:
    override = os.environ.get("HEADROOM_SETTINGS_DIR")
    if override:
        path = Path(override)
    else:
        base = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.AppConfigLocation)
        path = Path(base or Path.home() / ".config" / "headroom")
        if path.name.lower() != "headroom":
            path = path / "headroom"
    path.mkdir(parents=True, exist_ok=True)
    return path


def profiles_dir() -> Path:
    path = settings_dir() / "profiles"
    path.mkdir(parents=True, exist_ok=True)
    return path


def make_settings() -> QSettings:
    """A QSettings object backed by an INI file in the settings folder."""
    return QSettings(str(settings_dir() / "headroom.ini"), QSettings.Format.IniFormat)
