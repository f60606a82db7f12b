"""Guarded access to engine parts that may not be there yet (they are written concurrently).

Each accessor returns the engine function or None; the UI shows "not available yet" for None
instead of failing. Imports happen on first use so the window opens fast.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def _attr(module: str, name: str) -> Any | None:
    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - missing or half-written engine part: treat as absent
        return None
    return getattr(mod, name, None)


def estimate_fn() -> Callable[..., Any] | None:
    """``engine.estimate.estimate(profile, method=...) -> EstimateResult``."""
    return _attr("engine.estimate", "estimate")


def measure_fn() -> Callable[..., Any] | None:
    """``engine.measure_process.measure_in_child(profile, progress, should_stop) -> MeasureResult``."""
    return _attr("engine.measure_process", "measure_in_child")


def export_fn() -> Callable[..., Any] | None:
    """``engine.export.export_script(profile) -> str``."""
    return _attr("engine.export", "export_script")


def summary_fn() -> Callable[..., Any] | None:
    """``engine.export.export_summary_markdown(profile, estimate, measured) -> str``."""
    return _attr("engine.export", "export_summary_markdown")


def pareto_fn() -> Callable[..., Any] | None:
    return _attr("engine.plan", "pareto_front")


#: UI technique group -> keys under which the engine may explain it (explanations() keys or
#: engine.techniques.<module> names), first match wins.
EXPLANATION_KEYS: dict[str, tuple[str, ...]] = {
    "padding": ("padding", "batching"),
    "amp": ("amp", "precision", "mixed_precision"),
    "checkpointing": ("checkpointing", "gradient_checkpointing"),
    "pruning": ("pruning", "prune"),
    "chunking": ("chunking",),
    "attention": ("local_attention", "attention", "sparse_attention", "attn"),
    "geglu": ("geglu", "mlp"),
    "distillation": ("distillation", "distill", "knowledge_distillation"),
    "allocator": ("memory_pool", "allocator", "memory_pooling", "alloc", "pooling"),
}

#: What the UI says when the engine has no explanation yet (kept short: the engine's text wins).
FALLBACK_EXPLANATIONS: dict[str, str] = {
    "padding": "How sequences are batched and padded: fixed length, each batch to its longest, "
               "length buckets, or a token budget per batch. Less padding means fewer wasted tokens.",
    "amp": "Mixed precision (autocast fp16/bf16) halves activation memory and speeds up matmuls; "
           "pure bf16/fp16 also halves weights, gradients and optimizer states.",
    "checkpointing": "Recompute activations in backward instead of keeping them: much less "
                     "activation memory for roughly one extra forward pass.",
    "pruning": "Unstructured pruning zeroes weights but saves no dense memory; structured pruning "
               "removes heads or FFN neurons and really shrinks the model.",
    "chunking": "Split work into pieces: micro-batches with gradient accumulation (training), "
                "feed-forward chunks, or windows over long inputs (inference).",
    "attention": "Sliding-window (local) attention of width W versus dense SDPA or eager attention.",
    "geglu": "Replace the MLP activation with a gated GeGLU block of matched parameter count.",
    "distillation": "Train a student on a frozen teacher's logits; the teacher's weights and "
                    "forward activations add memory.",
    "allocator": "The CUDA caching allocator: expandable segments reduce fragmentation; a "
                 "pre-reserved pool trades reserved memory for fewer allocations.",
}


#: Groups whose text is the engine's texts of their parts, one paragraph each.
COMBINED_KEYS: dict[str, tuple[str, ...]] = {
    "chunking": ("micro_batching", "chunked_input", "ffn_chunking"),
}
#: Padding strategy (Profile.padding) -> the engine's explanation key.
PADDING_KEYS = {"fixed": "fixed_padding", "dynamic": "dynamic_padding", "bucketed": "bucketing",
                "token-budget": "token_budget"}


def explanations() -> dict[str, str]:
    """Technique group -> explanation text, from the engine where it has one.

    The engine's own keys (e.g. ``dynamic_padding``) are in the result too.
    """
    found: dict[str, str] = {}
    table = _attr("engine.techniques.explanations", "explanations")
    engine_texts: dict[str, str] = {}
    if callable(table):
        try:
            engine_texts = {str(k): str(v) for k, v in dict(table()).items()}
        except Exception:  # noqa: BLE001 - a half-written module must not break the UI
            engine_texts = {}
    found.update(engine_texts)
    for group, parts in COMBINED_KEYS.items():
        texts = [engine_texts[k] for k in parts if k in engine_texts]
        if texts:
            found[group] = "\n\n".join(texts)
    for group, keys in EXPLANATION_KEYS.items():
        if group in found:
            continue
        for key in keys:
            if key in engine_texts:
                found[group] = engine_texts[key]
                break
            text = _attr(f"engine.techniques.{key}", "EXPLANATION")
            if isinstance(text, str) and text:
                found[group] = text
                break
        found.setdefault(group, FALLBACK_EXPLANATIONS[group])
    return found
