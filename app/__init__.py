"""Headroom's desktop front end (PySide6 + pyqtgraph). Imports Qt lazily: `headroom measure` on a
machine without PySide6 goes straight to the engine's command line."""
