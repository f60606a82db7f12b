"""Measured runs: real steps on CUDA or CPU, peaks, throughput, timeline; OOM is a result.

    result = run_measure(profile, progress=None, should_stop=None, snapshot=None)   # in-process
    result = measure_in_child(profile, progress=None, should_stop=None)             # child process

``run_measure`` is what the CLI's ``measure`` command runs (engine/measure/runner.py documents the
protocol; inputs.py the step tensors, probes.py the memory reads, attribution.py how the breakdown is
split, loop.py the steps); ``MeasureProcess`` / ``measure_in_child`` drive that
command as a child process (engine/measure/process.py), which the app and ``compare --measure`` use
so an OOM, a poisoned CUDA context or a crash cannot take them down. Importing this package does not
import torch.
"""

from __future__ import annotations

from engine.measure.process import MeasureEvent, MeasureProcess, measure_in_child


def run_measure(profile, progress=None, should_stop=None, snapshot=None):
    """Run the profile's steps for real in this process (see ``engine.measure.runner``)."""
    from engine.measure.runner import run_measure as _run

    return _run(profile, progress=progress, should_stop=should_stop, snapshot=snapshot)


__all__ = ["MeasureEvent", "MeasureProcess", "measure_in_child", "run_measure"]
