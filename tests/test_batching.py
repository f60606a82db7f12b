"""engine.batching: padded token counts, budgets, coverage, determinism, shapes."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.batching import (
    BUCKET_MEGABATCHES,
    Batch,
    batch_shapes,
    make_batches,
    padding_summary,
    plan_batches,
    shapes_from_lengths,
    split_micro_batches,
    windows,
)
from engine.data import builtin_corpus, fallback_tokenizer, tokenize
from engine.errors import BadInput
from engine.profile import Profile

STRATEGIES = ("fixed", "dynamic", "bucketed", "token-budget")
PAD = 0


@pytest.fixture(scope="module")
def corpus_ids(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        return tokenize(builtin_corpus(), fallback_tokenizer())


def profile(**kw) -> Profile:
    return Profile(**kw)


# ----- independent padded-token counts --------------------------------------------------------------
def expected_counts(lengths, p: Profile) -> tuple[int, int]:
    """(real, padded) computed directly from the strategy's definition."""
    lens = [min(n, p.seq) for n in lengths]
    real = sum(lens)

    def pad_to(longest):
        return max(1, min(p.seq, math.ceil(longest / p.pad_multiple) * p.pad_multiple))

    order = torch.randperm(len(lens), generator=torch.Generator().manual_seed(p.seed)).tolist()
    if p.padding == "fixed":
        return real, len(lens) * p.seq
    if p.padding == "dynamic":
        chunks = [order[i:i + p.batch] for i in range(0, len(order), p.batch)]
        return real, sum(len(c) * pad_to(max(lens[i] for i in c)) for c in chunks)
    if p.padding == "bucketed":
        padded = 0
        mega = p.batch * BUCKET_MEGABATCHES
        for m in range(0, len(order), mega):
            group = sorted((lens[i] for i in order[m:m + mega]), reverse=True)
            for j in range(0, len(group), p.batch):
                padded += len(group[j:j + p.batch]) * pad_to(group[j])  # group[j] is its longest
        return real, padded
    budget = p.max_tokens or p.batch * p.seq
    padded, count, longest = 0, 0, 0
    for n in sorted(lens):
        if count and (count + 1) * pad_to(n) > budget:
            padded += count * pad_to(longest)
            count = 0
        count, longest = count + 1, n
    return real, padded + count * pad_to(longest)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("pad_multiple", [1, 64])
def test_padded_counts_match_independent_computation(corpus_ids, strategy, pad_multiple):
    p = profile(padding=strategy, pad_multiple=pad_multiple, batch=16, seq=512, seed=3)
    real, padded = expected_counts([len(x) for x in corpus_ids], p)
    summary = padding_summary(corpus_ids, p)
    assert (summary["real_tokens"], summary["padded_tokens"]) == (real, padded)
    assert summary["useful_fraction"] == pytest.approx(real / padded)
    assert summary["padded_fraction"] == pytest.approx(1 - real / padded)

    batches = make_batches(corpus_ids, p, PAD)
    assert sum(b.real_tokens for b in batches) == real
    assert sum(int(b.attention_mask.sum()) for b in batches) == real
    assert sum(b.padded_tokens for b in batches) == sum(b.input_ids.numel() for b in batches) == padded
    assert [b.shape for b in batches] == batch_shapes(corpus_ids, p)
    assert summary["n_batches"] == len(batches)
    shapes = [b.shape for b in batches]
    assert summary["distinct_shapes"] == len(set(shapes))
    assert summary["largest_batch_shape"] == max(shapes, key=lambda s: s[0] * s[1])


def test_fixed_padding_wastes_most_of_the_builtin_corpus(corpus_ids):
    s = padding_summary(corpus_ids, profile(padding="fixed", seq=512))
    assert 0.08 < s["useful_fraction"] < 0.20  # the "only about 14% useful"
    useful = {k: padding_summary(corpus_ids, profile(padding=k, seq=512))["useful_fraction"]
              for k in STRATEGIES}
    assert useful["fixed"] < useful["dynamic"] < useful["bucketed"] < useful["token-budget"]


def test_batch_contents_are_the_truncated_sequences(corpus_ids):
    p = profile(padding="dynamic", batch=8, seq=64, pad_multiple=8)
    for b in make_batches(corpus_ids[:200], p, pad_token_id=7):
        assert b.input_ids.dtype == torch.long and b.attention_mask.shape == b.input_ids.shape
        assert b.shape[1] % 8 == 0 and b.shape[1] <= 64
        for row, i in enumerate(b.indices):
            ids = corpus_ids[i][:64]
            n = len(ids)
            assert b.input_ids[row, :n].tolist() == ids
            assert b.input_ids[row, n:].eq(7).all()
            assert b.attention_mask[row].tolist() == [1] * n + [0] * (b.shape[1] - n)


# ----- properties on random lengths -----------------------------------------------------------------
lengths_st = st.lists(st.integers(min_value=0, max_value=300), min_size=0, max_size=200)


@settings(max_examples=150, deadline=None)
@given(lengths=lengths_st, batch=st.integers(1, 16), seq=st.integers(1, 256),
       pad_multiple=st.sampled_from([1, 2, 8, 64]), extra=st.integers(0, 2000),
       seed=st.integers(0, 2**31))
def test_token_budget_never_exceeded(lengths, batch, seq, pad_multiple, extra, seed):
    budget = seq + extra
    p = profile(padding="token-budget", batch=batch, seq=seq, pad_multiple=pad_multiple,
                max_tokens=budget, seed=seed)
    plan = plan_batches(lengths, p)
    for idx, t in plan:
        assert len(idx) * t <= budget
        assert t >= max(min(lengths[i], seq) for i in idx)
    assert sorted(i for idx, _ in plan for i in idx) == list(range(len(lengths)))


