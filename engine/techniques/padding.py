"""Padding and batching strategy: fixed, dynamic, length-bucketed or token-budget batches.

The samplers and collators themselves are ``engine.batching`` (shared by measure, the estimators'
batch shapes and the exported script); this module holds the strategy's fields, controls, rules and
explanations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.techniques.base import Control, Field, Technique

if TYPE_CHECKING:
    from engine.profile import Profile

PADDINGS = ("fixed", "dynamic", "bucketed", "token-budget")

EXPLANATIONS = {
    "fixed_padding": (
        "Fixed padding pads or truncates every sequence to the maximum length, with an attention "
        "mask over the padding. Every batch has the same shape (predictable memory, no allocator "
        "churn), but short texts waste compute and activation memory on pad tokens."
    ),
    "dynamic_padding": (
        "Dynamic padding pads each batch only to its own longest sequence. Batches of short texts "
        "are cheaper; the peak is set by the batch holding the longest text, and changing shapes "
        "can fragment the allocator's cache."
    ),
    "bucketing": (
        "Length bucketing sorts texts by length into buckets and draws whole batches from one "
        "bucket, so sequences in a batch have similar lengths and little padding. Optionally lengths "
        "are rounded up to a multiple (e.g. 8) for tensor-core friendly shapes. Batches are less "
        "random (shuffled across buckets)."
    ),
    "token_budget": (
        "Token-budget batching fills each batch up to N tokens (padding included) instead of a fixed "
        "number of sequences: many short or few long texts. Memory per step stays near-constant "
        "because activations scale with tokens, which lets short-text batches be larger; the number "
        "of sequences per optimizer step varies."
    ),
}

#: Profile.padding -> the explanation the panel's note shows.
NOTE_KEYS = {"fixed": "fixed_padding", "dynamic": "dynamic_padding", "bucketed": "bucketing",
             "token-budget": "token_budget"}

SUMMARY_TITLES = {"fixed": "Fixed padding", "dynamic": "Dynamic padding", "bucketed": "Length bucketing",
                  "token-budget": "Token-budget batching"}

_LABELS = {"fixed": "Fixed: pad every text to seq", "dynamic": "Dynamic: pad to the batch's longest",
           "bucketed": "Length bucketing", "token-budget": "Token budget per batch"}

def resize(p: "Profile", changes: dict) -> dict:
    """A token budget below a longer seq would fit no full-length sequence: raise it to seq."""
    seq = changes.get("seq")
    if seq is not None and p.padding == "token-budget" and p.max_tokens and p.max_tokens < seq:
        return {"max_tokens": seq}
    return {}


TECHNIQUE = Technique(
    name="padding",
    title="Padding and batching",
    order=10,
    fields=(
        Field("padding", str, "fixed", "fixed | dynamic | bucketed | token-budget", choices=PADDINGS,
              after="text_column"),
        Field("pad_multiple", int, 1, "pad lengths up to a multiple of this (1 = off)", minimum=1,
              metavar="N", label="pad to a multiple of"),
        Field("max_tokens", int, 0, "token-budget batching: tokens per batch, padding included "
              "(0 = batch*seq)", minimum=0, metavar="N", label="token budget"),
    ),
    controls=(
        Control("padding", "combo", "Strategy", field="padding", choices=_LABELS),
        Control("pad_multiple", "spin", "Pad to multiple of", field="pad_multiple", low=1, high=1024,
                step=8, special="off", enabled_when=lambda p: p.padding != "fixed"),
        Control("max_tokens", "spin", "Tokens per batch", field="max_tokens", low=0, high=1 << 24,
                step=512, special="batch × seq", enabled_when=lambda p: p.padding == "token-budget"),
    ),
    explanations=EXPLANATIONS,
    note_key=lambda p: NOTE_KEYS[p.padding],
    summary_title=lambda p: SUMMARY_TITLES[p.padding],
    explain_always=True,
    active=lambda p: p.padding != "fixed",
    resize=resize,
)
