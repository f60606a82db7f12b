"""Feed-forward chunking: apply each block's feed-forward to N slices of the sequence in turn.

The feed-forward acts on every token independently, so running it on T/N tokens at a time gives
the same output while only one chunk's (B, T/N, 4d) intermediate is alive at once (inference).
The module's own ``forward`` (``feed_forward_chunk`` for BERT) is wrapped on the instance, so
parameter names and state dicts are unchanged. Same idea as transformers'
``apply_chunking_to_forward`` / ``chunk_size_feed_forward``, but with a chunk *count*.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.errors import BadInput
from engine.models import transformer_blocks
from engine.techniques.base import Control, Field, Technique

if TYPE_CHECKING:
    import torch

    from engine.profile import Profile

EXPLANATION = (
    "Feed-forward chunking runs each block's feed-forward network on N slices of the sequence one "
    "after another instead of all tokens at once. The output is identical (the feed-forward treats "
    "tokens independently). At inference only one slice's wide intermediate (batch x length/N x "
    "4·width) exists at a time, which lowers the peak for long sequences. In training without "
    "gradient checkpointing autograd still keeps every slice's intermediates for backward, so the "
    "saving is small (only temporaries); with checkpointing the recomputed block is chunked too. "
    "The cost is N smaller matrix multiplications instead of one: slightly slower, more so for "
    "small batches on a GPU."
)


def applies(profile: "Profile") -> bool:
    return profile.ffn_chunks > 1


def chunked_call(fn, chunks, hidden, *rest):
    """fn over ``chunks`` slices of ``hidden`` along the sequence (dim 1), concatenated."""
    import torch

    if hidden.dim() < 3 or hidden.shape[1] < 2 or chunks <= 1:
        return fn(hidden, *rest)
    # contiguous: GPT-2's Conv1D views its input; a dim-1 slice of (B, T, d) is strided
    parts = [fn(piece.contiguous(), *rest) for piece in torch.chunk(hidden, chunks, dim=1)]
    return torch.cat(parts, dim=1)  # (B, T, d)


def chunked_method(self, hidden):  # one parameter: BERT's apply_chunking_to_forward counts them
    original = getattr(type(self), self._headroom_chunk_attr).__get__(self)  # the class's own
    return chunked_call(original, self._headroom_ffn_chunks, hidden)


def chunk_feed_forward(model, chunks):
    """Feed-forward chunking: every block's feed-forward runs on ``chunks`` slices of the sequence
    in turn. The output is the same (the feed-forward treats tokens independently); only one
    slice's wide intermediate exists at a time. The module's own method is shadowed by a bound
    method on the instance (parameter names unchanged; a deepcopy rebinds it to the copy).
    Torch only: the exported script embeds it."""
    for block in transformer_blocks(model):
        if getattr(block, "mlp", None) is not None:  # GPT-2, Llama, Qwen2, Mistral
            owner, attr = block.mlp, "forward"
        elif hasattr(block, "feed_forward_chunk"):  # BERT: intermediate + output (residual, LN)
            owner, attr = block, "feed_forward_chunk"
        elif getattr(block, "ffn", None) is not None:  # DistilBERT
            owner, attr = block.ffn, "forward"
        else:
            raise ValueError(f"feed-forward chunking: the feed-forward of {type(block).__name__} "
                             f"is not recognised")
        owner._headroom_ffn_chunks = chunks
        owner._headroom_chunk_attr = attr
        setattr(owner, attr, chunked_method.__get__(owner))  # bound to this instance


def apply(model: "torch.nn.Module", profile: "Profile") -> str | None:
    from engine.models import find_layers

    chunks = profile.ffn_chunks
    find_layers(model)  # BadInput when the model has no block list
    try:
        chunk_feed_forward(model, chunks)
    except ValueError as exc:  # a block whose feed-forward is not recognised
        raise BadInput(str(exc)) from None
    if profile.is_training and not profile.checkpointing:
        return (f"feed-forward in {chunks} sequence chunks: same output; in training without "
                f"checkpointing autograd still saves every chunk's intermediates, so it saves little")
    return f"feed-forward in {chunks} sequence chunks: same output, smaller inference peak"


def check(prepared) -> list[str]:
    p = prepared.profile
    if p.ffn_chunks > 1 and p.ffn_chunks > p.seq:
        raise BadInput(f"ffn_chunks ({p.ffn_chunks}) cannot exceed the sequence length "
                       f"({p.seq}): each chunk needs at least one token")
    if p.ffn_chunks > 1 and p.is_training and not p.checkpointing:
        return ["feed-forward chunking in training without checkpointing saves little: "
                "autograd keeps every chunk's intermediates"]
    return []


TECHNIQUE = Technique(
    name="ffn_chunking",
    title="Chunking",
    group="chunking",
    order=52,
    fields=(Field("ffn_chunks", int, 1, "feed-forward applied to N sequence chunks (1 = off)",
                  minimum=1, metavar="N", after="mlp", label="feed-forward chunks"),),
    controls=(Control("ffn_chunks", "spin", "Feed-forward chunks", field="ffn_chunks", low=1,
                      high=1024),),
    explanations={"ffn_chunking": EXPLANATION},
    summary_title=lambda p: "Feed-forward chunking",
    active=applies,
    check=check,
    apply_model=apply,
    apply_rank=30,
    export_source=lambda: [chunked_call, chunked_method, chunk_feed_forward],
    export_calls=lambda p: ["chunk_feed_forward(model, FFN_CHUNKS)"],
    export_constants=lambda p: [("FFN_CHUNKS", p.ffn_chunks, "feed-forward run on this many slices of the "
                                 "sequence")],
)
