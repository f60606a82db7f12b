"""`headroom compare --png`: draw comparison rows offscreen with the app's own compare charts."""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence


def _application():
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY") and sys.platform.startswith("linux"):
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtWidgets import QApplication

    return QApplication.instance() or QApplication([sys.argv[0] if sys.argv else "headroom"])


def render_compare_png(rows: Sequence[dict[str, Any]], path: str, width: int = 1400, height: int = 900) -> None:
    """Write a PNG of the comparison (memory by category, tokens/s, memory vs throughput)."""
    app = _application()
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice, QSaveFile

    from app.theme import apply_theme
    from app.widgets.compare_view import CompareCharts
    from engine.errors import BadInput

    if not getattr(app, "_headroom_themed", False):
        apply_theme(app, dark=False)
    charts = CompareCharts()
    charts.resize(width, height)
    charts.set_rows(rows)
    charts.show()
    app.processEvents()
    charts.set_rows(rows)  # ranges settle once the widget has its size
    app.processEvents()
    image = charts.grab()
    charts.close()
    charts.deleteLater()
    data = QByteArray()
    buffer = QBuffer(data)
    buffer.open(QIODevice.OpenModeFlag.WriteOnly)
    image.save(buffer, "PNG")
    out = QSaveFile(str(path))
    if not out.open(QIODevice.OpenModeFlag.WriteOnly):
        raise BadInput(f"cannot write {path}: {out.errorString()}")
    out.write(data)
    if not out.commit():
        raise BadInput(f"cannot write {path}: {out.errorString()}")
