"""Batching strategies: how token lists become (B, T) batches, and how much of them is padding.

Four strategies, chosen by ``Profile.padding`` (all truncate to ``Profile.seq`` first):

fixed
    Every sequence padded to ``seq``. Batches of ``batch`` in a seeded random order.
dynamic
    Same order; each batch padded to its longest sequence (rounded up to ``pad_multiple``,
    capped at ``seq``).
bucketed
    Hugging Face's ``group_by_length``: the seeded order is cut into mega-batches of
    ``batch * BUCKET_MEGABATCHES`` sequences, each sorted by length (longest first) and cut into
    batches, so a batch holds similar lengths; then whole batches are shuffled.
token-budget
    fairseq's ``max_tokens``: sequences sorted by length (seeded tie-break), batches filled
    greedily while ``B * padded_len <= max_tokens`` (0 means ``batch * seq``), then shuffled. The
    batch count varies: many short sequences or a few long ones.

Everything is deterministic for a given seed. Randomness comes from one ``torch.Generator``
seeded with ``Profile.seed`` (``randperm`` for the order, then ``randperm`` for the batch order),
so an exported script can reproduce the same batches with torch alone.

Memory depends on the shapes, not the token values: estimators call ``batch_shapes`` (no tensors
are built) and look at the largest ``B * T``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engine.errors import BadInput, Cancelled

#: Mega-batch size in batches for the bucketed strategy (Hugging Face's LengthGroupedSampler uses 50).
BUCKET_MEGABATCHES = 50

#: A plan: for each batch, the positions of its sequences in the input and its padded length T.
Plan = list[tuple[tuple[int, ...], int]]


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors field by field is ambiguous
class Batch:
    input_ids: torch.Tensor  # (B, T) int64, right-padded with the pad token id
    attention_mask: torch.Tensor  # (B, T) int64, 1 for real tokens, 0 for padding
    real_tokens: int  # non-pad tokens in the batch
    padded_tokens: int  # all tokens, pad included: B * T
    indices: tuple[int, ...]  # row r holds token_lists[indices[r]]

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.input_ids.shape[0]), int(self.input_ids.shape[1]))


def plan_padded_batches(lengths, padding, batch, seq, seed, pad_multiple=1, max_tokens=0,
                        megabatches=50, before_chunk=None):
    """Which sequences go in which batch, and each batch's padded length T (no tensors), for the
    strategies of this module's docstring. ``lengths`` are untruncated token counts (truncated to
    ``seq`` here); ``max_tokens`` 0 means ``batch * seq``; ``before_chunk`` is called before each
    bucketed mega-batch (the engine's cancel check). Torch only: the exported script embeds it."""
    import torch

    def padded_length(longest):  # rounded up to pad_multiple, never beyond seq, at least 1 column
        return max(1, min(seq, -(-longest // pad_multiple) * pad_multiple))

    n = len(lengths)
    if n == 0:
        return []
    lens = [min(int(x), seq) for x in lengths]
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator).tolist()
    if padding in ("fixed", "dynamic"):
        groups = [order[i:i + batch] for i in range(0, n, batch)]
    elif padding == "bucketed":  # Hugging Face's group_by_length
        mega = batch * megabatches
        groups = []
        for start in range(0, n, mega):
            if before_chunk is not None:
                before_chunk()
            chunk = sorted(order[start:start + mega], key=lambda i: -lens[i])  # stable: ties keep order
            groups.extend(chunk[i:i + batch] for i in range(0, len(chunk), batch))
    else:  # token-budget: fairseq's max_tokens
        budget = max_tokens or batch * seq
        rank = [0] * n
        for r, i in enumerate(order):
            rank[i] = r  # random tie-break among equal lengths
        groups, current = [], []
        for i in sorted(range(n), key=lambda i: (lens[i], rank[i])):
            # Ascending order: the newcomer is the longest, so it sets the padded length.
            if current and (len(current) + 1) * padded_length(lens[i]) > budget:
                groups.append(current)
                current = []
            current.append(i)
        groups.append(current)
    if padding in ("bucketed", "token-budget"):
        groups = [groups[j] for j in torch.randperm(len(groups), generator=generator).tolist()]
    if padding == "fixed":
        return [(tuple(g), seq) for g in groups]
    return [(tuple(g), padded_length(max(lens[i] for i in g))) for g in groups]


def token_budget(profile) -> int:
    """Tokens per batch (padding included) of the token-budget strategy."""
    budget = profile.max_tokens or profile.batch * profile.seq
    if budget < profile.seq:
        raise BadInput(f"max_tokens ({budget}) is below seq ({profile.seq}): a full-length sequence "
                       "would not fit in any batch; raise max_tokens or lower seq")
    return budget


def plan_batches(lengths: Sequence[int], profile,
                 should_stop: Callable[[], bool] | None = None) -> Plan:
    """Which sequences go in which batch, and each batch's padded length T (no tensors):
    ``plan_padded_batches`` with the profile's settings.

    ``lengths`` are untruncated token counts; they are truncated to ``profile.seq`` here.
    """
    if profile.padding not in ("fixed", "dynamic", "bucketed", "token-budget"):
        raise BadInput(f"padding must be fixed, dynamic, bucketed or token-budget; got {profile.padding!r}")
    if len(lengths) == 0:
        return []
    budget = token_budget(profile) if profile.padding == "token-budget" else 0

    def before_chunk() -> None:
        if should_stop is not None and should_stop():
            raise Cancelled("batching cancelled")

    return plan_padded_batches(lengths, profile.padding, profile.batch, profile.seq, profile.seed,
                               profile.pad_multiple, budget, BUCKET_MEGABATCHES, before_chunk)


def shapes_from_lengths(lengths: Sequence[int], profile) -> list[tuple[int, int]]:
    """(B, T) of every batch, in the order ``make_batches`` yields them."""
    return [(len(idx), t) for idx, t in plan_batches(lengths, profile)]


def batch_shapes(token_lists: Sequence[Sequence[int]], profile) -> list[tuple[int, int]]:
    """(B, T) of every batch of ``make_batches`` without building tensors (for estimators)."""
    return shapes_from_lengths([len(t) for t in token_lists], profile)


def pad_batch(rows, length, pad_token_id):
    """(input_ids, attention_mask) of token lists ``rows``, right-padded to ``length``: (B, T)
    int64 each, the mask 1 on real tokens. Torch only: the exported script embeds it."""
    input_ids = torch.tensor([r + [pad_token_id] * (length - len(r)) for r in rows],
                             dtype=torch.long)  # (B, T)
    attention_mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows],
                                  dtype=torch.long)  # (B, T)
    return input_ids, attention_mask


def make_batches(token_lists: Sequence[Sequence[int]], profile, pad_token_id: int,
                 should_stop: Callable[[], bool] | None = None) -> list[Batch]:
    """The batches of ``profile.padding`` over ``token_lists`` (truncated to ``profile.seq``)."""
    seq = profile.seq
    batches = []
    for idx, t in plan_batches([len(x) for x in token_lists], profile, should_stop):
        if should_stop is not None and should_stop():
            raise Cancelled("batching cancelled")
        rows = [list(token_lists[i][:seq]) for i in idx]
        real = sum(len(r) for r in rows)
        input_ids, attention_mask = pad_batch(rows, t, pad_token_id)
        batches.append(Batch(input_ids, attention_mask, real, len(rows) * t, idx))
    return batches


def padding_summary(token_lists: Sequence[Sequence[int]], profile) -> dict[str, Any]:
    """How much of what the model processes is real: token counts, fractions and batch shapes."""
    return summary_from_lengths([len(t) for t in token_lists], profile)


def summary_from_lengths(lengths: Sequence[int], profile) -> dict[str, Any]:
    """``padding_summary`` from lengths alone."""
    plan = plan_batches(lengths, profile)
    real = sum(min(int(x), profile.seq) for x in lengths)
    shapes = [(len(idx), t) for idx, t in plan]
    padded = sum(b * t for b, t in shapes)
    largest = max(shapes, key=lambda s: s[0] * s[1]) if shapes else (0, 0)
    return {
        "real_tokens": real,
        "padded_tokens": padded,
        "padded_fraction": (padded - real) / padded if padded else 0.0,
        "useful_fraction": real / padded if padded else 0.0,
        "n_batches": len(shapes),
        "distinct_shapes": len(set(shapes)),
        "largest_batch_shape": largest,
    }


def split_micro_batches(batch: Batch, n: int) -> list[Batch]:
    """Split a batch row-wise into ``n`` near-equal micro-batches (gradient accumulation).

    Micro-batches keep the batch's T: they are slices of the collated batch, as in a loop that
    accumulates over ``batch.input_ids.chunk(n)``. A batch with fewer than ``n`` rows gives one
    micro-batch per row.
    """
    if n < 1:
        raise BadInput(f"micro-batch count must be >= 1; got {n}")
    rows = batch.input_ids.shape[0]
    k = max(1, min(n, rows))
    ids_parts = torch.tensor_split(batch.input_ids, k, dim=0)  # k x (b_j, T)
    mask_parts = torch.tensor_split(batch.attention_mask, k, dim=0)  # k x (b_j, T)
    out, start = [], 0
    for ids, mask in zip(ids_parts, mask_parts):
        b = ids.shape[0]
        out.append(Batch(ids, mask, int(mask.sum()), int(ids.numel()),
                         batch.indices[start:start + b]))
        start += b
    return out


def windows(token_ids: Sequence[int], window: int, stride: int | None = None) -> list[list[int]]:
    """Cut a long sequence into windows of at most ``window`` tokens, starting every ``stride``
    tokens (default: ``window``, no overlap); the last window ends at the sequence's end.

    A sequence no longer than ``window`` is one window; every token is in at least one window.
    """
    if window < 1:
        raise BadInput(f"window must be >= 1; got {window}")
    stride = window if stride is None else stride
    if not 1 <= stride <= window:
        raise BadInput(f"stride must be between 1 and the window ({window}); got {stride}")
    ids = list(token_ids)
    if len(ids) <= window:
        return [ids]
    out = []
    start = 0
    while True:
        out.append(ids[start:start + window])
        if start + window >= len(ids):
            return out
        start += stride
