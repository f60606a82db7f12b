"""Generation (serving): B concurrent sequences, a P-token prompt, N new tokens, greedy, with the
model's own KV cache classes (transformers' ``DynamicCache`` or ``StaticCache``, built from the
config so sliding-window and hybrid layers get their sliding layer caches).

The fields mean something in ``--mode generate`` only (``Field.modes``): the panel shows them
there, and a profile of another mode that sets them is refused. In generate mode the techniques
of training (checkpointing, micro-batches, distillation) and of single-forward inference (input
windows) are refused too, and so are the padding strategies (the B prompts are one batch).
The measured run is ``engine.measure.generate``; the estimates ``engine.estimate.generate``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.errors import BadInput
from engine.techniques.base import Control, Field, PlanAxis, Technique

if TYPE_CHECKING:
    from engine.prepare import Prepared
    from engine.profile import Profile

CACHES = ("dynamic", "static")

EXPLANATION = (
    "Generation runs the prompt through the model once (prefill: the whole prompt's activations, "
    "but only the last position's logits) and then one token per step (decode), keeping every "
    "layer's keys and values in a KV cache: 2 x kv_heads x head_dim x cached tokens x bytes per "
    "layer and sequence. At long contexts or many concurrent sequences the cache, not the "
    "activations, sets the peak. Sliding-window layers (Gemma, Mistral) keep only their window. "
    "A dynamic cache grows by concatenation (each step reallocates every layer's tensors, so the "
    "caching allocator reserves more than it holds); a static cache is allocated once at its full "
    "length (prompt + new tokens) in the prefill."
)

_CACHE_LABELS = {"dynamic": "dynamic (grows each step)", "static": "static (preallocated)"}

_GENERATE = ("generate",)


def validate(p: "Profile") -> None:
    """Generation fields outside generate mode; in generate mode, techniques that mean nothing."""
    from engine.techniques.base import all_fields

    if p.mode != "generate":
        for f in FIELDS:
            if getattr(p, f.name) != f.default:
                raise BadInput(f"{f.name} applies to --mode generate only (mode is {p.mode})")
        return
    for f in all_fields():
        if f.modes is not None and "generate" not in f.modes and getattr(p, f.name) != f.default:
            raise BadInput(f"{f.name} means nothing in generation (it applies to "
                           f"--mode {' or '.join(f.modes)})")
    if p.checkpointing:
        raise BadInput("checkpointing means nothing in generation (no backward pass)")
    if getattr(p, "gpus", 1) > 1:
        raise BadInput("generation runs on one GPU here (gpus must be 1 in --mode generate)")
    if p.padding != "fixed":
        raise BadInput(f"padding {p.padding!r} means nothing in generation: the B prompts are one "
                       f"batch (left-padded to the longest when they come from the dataset)")


def prompt_tokens(p: "Profile") -> int:
    """The longest prompt the run can see: prompt_len, or the dataset's texts cut at seq."""
    return p.prompt_len or p.seq


def check(prepared: "Prepared") -> list[str]:
    p = prepared.profile
    if prepared.family == "encoder":
        raise BadInput(f"generation needs a decoder; {p.model} is an encoder-only model")
    if prepared.task != "causal-lm":
        raise BadInput(f"generation needs the causal-lm head; the profile asks for {prepared.task}")
    from engine import models

    limit = models.max_positions(prepared.config) or 0
    total = prompt_tokens(p) + p.new_tokens
    if limit and total > limit:
        where = f"prompt {p.prompt_len}" if p.prompt_len else f"prompt of up to {p.seq} (seq)"
        raise BadInput(f"{where} + {p.new_tokens} new tokens = {total} exceeds {p.model}'s limit "
                       f"of {limit} positions")
    return []


FIELDS = (
    Field("prompt_len", int, 0, "generate: prompt tokens per sequence (0 = the dataset's texts, cut "
          "at seq)", minimum=0, metavar="P", after="seq", modes=_GENERATE,
          label="prompt length (0 = from the dataset)"),
    Field("new_tokens", int, 128, "generate: tokens generated per sequence (greedy)", minimum=1,
          maximum=1 << 24, metavar="N", modes=_GENERATE, label="new tokens"),
    Field("cache", str, "dynamic", "generate: KV cache, dynamic (grows) | static (preallocated)",
          choices=CACHES, modes=_GENERATE, label="KV cache"),
)

_is_generate = lambda p: p.mode == "generate"  # noqa: E731

TECHNIQUE = Technique(
    name="generation",
    title="Generation (KV cache)",
    order=5,
    fields=FIELDS,
    controls=(
        Control("prompt_len", "spin", "Prompt length", field="prompt_len", low=0, high=1 << 20,
                step=128, special="from dataset", suffix=" tokens", enabled_when=_is_generate),
        Control("new_tokens", "spin", "New tokens", field="new_tokens", low=1, high=1 << 20,
                step=64, suffix=" tokens", enabled_when=_is_generate),
        Control("cache", "combo", "KV cache", field="cache", choices=_CACHE_LABELS,
                enabled_when=_is_generate),
    ),
    explanations={"generation": EXPLANATION},
    summary_title=lambda p: f"Generation: {p.batch} x ({p.prompt_len or 'dataset'} + "
                            f"{p.new_tokens}) tokens, {p.cache} cache",
    active=_is_generate,
    validate=validate,
    check=check,
    # the planner's --vary context: prompt + new tokens, the new tokens fixed (it searches the prompt)
    plan_axes=(PlanAxis("context", ("generate",), "prompt_len", "new_tokens"),),
)
