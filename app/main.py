"""Start the Qt application and show the main window."""

from __future__ import annotations

import sys


def run_app(argv: list[str] | None = None) -> int:
    from PySide6.QtWidgets import QApplication

    from app.main_window import MainWindow

    app = QApplication.instance() or QApplication(argv or sys.argv[:1])
    app.setApplicationName("Headroom")
    app.setOrganizationName("Headroom")
    window = MainWindow()
    window.show()
    return app.exec()
