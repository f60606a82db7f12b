"""Light and dark palettes (Fusion style), both readable; plots follow the palette."""

from __future__ import annotations

from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import QApplication


def _palette(dark: bool) -> QPalette:
    pal = QPalette()
    R = QPalette.ColorRole
    if dark:
        colors = {R.Window: "#2B2D31", R.WindowText: "#E8E8E8", R.Base: "#1E1F22", R.AlternateBase: "#2B2D31",
                  R.ToolTipBase: "#3A3C42", R.ToolTipText: "#F0F0F0", R.Text: "#E8E8E8", R.Button: "#3A3C42",
                  R.ButtonText: "#E8E8E8", R.BrightText: "#FF6B6B", R.Highlight: "#4C72B0",
                  R.HighlightedText: "#FFFFFF", R.Link: "#8AB4F8", R.PlaceholderText: "#9A9A9A"}
    else:
        colors = {R.Window: "#F3F4F6", R.WindowText: "#1D1D1F", R.Base: "#FFFFFF", R.AlternateBase: "#F0F1F3",
                  R.ToolTipBase: "#FFFFE8", R.ToolTipText: "#1D1D1F", R.Text: "#1D1D1F", R.Button: "#E9EAED",
                  R.ButtonText: "#1D1D1F", R.BrightText: "#D0342C", R.Highlight: "#4C72B0",
                  R.HighlightedText: "#FFFFFF", R.Link: "#2F5597", R.PlaceholderText: "#8A8A8A"}
    for role, value in colors.items():
        pal.setColor(role, QColor(value))
    disabled = QColor("#7A7A7A" if dark else "#A0A0A0")
    for role in (R.WindowText, R.Text, R.ButtonText):
        pal.setColor(QPalette.ColorGroup.Disabled, role, disabled)
    return pal


def apply_theme(app: QApplication, dark: bool) -> None:
    app.setStyle("Fusion")
    app.setPalette(_palette(dark))
    app._headroom_themed = True  # type: ignore[attr-defined]
    try:
        from app.widgets.common import restyle_all

        restyle_all()
    except ImportError:  # pragma: no cover - pyqtgraph missing
        pass
