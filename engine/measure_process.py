"""The measured-run child process driver (kept here for imports; it lives in engine.measure.process)."""

from engine.measure.process import MeasureEvent, MeasureProcess, measure_in_child

__all__ = ["MeasureEvent", "MeasureProcess", "measure_in_child"]
