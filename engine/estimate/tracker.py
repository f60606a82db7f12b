"""Compatibility for bench/ scripts: the tracker is ``engine.measure.probes.LiveBytesTracker``.

Remove once bench/bench_estimators.py imports engine.measure.probes.
"""

from engine.measure.probes import LiveBytesTracker as MemoryTracker  # noqa: F401
from engine.results import MemoryCategory

WEIGHTS, GRADIENTS, OPTIMIZER, ACTIVATIONS, TEMPORARIES = (
    c.value for c in (MemoryCategory.WEIGHTS, MemoryCategory.GRADIENTS, MemoryCategory.OPTIMIZER,
                      MemoryCategory.ACTIVATIONS, MemoryCategory.TEMPORARIES))
