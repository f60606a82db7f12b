"""Start the Qt application and show the main window (on the built-in sample, GPT-2, 24 GiB)."""

from __future__ import annotations

import sys


def run_app(argv: list[str] | None = None) -> int:
    from PySide6.QtWidgets import QApplication

    from app.main_window import MainWindow
    from app.settings import make_settings
    from app.theme import apply_theme

    app = QApplication.instance() or QApplication(argv or sys.argv[:1])
    app.setApplicationName("Headroom")
    app.setOrganizationName("Headroom")
    dark = str(make_settings().value("view/dark", "false")).lower() == "true"
    apply_theme(app, dark)
    window = MainWindow()
    window.show()
    code = app.exec()
    window.shutdown()
    return code
