"""The analytic estimator's reserved memory: its tensor sizes as an allocation stream, replayed.

Why: reserved memory is what the caching allocator keeps after it has served the step's
allocations in their order; which freed block a later tensor reuses decides how many segments a
run needs. The closed form (``allocator.reserved_from_sizes``: every tensor alive at once, each in
a perfectly reused block) cannot see order. It over-counts when gradients and activations never
coexist (fp32 SGD: +16-18% on the H200 matrix) and under-counts when a step leaves freed blocks
too small for what comes next (checkpointing's recompute, Gemma-3's 262k-vocabulary logits:
-8 to -22%). The traced estimator replays the real operator stream and is within about 1%; this
module replays a coarse one built from the analytic sizes alone, in the order the measured
protocol makes them, through the same allocator model (``allocator.simulate``), in a few
milliseconds.

The stream (training, two steps of the Trainer-style loop; step 2 runs in step 1's segments):
the weights; per step the inputs; the forward, block by block: autocast's weight copies (kept
for backward by the matmuls that use them), the block's saved tensors (a checkpointed block: its
input only), its forward temporaries made and freed; the head's saved tensors and the loss's
forward tensors; the backward: the loss's backward tensors, the head's gradients, then block by
block in reverse: a checkpointed block's recomputed tensors, the backward temporaries, the
block's gradients, its saved tensors and copies freed; the embedding's gradients; the
optimizer's states (step 1) and foreach temporaries; ``zero_grad(set_to_none=True)`` frees the
gradients. cuBLAS workspaces come at the first GEMM of the forward and of the backward, as on
the device (``traced._Tracker``). Inference: per step the inputs, block by block the hidden
state and the temporaries, then the logits.

What it does not know: the order and sizes of the temporaries inside a block (one block of their
total each), the build's first copies, the allocator's small pool beyond rounding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

Events = list[tuple[object, int]]
#: Inference: how many of a block's intermediates are alive at once (see inference_events).
INFER_WINDOW = 2


@dataclass
class StreamSizes:
    """What the analytic estimator knows, in bytes (each entry one tensor, already rounded)."""

    weights: list[int]
    build_dropped: list[int]  # made and dropped while the model is built (a tied head's weight)
    inputs: list[int]
    workspace: int  # one cuBLAS workspace
    workspaces: int  # how many (forward, backward)
    layers: int
    saved: list[int]  # one block's saved tensors
    layer_in: int  # a checkpointed block's saved input
    checkpointed: Sequence[bool]  # per block
    fwd_transient: list[int]  # a block's forward temporaries (made and freed together; their
    #                           total as one block scored better on the H200 rows than three)
    bwd_transient: list[int]
    embed_saved: list[int]  # the embeddings' saved tensors
    head_saved: list[int]  # the head's saved tensors (after the blocks)
    loss_fwd: list[int]
    loss_bwd: list[int]
    layer_grads: list[list[int]] = field(default_factory=list)  # per block
    head_grads: list[int] = field(default_factory=list)  # after the blocks (final norm, LM head)
    embed_grads: list[int] = field(default_factory=list)  # before the blocks
    states: list[int] = field(default_factory=list)
    opt_temp: list[int] = field(default_factory=list)
    layer_copies: list[int] = field(default_factory=list)  # autocast copies per block
    head_copies: list[int] = field(default_factory=list)


def coalesce(sizes: Sequence[int]) -> list[int]:
    """Neighbouring tensors of one allocator size class as one block: small-pool ones (<= 1 MiB)
    up to 1 MiB, those below 10 MiB (which share 20 MiB segments) up to 10 MiB. The allocator
    packs them the same way; the replay gets 2-3x fewer events (the planner runs ~80 analytic
    estimates within its second)."""
    out: list[int] = []
    cls_of = lambda n: 0 if n <= _SMALL else (1 if n < _MID else 2)  # noqa: E731
    for n in sizes:
        if n <= 0:
            continue
        c = cls_of(n)
        if out and c < 2 and cls_of(out[-1]) == c and out[-1] + n <= (_SMALL if c == 0 else _MID - 1):
            out[-1] += n
        else:
            out.append(n)
    return out


_SMALL = 1 << 20
_MID = 10 << 20


class _Stream:
    def __init__(self) -> None:
        self.events: Events = []
        self._n = 0
        self._live: set[int] = set()

    def alloc(self, size: int) -> int:
        self._n += 1
        if size > 0:
            self.events.append((self._n, size))
            self._live.add(self._n)
        return self._n

    def allocs(self, sizes: Sequence[int]) -> list[int]:
        return [self.alloc(x) for x in sizes]

    def free(self, handles: Sequence[int]) -> None:
        for u in handles:
            if u in self._live:
                self._live.discard(u)
                self.events.append((u, -1))

    def temporaries(self, sizes: Sequence[int]) -> None:
        self.free(self.allocs(sizes))


def key_of(z: StreamSizes) -> tuple:
    """A hashable key of everything the stream is made from."""
    return tuple(tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, (list, tuple))
                 else v for v in dataclasses.astuple(z))


def training_events(z: StreamSizes, steps: int = 2) -> Events:
    s = _Stream()
    s.allocs(z.weights)
    s.free(s.allocs(z.build_dropped))
    backward_ws = [z.workspace] * max(0, z.workspaces - 1)
    if any(z.checkpointed):
        s.allocs(backward_ws)
    grads_live: list[int] = []
    for step in range(steps):
        inputs = s.allocs(z.inputs)
        embed_saved = s.allocs(z.embed_saved)
        per_layer = []
        for i in range(z.layers):
            copies = s.allocs(z.layer_copies)
            if step == 0 and i == 0:
                s.allocs([z.workspace] * min(1, z.workspaces))
            if z.checkpointed[i]:
                saved = s.allocs([z.layer_in])
            else:
                saved = s.allocs(z.saved)
            s.temporaries(z.fwd_transient)
            per_layer.append((saved, copies))
        head_copies = s.allocs(z.head_copies)
        head_saved = s.allocs(z.head_saved)
        # the loss: logits, their fp32 upcast, the log-softmax; only the last is kept for backward
        loss_fwd = s.allocs(z.loss_fwd)
        s.free(loss_fwd[:-1])
        # the loss's backward: the nll and log-softmax gradients beside the kept log-softmax,
        # then the logits' gradient, in which the head's GEMMs run
        loss_bwd = s.allocs(z.loss_bwd[1:])
        s.free(loss_bwd[:1] + loss_fwd[-1:])
        logits_grad = s.allocs(z.loss_fwd[:1])
        s.free(loss_bwd[1:])
        if step == 0:
            # cuBLAS's backward workspace, at the head's first GEMM, in the best free block.
            # Without checkpointing only the loss's freed blocks are free then (on Gemma-3's
            # 262k vocabulary a logits block, which step 2 then cannot have whole: the H200
            # shows a fourth logits-sized segment). Checkpointed blocks free their forward
            # temporaries, and the workspace lands in one of those (the trace of Gemma-3-like
            # bf16-amp 8x1024 with checkpointing), which this stream's one-block temporaries
            # do not leave: there it gets a segment of its own (made with the weights).
            if not any(z.checkpointed):
                s.allocs(backward_ws)
        grads_live += s.allocs(z.head_grads)
        s.free(logits_grad + head_saved + head_copies)
        for i in reversed(range(z.layers)):
            saved, copies = per_layer[i]
            recomputed = s.allocs(z.saved) if z.checkpointed[i] else []
            bwd = s.allocs(z.bwd_transient)
            grads_live += s.allocs(z.layer_grads[i] if i < len(z.layer_grads) else [])
            s.free(bwd + recomputed + saved + copies)
        grads_live += s.allocs(z.embed_grads)
        s.free(embed_saved)
        if step == 0:
            s.allocs(z.states)
        s.free(s.allocs(z.opt_temp))
        s.free(grads_live)  # zero_grad(set_to_none=True)
        grads_live = []
        s.free(inputs)
    return s.events


def inference_events(z: StreamSizes, hidden: int, steps: int = 2) -> Events:
    """Inference: a block's tensors (what training would save, here freed when the block ends)
    and temporaries around its output; at the end the final norm's fp32 pieces and the logits."""
    s = _Stream()
    s.allocs(z.weights)
    s.free(s.allocs(z.build_dropped))
    for step in range(steps):
        inputs = s.allocs(z.inputs)
        prev = s.allocs([hidden])
        copies: list[int] = []
        for i in range(z.layers):
            copies += s.allocs(z.layer_copies)
            if step == 0 and i == 0:
                s.allocs([z.workspace] * min(1, z.workspaces))
            # without autograd a block's intermediates die young: each lives while the next
            # INFER_WINDOW are made
            inner: list[int] = []
            for x in z.saved:
                inner.append(s.alloc(x))
                if len(inner) > INFER_WINDOW:
                    s.free([inner.pop(0)])
            s.temporaries(z.fwd_transient)
            out = s.allocs([hidden])
            s.free(prev + inner)
            prev = out
        final = s.allocs(z.head_saved)
        logits = s.allocs(z.loss_fwd)
        s.free(prev + final + logits + copies + inputs)
    return s.events


__all__ = ["StreamSizes", "coalesce", "inference_events", "key_of", "training_events"]
