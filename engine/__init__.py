"""Headroom's engine: profiles in, results out. Never imports Qt (checked by import-linter)."""

__version__ = "0.1.0"
