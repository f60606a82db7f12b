"""Main window (placeholder until the desktop-app panels land): shows the built-in sample's facts."""

from __future__ import annotations

from PySide6.QtWidgets import QLabel, QMainWindow

from engine import data
from engine.profile import Profile


class MainWindow(QMainWindow):
    def __init__(self, profile: Profile | None = None) -> None:
        super().__init__()
        self.profile = profile or Profile()
        self.setWindowTitle("Headroom")
        texts = data.load_texts(self.profile.dataset)
        self.setCentralWidget(QLabel(f"{self.profile.model}: built-in sample with {len(texts):,} texts"))
        self.resize(1200, 800)
