"""A profile as its JSON file, and as a README-style Markdown summary of the chosen settings and why.

The summary lists what differs from Headroom's defaults, the estimated and (if known) measured
peaks, and for each selected technique its explanation (the same paragraphs the app shows).
"""

from __future__ import annotations

import datetime
from typing import Any

import engine
from engine.profile import Profile, dumps

_FIELD_LABELS = {
    "model": "model", "mode": "mode", "task": "task head", "batch": "batch", "seq": "sequence length",
    "precision": "precision", "checkpointing": "gradient checkpointing",
    "checkpoint_every": "checkpoint every k-th layer", "attn": "attention", "optimizer": "optimizer",
    "target": "target device", "dataset": "dataset", "text_column": "text column",
    "padding": "padding", "pad_multiple": "pad to a multiple of", "max_tokens": "token budget",
    "micro_batches": "micro-batches", "chunk_input": "input windows (tokens)", "prune": "pruning",
    "mlp": "feed-forward", "ffn_chunks": "feed-forward chunks", "distill_from": "distillation teacher",
    "teacher_precision": "teacher precision", "alloc": "allocator", "alloc_max_split": "allocator max split size", "steps": "steps", "seed": "seed", "memory_cap_bytes": "simulated capacity",
    "trust_remote_code": "trust remote code",
}


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
    try:
        from engine.techniques.explanations import explanations

        texts = explanations()
    except ImportError:  # pragma: no cover - older builds
        texts = {}
    keys = []
    keys.append({"fixed": "fixed_padding", "dynamic": "dynamic_padding", "bucketed": "bucketing",
                 "token-budget": "token_budget"}[profile.padding])
    if profile.precision != "fp32":
        keys.append("amp")
    if profile.checkpointing and profile.is_training:
        keys.append("checkpointing")
    if profile.micro_batches > 1:
        keys.append("micro_batching")
    if profile.chunk_input:
        keys.append("chunked_input")
    if profile.prune:
        keys.append("pruning")
    if profile.local_window:
        keys.append("local_attention")
    if profile.mlp != "default":
        keys.append("geglu")
    if profile.ffn_chunks > 1:
        keys.append("ffn_chunking")
    if profile.distill_from:
        keys.append("distillation")
    if profile.alloc != "default" or profile.alloc_max_split:
        keys.append("memory_pool")
    titles = {"fixed_padding": "Fixed padding", "dynamic_padding": "Dynamic padding",
              "bucketing": "Length bucketing", "token_budget": "Token-budget batching",
              "amp": f"Precision: {profile.precision}", "checkpointing": "Gradient checkpointing",
              "micro_batching": "Micro-batches with gradient accumulation",
              "chunked_input": "Chunked input", "pruning": f"Pruning ({profile.prune})",
              "local_attention": f"Local attention (window {profile.local_window})",
              "geglu": "GeGLU feed-forward", "ffn_chunking": "Feed-forward chunking",
              "distillation": "Knowledge distillation", "memory_pool": f"Allocator ({profile.alloc})"}
    return [(titles[k], texts[k]) for k in keys if k in texts]


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
        lines += ["## Memory and speed", "", "| | estimated | measured |", "|---|---|---|"]
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
        lines.append(f"| {_FIELD_LABELS.get(field, field)} | {_md(value)} |")
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
