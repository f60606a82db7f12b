"""A profile as its JSON file, and as a README-style Markdown summary of the chosen settings and why.

The summary lists what differs from Headroom's defaults, the estimated and (if known) measured
peaks, and for each selected technique its explanation (the same paragraphs the app shows).
"""

from __future__ import annotations

import datetime
from typing import Any

import engine
from engine import techniques
from engine.profile import FIELDS_BY_NAME, Profile, dumps

def export_profile_json(profile: Profile) -> str:
    """The profile file (the same text ``headroom ... --save`` writes)."""
    return dumps(profile)


def _get(result: Any, key: str) -> Any:
    if result is None:
        return None
    return result.get(key) if isinstance(result, dict) else getattr(result, key, None)


def _md(text: Any) -> str:
    """A value for a Markdown table cell: code-formatted, pipes and newlines neutralised."""
    s = str(text).replace("\r", " ").replace("\n", " ").replace("|", "\\|").replace("`", "'")
    return f"`{s}`"


def _selected_explanations(profile: Profile) -> list[tuple[str, str]]:
    """(heading, paragraph) of every technique the profile uses, in registry order."""
    out = []
    for technique in techniques.registry():
        if technique.explain_always or technique.active(profile):
            text = technique.explanations.get(technique.explanation_key(profile))
            if text:
                out.append((technique.heading(profile), text))
    return out


def export_summary_markdown(profile: Profile, estimate: Any = None, measured: Any = None) -> str:
    """README-style summary: the settings that differ from the defaults, the numbers, and why."""
    from engine.units import format_bytes

    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    title = profile.name.replace("\n", " ").strip() or "profile"
    lines = [f"# {title}", "",
             f"{'Training' if profile.is_training else 'Inference'} of {_md(profile.model)} with batch "
             f"{profile.batch} and sequences of up to {profile.seq} tokens, planned with Headroom "
             f"{engine.__version__} on {today} (UTC).", ""]
    est_peak, meas_peak = _get(estimate, "peak_allocated_bytes"), _get(measured, "peak_allocated_bytes")
    if est_peak is not None or meas_peak is not None:
        method = _get(estimate, "method")
        est_head = f"estimated ({method})" if method in ("traced", "analytic") else "estimated"
        lines += ["## Memory and speed", "", f"| | {est_head} | measured |", "|---|---|---|"]
        rows = (("peak_allocated_bytes", "peak allocated"), ("peak_reserved_bytes", "peak reserved"),
                ("device_used_bytes", "device used"))
        for key, label in rows:
            e, m = _get(estimate, key), _get(measured, key)
            if e is None and m is None:
                continue
            lines.append(f"| {label} | {format_bytes(e) if e is not None else '-'} | "
                         f"{format_bytes(m) if m is not None else '-'} |")
        tps = _get(measured, "tokens_per_s")
        if tps:
            lines.append(f"| tokens/s | - | {tps:,.0f} |")
        lines.append("")
    lines += ["## Settings", "", "Only what differs from Headroom's defaults:", "",
              "| setting | value |", "|---|---|"]
    nd = profile.non_defaults()
    nd.pop("name", None)
    for field, value in nd.items():
        lines.append(f"| {FIELDS_BY_NAME[field].label or field} | {_md(value)} |")
    if not nd:
        lines.append("| (all defaults) | |")
    lines.append("")
    chosen = _selected_explanations(profile)
    if chosen:
        lines += ["## Why these techniques", ""]
        for heading, text in chosen:
            lines += [f"### {heading}", "", text, ""]
    lines += ["## Reproduce", "", "```", "headroom export profile.json -o train.py",
              "python train.py --steps 3", "```", ""]
    return "\n".join(lines)
