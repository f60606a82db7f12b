"""Sequence-length statistics (what padding and the largest batch depend on)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.errors import BadInput


@dataclass(frozen=True)
class LengthStats:
    count: int  # number of sequences
    mean: float  # mean length in tokens
    median: float  # 50th percentile (linear interpolation, as numpy's default)
    p90: float  # 90th percentile
    p99: float  # 99th percentile
    max: int  # longest sequence
    min: int  # shortest sequence
    total_tokens: int  # sum of lengths
    histogram_edges: tuple[float, ...] = ()  # bin edges, len(counts) + 1 (log-spaced if asked)
    histogram_counts: tuple[int, ...] = ()  # sequences per bin; the last bin includes its right edge

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["histogram_edges"] = list(self.histogram_edges)
        d["histogram_counts"] = list(self.histogram_counts)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LengthStats:
        d = dict(d)
        d["histogram_edges"] = tuple(d.get("histogram_edges", ()))
        d["histogram_counts"] = tuple(d.get("histogram_counts", ()))
        return cls(**d)


def _percentile(sorted_values: Sequence[int], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default method)."""
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))


def length_stats(lengths: Sequence[int], bins: int = 32, log_bins: bool = False) -> LengthStats:
    """Summary of sequence lengths; an empty list gives all zeros and no histogram.

    ``log_bins`` spaces the histogram edges geometrically, which suits heavy-tailed lengths.
    """
    if bins < 1:
        raise BadInput(f"bins must be >= 1; got {bins}")
    values = sorted(int(n) for n in lengths)
    if not values:
        return LengthStats(0, 0.0, 0.0, 0.0, 0.0, 0, 0, 0)
    if values[0] < 0:
        raise BadInput("sequence lengths cannot be negative")
    lo, hi = values[0], values[-1]
    if hi == lo:
        edges = [float(lo), float(lo + 1)]
    elif log_bins:
        a, b = math.log(max(lo, 1)), math.log(hi)
        edges = [math.exp(a + (b - a) * i / bins) for i in range(bins + 1)]
        edges[0], edges[-1] = float(lo), float(hi)
    else:
        edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)]
    counts = [0] * (len(edges) - 1)
    j = 0
    for v in values:  # values ascend, so the bin index only moves forward
        while j < len(counts) - 1 and v >= edges[j + 1]:
            j += 1
        counts[j] += 1
    total = sum(values)
    return LengthStats(
        count=len(values), mean=total / len(values), median=_percentile(values, 50),
        p90=_percentile(values, 90), p99=_percentile(values, 99), max=hi, min=lo,
        total_tokens=total, histogram_edges=tuple(edges), histogram_counts=tuple(counts))
