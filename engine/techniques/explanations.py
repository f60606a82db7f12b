"""The UI's one-paragraph explanation of every technique, and the cross-technique checks.

``explanations()`` imports no torch (each technique module keeps torch imports inside functions),
so the app can show the texts at start-up. ``check_compatible(profile)`` raises BadInput for
combinations that cannot work and returns notes for combinations that work but save little; the
estimate/measure/export entry points call it once per profile (cheap: reads configs only).

How the model-side techniques compose (TECHNIQUES order: geglu, pruning, ffn_chunking,
local_attention, checkpointing):

* GeGLU then pruning: ``ffn:F`` prunes the GeGLU hidden width (gate/up rows, down columns);
  ``heads:F`` is independent of the MLP; ``unstructured:F`` zeros the GeGLU weights too.
* Pruning then local attention: the window applies to the remaining heads (any head count).
* Feed-forward chunking wraps whatever MLP results (original, GeGLU, pruned).
* Checkpointing last: it wraps the final blocks.
* Distillation's teacher is built without any technique (dense, full attention).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from engine.errors import BadInput

if TYPE_CHECKING:
    from engine.profile import Profile

_MODULE_TEXTS = ("checkpointing", "pruning", "local_attention", "geglu", "ffn_chunking",
                 "distillation", "memory_pool")

_LOOP_TEXTS = {
    "amp": (
        "Mixed precision (AMP) runs matrix multiplications in fp16 or bf16 under autocast while the "
        "weights and optimizer state stay fp32. Saved activations are mostly half size and tensor "
        "cores make steps much faster on modern GPUs; autocast also keeps a half-precision copy of "
        "weights during the step. fp16 needs a GradScaler against underflow; bf16 does not. Pure "
        "bf16/fp16 stores the weights themselves in half precision (half the weight, gradient and "
        "optimizer memory) at some risk to training stability."
    ),
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
    "micro_batching": (
        "Micro-batching with gradient accumulation splits each batch into N micro-batches, runs "
        "forward and backward on each and steps the optimizer once. Activation memory is that of "
        "one micro-batch; weights, gradients and optimizer state are unchanged. The result equals "
        "the large batch (up to numerics, and except batch-dependent layers), at the cost of N "
        "smaller, less efficient passes."
    ),
    "chunked_input": (
        "Chunked input (inference) splits long inputs into windows of W tokens processed one by "
        "one, so the peak is that of a W-token forward whatever the input length, and inputs longer "
        "than the model's position limit can be processed. Tokens do not see context beyond their "
        "window, so outputs differ from a full-length forward."
    ),
}


def explanations() -> dict[str, str]:
    """Technique name -> one paragraph (what it does, when it helps, what it costs)."""
    out: dict[str, str] = {}
    for name in _MODULE_TEXTS:
        try:
            out[name] = importlib.import_module(f"engine.techniques.{name}").EXPLANATION
        except (ModuleNotFoundError, AttributeError):
            continue
    out.update(_LOOP_TEXTS)
    return out


def check_compatible(profile: "Profile") -> list[str]:
    """BadInput for combinations that cannot work; notes for ones that work but save little."""
    notes: list[str] = []
    window = profile.local_window
    if profile.ffn_chunks > 1 and profile.ffn_chunks > profile.seq:
        raise BadInput(f"ffn_chunks ({profile.ffn_chunks}) cannot exceed the sequence length "
                       f"({profile.seq}): each chunk needs at least one token")
    if window:
        try:
            from transformers import AttentionInterface  # noqa: F401
            from transformers.masking_utils import AttentionMaskInterface  # noqa: F401
        except ImportError:
            import transformers

            raise BadInput(f"local attention needs transformers >= 4.53 (AttentionInterface); "
                           f"this is {transformers.__version__}") from None
        per_forward = profile.chunk_input or profile.seq
        if window >= per_forward:
            notes.append(f"local window {window} covers the whole sequence ({per_forward} tokens): "
                         f"same result as dense attention, no saving")
    if profile.prune_kind == "unstructured" and profile.prune_fraction > 0:
        notes.append("unstructured pruning zeros weights but keeps them dense: no memory saved")
    if profile.prune_kind == "heads" and profile.prune_fraction > 0:
        from engine.models import load_config

        cfg = load_config(profile.model, profile.trust_remote_code)
        kv = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_attention_heads", 0)
        if kv and int(round(profile.prune_fraction * kv)) == 0:
            notes.append(f"heads:{profile.prune_fraction:g} removes no head: the model has "
                         f"{kv} key/value groups (whole groups are removed)")
    if profile.ffn_chunks > 1 and profile.is_training and not profile.checkpointing:
        notes.append("feed-forward chunking in training without checkpointing saves little: "
                     "autograd keeps every chunk's intermediates")
    if (profile.alloc.lower() != "default" or profile.alloc_max_split) and profile.target != "cuda":
        notes.append("allocator settings (memory pooling) apply to CUDA runs only")
    split = profile.alloc_max_split_bytes
    if split and profile.alloc_pool_bytes >= split:
        notes.append(f"the pool ({profile.alloc_pool_bytes / 2**20:g} MiB) is not below the max split "
                     f"size ({split // 2**20} MiB): the allocator never splits it, so only requests "
                     f"within 20 MiB of its size can use it")
    if split and profile.alloc.lower() == "expandable":
        notes.append("with expandable segments PyTorch splits blocks regardless of max_split_size_mb; "
                     "it only keeps oversize cached blocks from smaller requests")
    if profile.distill_from:
        from engine.models import load_config
        from engine.techniques.distillation import check_vocab

        student = load_config(profile.model, profile.trust_remote_code)
        teacher = load_config(profile.distill_from, profile.trust_remote_code)
        check_vocab(int(getattr(student, "vocab_size", 0)), int(getattr(teacher, "vocab_size", 0)))
        if profile.distill_from == profile.model:
            notes.append("the teacher is the student's own architecture (self-distillation)")
        if window or profile.prune or profile.mlp != "default":
            notes.append("the teacher is built without the student's techniques (dense, unpruned)")
    return notes
