"""The inputs of a measured run's steps, and of the traced estimate's: token lists, step tensors,
micro-batches, the copy to the device.

Measure: the dataset is tokenized (cached in-process), planned into batches by the profile's
batching strategy (cycled over ``profile.steps``) and collated into CPU tensors per step, with
labels for the task; token ids at or above the model's vocabulary are taken modulo its size
(noted). Each step copies its (micro-)batches to the device inside the timed step (counted, as in a
real loop). The traced estimate uses the same step tensors for a batch shape (``placeholder_step``:
shapes and dtypes as measure makes them, no data needed) and the same split and copy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from engine.errors import BadInput, Cancelled

#: Fraction of real tokens masked for the masked-LM head (BERT's 15%).
MLM_PROBABILITY = 0.15

Progress = Callable[[float, str], None]

_TOKEN_CACHE: dict[tuple, tuple[list[tuple[int, ...]], int, int | None]] = {}


def token_lists(profile, should_stop, progress: Progress):
    """Tokenized dataset (cached in-process per dataset and tokenizer), pad id, mask id.

    ``progress`` gets fractions of the tokenization in [0, 1].
    """
    from engine import data
    from engine.models import resolve

    source = resolve(profile.model)
    tok_key = str(source.folder) if source.has_tokenizer else "fallback"
    ds = profile.dataset
    try:
        stamp = os.stat(ds).st_mtime if ds.lower() != "builtin" else 0.0
    except OSError:
        stamp = -1.0
    key = (ds, profile.text_column, tok_key, stamp)
    if key not in _TOKEN_CACHE:
        texts = data.load_texts(ds, profile.text_column, should_stop=should_stop)
        tok = data.tokenizer_for(profile)
        ids = data.tokenize(texts, tok, should_stop=should_stop, progress=progress)
        if not ids:
            raise BadInput(f"dataset {ds!r} holds no texts")
        if len(_TOKEN_CACHE) >= 4:
            _TOKEN_CACHE.pop(next(iter(_TOKEN_CACHE)))
        # Tuples of ints: the garbage collector stops traversing them (the protocol's gc is quick).
        _TOKEN_CACHE[key] = ([tuple(x) for x in ids], int(tok.pad_token_id), tok.mask_token_id)
    return _TOKEN_CACHE[key]


@dataclass
class StepData:
    input_ids: Any  # (B, T) int64, CPU
    attention_mask: Any  # (B, T) int64, CPU
    labels: Any  # (B, T) int64 for LM heads, (B,) for classification; None for inference
    real_tokens: int
    padded_tokens: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)


def prepare_steps(profile, config, task: str, should_stop, progress: Progress,
                  notes: list[str]) -> tuple[list[StepData], int]:
    """The CPU tensors of each step (batches from the profile's batching strategy, cycled) and the
    number of batches in one pass over the dataset (the plan's length).

    ``progress`` gets fractions of the data preparation in [0, 1].
    """
    from engine import batching

    tokens, pad_id, mask_id = token_lists(profile, should_stop, lambda f, m: progress(0.9 * f, m))
    plan = batching.plan_batches([len(t) for t in tokens], profile, should_stop)
    if not plan:
        raise BadInput(f"dataset {profile.dataset!r} gives no batches")
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    wrapped = False
    built: dict[int, StepData] = {}
    steps = []
    for s in range(profile.steps):
        j = s % len(plan)
        if j not in built:
            idx, t = plan[j]
            rows = [list(tokens[i][:profile.seq]) for i in idx]
            real = sum(len(r) for r in rows)
            ids = torch.tensor([r + [pad_id] * (t - len(r)) for r in rows], dtype=torch.long)  # (B, T)
            mask = torch.tensor([[1] * len(r) + [0] * (t - len(r)) for r in rows],
                                dtype=torch.long)  # (B, T)
            if vocab and int(ids.max()) >= vocab:
                ids = ids % vocab
                wrapped = True
            labels = None
            gen = torch.Generator().manual_seed(profile.seed * 1_000_003 + j)
            if profile.is_training:
                if task == "causal-lm":
                    labels = ids.masked_fill(mask == 0, -100)  # (B, T)
                elif task == "masked-lm":
                    chosen = (torch.rand(ids.shape, generator=gen) < MLM_PROBABILITY) & (mask == 1)
                    if not bool(chosen.any()):
                        chosen[0, 0] = True
                    m_id = mask_id if mask_id is not None and (not vocab or mask_id < vocab) \
                        else min(103, max(vocab - 1, 0))
                    labels = ids.masked_fill(~chosen, -100)  # (B, T)
                    ids = ids.masked_fill(chosen, m_id)
                else:  # classification: random binary labels, seeded
                    labels = torch.randint(0, 2, (ids.shape[0],), generator=gen)  # (B,)
            built[j] = StepData(ids, mask, labels, real, int(ids.numel()))
        steps.append(built[j])
        if should_stop is not None and should_stop():
            raise Cancelled("measure cancelled")
    if wrapped:
        notes.append(f"the tokenizer's ids exceed the model's vocabulary of {vocab}; "
                     f"ids were taken modulo {vocab}")
    progress(1.0, f"{len(plan)} batches planned; running {profile.steps} steps")
    return steps, len(plan)


def placeholder_step(b: int, t: int, task: str, training: bool) -> StepData:
    """A (B, T) step with the tensors ``prepare_steps`` makes (shapes and dtypes; every token real,
    ids 0): what the traced estimate copies to the meta device."""
    ids = torch.zeros((b, t), dtype=torch.long)  # (B, T)
    mask = torch.ones((b, t), dtype=torch.long)  # (B, T)
    labels = None
    if training:
        shape = (b,) if task == "classification" else (b, t)  # (B,) or (B, T), -100 at padding
        labels = torch.zeros(shape, dtype=torch.long)
    return StepData(ids, mask, labels, b * t, b * t)


def micro_parts(step: StepData, n: int) -> list[tuple[Any, Any, Any]]:
    """(ids, mask, labels) micro-batches, split as ``engine.batching.split_micro_batches`` does."""
    from engine.batching import Batch, split_micro_batches

    if n <= 1:
        return [(step.input_ids, step.attention_mask, step.labels)]
    batch = Batch(step.input_ids, step.attention_mask, step.real_tokens, step.padded_tokens,
                  tuple(range(step.input_ids.shape[0])))
    parts = split_micro_batches(batch, n)
    labels = torch.tensor_split(step.labels, len(parts), dim=0) if step.labels is not None \
        else [None] * len(parts)
    return [(p.input_ids, p.attention_mask, lab) for p, lab in zip(parts, labels)]


def to_device(t, dev):
    """A copy on ``dev`` (always a new storage, as a loop's ``.to(device)`` of a CPU batch)."""
    return None if t is None else t.to(dev, copy=True)
