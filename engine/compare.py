"""Compare profiles side by side: the estimate of each and, optionally, a measured run of each.

Rows are plain dicts (they go to JSON, CSV and the app's plots unchanged).
"""

from __future__ import annotations

import csv
import io
from typing import Any, Callable, Sequence

from engine.profile import Profile, atomic_write_text
from engine.results import ALLOCATED_CATEGORIES

CSV_COLUMNS = (
    ["name", "model", "mode", "batch", "seq", "precision", "estimate_method",
     "estimate_peak_allocated_bytes", "estimate_peak_reserved_bytes", "estimate_device_used_bytes"]
    + [f"estimate_{c.value}_bytes" for c in ALLOCATED_CATEGORIES]
    + ["estimate_gpu", "estimate_tokens_per_s", "estimate_step_s"]
    + ["measured_peak_allocated_bytes", "measured_peak_reserved_bytes", "measured_device_used_bytes",
       "tokens_per_s", "useful_tokens_per_s", "oom", "error_percent"]
    # generation profiles (empty for the other modes)
    + ["prompt_len", "new_tokens", "cache", "estimate_kv_cache_bytes", "estimate_kv_cache_total_bytes",
       "measured_kv_cache_bytes", "time_to_first_token_s", "prefill_tokens_per_s",
       "decode_tokens_per_s"]
)


def compare_row(profile: Profile, estimate: Any, measured: Any | None = None) -> dict[str, Any]:
    """One comparison row from an EstimateResult and an optional MeasureResult."""
    row: dict[str, Any] = {
        "name": profile.name, "model": profile.model, "mode": profile.mode, "batch": profile.batch,
        "seq": profile.seq, "precision": profile.precision,
        "estimate_method": getattr(estimate, "method", "") or None,  # "traced" | "analytic"
        "estimate_peak_allocated_bytes": estimate.peak_allocated_bytes,
        "estimate_peak_reserved_bytes": estimate.peak_reserved_bytes,
        "estimate_device_used_bytes": estimate.device_used_bytes,
        "estimate_breakdown": dict(estimate.breakdown),
        # speed on the GPU the estimate is for (engine.estimate.speed); 0 for a CPU target
        "estimate_gpu": getattr(estimate, "gpu", "") or None,
        "estimate_tokens_per_s": getattr(estimate, "tokens_per_s", 0.0) or None,
        "estimate_step_s": getattr(estimate, "step_s", 0.0) or None,
    }
    for c in ALLOCATED_CATEGORIES:
        row[f"estimate_{c.value}_bytes"] = estimate.breakdown.get(c.value, 0)
    generating = profile.mode == "generate"
    row.update({"prompt_len": profile.prompt_len if generating else None,
                "new_tokens": profile.new_tokens if generating else None,
                "cache": profile.cache if generating else None,
                # the bars' category (bytes at the peak) and the cache's size at the end
                "estimate_kv_cache_bytes": estimate.breakdown.get("kv_cache", 0) if generating else None,
                "estimate_kv_cache_total_bytes": estimate.kv_cache_bytes if generating else None,
                "measured_kv_cache_bytes": None, "time_to_first_token_s": None,
                "prefill_tokens_per_s": None, "decode_tokens_per_s": None})
    row.update({"measured_peak_allocated_bytes": None, "measured_peak_reserved_bytes": None,
                "measured_device_used_bytes": None, "measured_breakdown": None,
                "tokens_per_s": None, "useful_tokens_per_s": None, "oom": None, "error_percent": None})
    if measured is not None:
        row.update({
            "measured_peak_allocated_bytes": measured.peak_allocated_bytes,
            "measured_peak_reserved_bytes": measured.peak_reserved_bytes,
            "measured_device_used_bytes": measured.device_used_bytes,
            "measured_breakdown": dict(measured.breakdown),
            "tokens_per_s": measured.tokens_per_s,
            "useful_tokens_per_s": measured.useful_tokens_per_s,
            "oom": measured.oom,
        })
        if generating:
            row.update({"measured_kv_cache_bytes": measured.kv_cache_bytes,
                        "time_to_first_token_s": measured.time_to_first_token_s,
                        "prefill_tokens_per_s": measured.prefill_tokens_per_s,
                        "decode_tokens_per_s": measured.decode_tokens_per_s})
        if measured.peak_allocated_bytes and not measured.oom:
            row["error_percent"] = 100.0 * (estimate.peak_allocated_bytes - measured.peak_allocated_bytes) \
                / measured.peak_allocated_bytes
    return row


def compare_profiles(profiles: Sequence[Profile], measure: bool = False,
                     progress: Callable[[float, str], None] | None = None,
                     should_stop: Callable[[], bool] | None = None) -> list[dict[str, Any]]:
    """Estimate (and with ``measure`` run, each in a clean child process) every profile."""
    from engine.estimate import estimate

    rows = []
    for i, profile in enumerate(profiles):
        if progress:
            progress(i / len(profiles), f"{profile.name}: estimating")
        est = estimate(profile)
        measured = None
        if measure:
            from engine.measure.process import measure_in_child

            if progress:
                progress((i + 0.5) / len(profiles), f"{profile.name}: measuring")
            measured = measure_in_child(profile, should_stop=should_stop)
        rows.append(compare_row(profile, est, measured))
    if progress:
        progress(1.0, "done")
    return rows


def rows_to_csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})
    return buf.getvalue()


def write_csv(rows: Sequence[dict[str, Any]], path: str) -> None:
    atomic_write_text(path, rows_to_csv(rows))
