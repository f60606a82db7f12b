"""Compatibility for bench/ scripts: the tracker lives in ``engine.measure.probes``.

Remove once bench/gpu_techniques.py imports engine.measure.probes.
"""

from engine.measure.probes import LiveBytesTracker, RssSampler, SimulatedOutOfMemory  # noqa: F401