@settings(max_examples=100, deadline=None)
@given(lengths=lengths_st, strategy=st.sampled_from(STRATEGIES), batch=st.integers(1, 16),
       seq=st.integers(1, 256), pad_multiple=st.sampled_from([1, 3, 8]), seed=st.integers(0, 99))
def test_every_sequence_exactly_once(lengths, strategy, batch, seq, pad_multiple, seed):
    p = profile(padding=strategy, batch=batch, seq=seq, pad_multiple=pad_multiple, seed=seed)
    plan = plan_batches(lengths, p)
    assert Counter(i for idx, _ in plan for i in idx) == Counter(range(len(lengths)))
    for idx, t in plan:
        assert 1 <= t <= seq and t >= max(min(lengths[i], seq) for i in idx)
        if strategy != "token-budget":
            assert 1 <= len(idx) <= batch


def test_every_text_once_in_built_batches(corpus_ids):
    for strategy in STRATEGIES:
        batches = make_batches(corpus_ids, profile(padding=strategy, batch=32, seq=256), PAD)
        seen = sorted(i for b in batches for i in b.indices)
        assert seen == list(range(len(corpus_ids))), strategy


# ----- determinism and shapes -----------------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_deterministic_with_seed(corpus_ids, strategy):
    lengths = [len(x) for x in corpus_ids]
    a = plan_batches(lengths, profile(padding=strategy, seed=11))
    assert a == plan_batches(lengths, profile(padding=strategy, seed=11))
    assert a != plan_batches(lengths, profile(padding=strategy, seed=12))
    first = make_batches(corpus_ids[:300], profile(padding=strategy, seed=5), PAD)
    again = make_batches(corpus_ids[:300], profile(padding=strategy, seed=5), PAD)
    assert all(torch.equal(x.input_ids, y.input_ids) and x.indices == y.indices
               for x, y in zip(first, again))


@pytest.mark.parametrize("strategy", ["dynamic", "bucketed", "token-budget"])
def test_pad_multiple_reduces_distinct_shapes(corpus_ids, strategy):
    lengths = [len(x) for x in corpus_ids]
    plain = set(shapes_from_lengths(lengths, profile(padding=strategy, seq=512)))
    rounded = set(shapes_from_lengths(lengths, profile(padding=strategy, seq=512, pad_multiple=64)))
    assert len(rounded) < len(plain)
    assert all(t % 64 == 0 for _, t in rounded)


def test_fixed_shapes_and_partial_last_batch():
    p = profile(padding="fixed", batch=4, seq=10)
    assert shapes_from_lengths([3, 50, 1, 9, 0, 2], p) == [(4, 10), (2, 10)]
    assert shapes_from_lengths([], p) == []
    assert padding_summary([], p)["padded_tokens"] == 0


def test_empty_sequences_still_get_a_column():
    batches = make_batches([[], []], profile(padding="dynamic", batch=2, seq=8), PAD)
    assert batches[0].shape == (2, 1) and batches[0].real_tokens == 0


def test_token_budget_below_seq_is_bad_input():
    with pytest.raises(BadInput, match="max_tokens"):
        plan_batches([5, 6], profile(padding="token-budget", seq=512, max_tokens=100))


def test_token_budget_default_is_batch_times_seq(corpus_ids):
    lengths = [len(x) for x in corpus_ids]
    shapes = shapes_from_lengths(lengths, profile(padding="token-budget", batch=8, seq=512))
    assert max(b * t for b, t in shapes) <= 8 * 512
    assert max(b for b, _ in shapes) > 8  # many short sequences share a batch


# ----- micro-batches and windows --------------------------------------------------------------------
def test_split_micro_batches(corpus_ids):
    batch = make_batches(corpus_ids[:10], profile(padding="dynamic", batch=10, seq=128), PAD)[0]
    parts = split_micro_batches(batch, 3)
    assert [p.shape[0] for p in parts] == [4, 3, 3]
    assert all(p.shape[1] == batch.shape[1] for p in parts)
    assert torch.equal(torch.cat([p.input_ids for p in parts]), batch.input_ids)
    assert sum(p.real_tokens for p in parts) == batch.real_tokens
    assert sum(p.padded_tokens for p in parts) == batch.padded_tokens
    assert sum((p.indices for p in parts), ()) == batch.indices
    assert len(split_micro_batches(batch, 50)) == 10  # never an empty micro-batch
    assert split_micro_batches(batch, 1)[0].indices == batch.indices
    with pytest.raises(BadInput):
        split_micro_batches(batch, 0)
    assert isinstance(parts[0], Batch)


def test_windows():
    ids = list(range(10))
    assert windows(ids, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert windows(ids, 4, stride=3) == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert windows(ids, 10) == [ids] and windows(ids, 50) == [ids] and windows([], 3) == [[]]
    assert windows(ids, 1) == [[i] for i in ids]
    for bad in ((ids, 0), (ids, 4, 0), (ids, 4, 5)):
        with pytest.raises(BadInput):
            windows(*bad)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(0, 300), window=st.integers(1, 64), data=st.data())
def test_windows_cover_every_token(n, window, data):
    stride = data.draw(st.integers(1, window))
    ids = list(range(n))
    out = windows(ids, window, stride)
    assert all(1 <= len(w) <= window for w in out) or n == 0
    assert sorted({i for w in out for i in w}) == ids
    assert out[-1][-1:] == ids[-1:]
    assert all(w == ids[w[0]:w[0] + len(w)] for w in out if w)
