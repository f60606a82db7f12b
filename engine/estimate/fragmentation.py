"""Reserved memory over the plan's sequence of batch shapes (caching-allocator fragmentation).

Why: with dynamic padding, bucketing or token-budget batching (without ``pad_multiple``) a run
meets tens to hundreds of distinct (B, T) shapes. PyTorch's caching allocator
(``c10/cuda/CUDACachingAllocator.cpp``, modelled in ``allocator.py``) keeps every segment it has
cudaMalloc'ed until ``empty_cache`` (never called within a measured run), serves a request from
the best-fitting cached free block (smallest block >= request, split when the remainder is
> 1 MiB in the large pool, >= 512 B in the small pool) and otherwise cudaMallocs a new segment
(2 MiB for requests <= 1 MiB, 20 MiB for 1-10 MiB, the request rounded to 2 MiB above). A step
whose large tensors (logits, their fp32 upcasts and gradients, attention buffers) are larger than
any cached free block therefore gets new segments, while the smaller segments of earlier steps
stay reserved. Reserved grows in a ratchet, once for every step that is larger than all steps
before it. The H100 rows show this (bench/results/estimates_vs_h100_2026-11-25.md,
"Batching"): gpt2 dynamic / bucketed / token-budget reserved 9.9-10.4 GiB for 7.1 GiB
allocated, and Qwen2.5-0.5B token-budget reserved 45.6 GiB for 20.0 GiB. One step replayed at
the worst shape (the single-step model) predicted 7.5 and 20.7 GiB.

What this module does (traced estimator): it replays, through the same allocator model and in
plan order, the allocation events of the steps that can grow the cache. These are the *records*
of the plan: batches whose estimated step peak (analytic, per shape) exceeds that of every
earlier batch. They run up to and including the worst batch. After the worst batch, every later
step fits in blocks already cached, up to splitting effects.

* The first record is traced for one step (``trace_step(steps=1)``). Its events (cuBLAS
  workspaces, weights, step 1 with the optimizer states created) open the replay, followed by its
  steady-state step: the same step minus the allocations never freed (the optimizer states).
  For gpt2 this equals the second step of a two-step trace event for event.
* Every later record adds its steady-state step. The worst shape reuses the two-step trace the
  estimator has already made: its self-contained last step.
* At most ``MAX_EXTRA_TRACES`` records besides the worst one are traced: the first, then evenly
  spaced ones (deterministic). In a random order the expected number of records among n batches
  is about ln(n) + 0.6, so 6-7 for 300 batches.
* The result is ``max(single-step reserved, replay)``. Reserved never shrinks during a replay, so
  appending shapes to a plan never lowers the estimate.

Derived traces (scaling one trace's shape-dependent sizes to another shape) were tried and
rejected. Traces of padded gpt2 at T = 512 / 384 / 256 have the same event structure, but
T = 100 (not a multiple of 8) and unpadded batches (no mask) add or drop events. A faithful
derivation needs a reference trace per structure, which costs more than tracing the records.

Validation (no GPU: the measured corpus differs, see below):

* The records-only replay was checked against a replay of every batch of the plan over two
  passes, with exact per-shape traces (12 seeds of Qwen2.5-0.5B token-budget, 8 of gpt2
  token-budget + pad64). Records-only is within about 10% of the full replay, mostly within 1%.
* Over those seeds the full replay spans 20.8-48.2 GiB (median 34.6) for Qwen2.5-0.5B
  token-budget; the H100 measured 45.6. For gpt2 token-budget + pad64 it spans 7.4-8.9 GiB; the
  H100 measured 7.4. Reserved depends on the order of the batches, not only on their shapes.
  The GPU machine's corpus (4,883 texts, Python 3.12) gives a different plan and order from
  this machine's (6,176 texts), so a row-by-row comparison is only indicative.

Known limitations:

* steps after the worst batch and second-pass effects are not replayed. In the full replays they
  add up to about 2 GiB on Qwen token-budget.
* The replay covers a whole pass over the data, as the estimated peak does, even when the
  profile's ``steps`` is smaller.
* Driver-side effects are not modelled: the allocator's OOM retry frees cached blocks, so
  reserved near the device's capacity is overestimated.
* The analytic estimator keeps its single-step reserved model and only notes the risk
  (``analytic_note``): a per-shape analytic pass over hundreds of shapes costs more than its
  10 ms budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from engine.profile import Profile

#: Records traced besides the worst shape (one ``trace_step(steps=1)`` each: ~0.25 s for gpt2,
#: ~0.6 s for a 1.5 B model on 2 CPU cores).
MAX_EXTRA_TRACES = 4

Shape = tuple[tuple[int, int], bool]  # ((B, T), has padding)
Events = list[tuple[object, int]]


_PLAN_FIELDS = ("dataset", "text_column", "model", "trust_remote_code", "padding", "batch", "seq",
                "pad_multiple", "max_tokens", "seed")
_plans: dict[tuple, list] = {}


def plan_of(profile: Profile, lengths: Sequence[int]) -> list:
    """``batching.plan_batches(lengths, profile)``, memoized on the fields it depends on (a
    token-budget plan over the built-in corpus takes ~4 ms; the analytic budget is 10 ms)."""
    from engine import batching

    key = tuple(getattr(profile, f) for f in _PLAN_FIELDS) + (len(lengths), hash(tuple(lengths)))
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) >= 8:
            _plans.pop(next(iter(_plans)))
        plan = _plans[key] = batching.plan_batches(lengths, profile)
    return plan


def plan_sequence(profile: Profile) -> list[Shape]:
    """The plan's batches in step order (one pass), each as ((B, T), has padding)."""
    from engine.estimate import _dataset_lengths

    lengths = _dataset_lengths(profile.dataset, profile.text_column, profile.model,
                               profile.trust_remote_code)
    out = []
    for idx, t in plan_of(profile, lengths):
        padded = any(min(lengths[i], profile.seq) < t for i in idx)
        out.append(((len(idx), t), padded))
    return out


def records(sequence: Sequence[Shape], metric: Callable[[Shape], float]) -> list[Shape]:
    """Batches larger (by ``metric``) than every batch before them, in order."""
    best = None
    out = []
    for s in sequence:
        m = metric(s)
        if best is None or m > best:
            best = m
            out.append(s)
    return out


def pick(recs: list[Shape], worst: Shape, cap: int = MAX_EXTRA_TRACES) -> list[Shape]:
    """The records to replay: up to the worst shape, at most ``cap`` besides it (first kept)."""
    shapes = [r[0] for r in recs]
    if worst[0] in shapes:
        recs = recs[:shapes.index(worst[0])]
    recs = [r for r in recs if r[0] != worst[0]]
    if len(recs) > cap:
        step = (len(recs) - 1) / (cap - 1) if cap > 1 else 0
        recs = [recs[round(i * step)] for i in range(cap)] if cap > 1 else recs[:1]
    return recs + [worst]


def _persistent_prefix(events: Events) -> int:
    """Length of the leading run of allocations that are never freed (workspaces, weights)."""
    freed = {u for u, d in events if d < 0}
    n = 0
    while n < len(events) and events[n][1] > 0 and events[n][0] not in freed:
        n += 1
    return n


def steady_from_one_step(events: Events) -> tuple[Events, Events]:
    """(prefix, steady step) of a one-step trace. The prefix is workspaces, weights and step 1
    as traced. The steady step is step 1 without its never-freed allocations (optimizer states)."""
    freed = {u for u, d in events if d < 0}
    k = _persistent_prefix(events)
    steady = [(u, d) for u, d in events[k:] if d < 0 or u in freed]
    return list(events), steady


def last_step(events: Events) -> Events:
    """The last self-contained step of a multi-step trace. This is the earliest suffix in which
    every free has its allocation and every allocation is freed: step 2 of a two-step trace, or
    the forward of an inference trace."""
    pending: set = set()
    never_freed = 0
    start = len(events)
    for k in range(len(events) - 1, -1, -1):
        u, d = events[k]
        if d < 0:
            pending.add(u)
        elif u in pending:
            pending.discard(u)
        else:
            never_freed += 1
        if not pending and never_freed == 0:
            start = k
    return list(events[start:])


def _tag(events: Events, tag: object) -> Events:
    return [((tag, u), d) for u, d in events]


def sequence_events(profile: Profile, worst: Shape, worst_events: Events,
                    should_stop: Callable[[], bool] | None = None,
                    seq: Sequence[Shape] | None = None) -> tuple[Events | None, dict]:
    """Allocation events of the plan's records in order, for ``allocator.simulate``.

    ``worst_events`` is the estimator's two-step trace at the worst shape, workspaces first.
    ``seq`` (default: the profile's plan) is the batches in step order. Returns (None, info) when
    there is nothing beyond the single step to replay.
    """
    from engine.estimate import analytic, traced

    seq = plan_sequence(profile) if seq is None else list(seq)
    distinct = sorted(set(seq))
    info = {"plan_batches": len(seq), "distinct_shapes": len(distinct)}
    if len(distinct) <= 1:
        return None, info
    cache: dict[Shape, int] = {}

    def metric(s: Shape) -> int:
        if s not in cache:
            cache[s] = analytic.estimate_shape(profile, s[0], s[1],
                                               reserved_model="sizes").peak_allocated
        return cache[s]

    recs = records(seq, metric)
    info["records"] = len(recs)
    chosen = pick(recs, worst)
    info["replayed"] = [[b, t] for (b, t), _ in chosen]
    if len(chosen) <= 1:
        return None, info
    ws = [(u, d) for u, d in worst_events if isinstance(u, str) and d > 0]
    out: Events = []
    for i, shape in enumerate(chosen[:-1]):
        if should_stop is not None and should_stop():
            from engine.errors import Cancelled

            raise Cancelled("estimate cancelled")
        one = traced.trace_step(profile, shape[0], has_padding=shape[1], steps=1,
                                should_stop=should_stop).events
        prefix, steady = steady_from_one_step(one)
        if i == 0:
            out += ws + _tag(prefix, "first")
        out += _tag(steady, i)
    out += _tag(last_step(worst_events), "worst")
    return out, info


def _pad_hint(profile: Profile | None) -> str:
    """The --pad-multiple suggestion, only for a profile that does not round lengths already."""
    if profile is not None and profile.pad_multiple > 1:
        return ""
    return "; --pad-multiple 64 caps the shapes at about 10"


def analytic_note(profile: Profile, n_distinct: int) -> str:
    """The analytic estimator's caveat for plans with several batch shapes."""
    return (f"{n_distinct} distinct batch shapes: the caching allocator keeps the segments of "
            "every shape, so reserved memory can exceed this single-step estimate (H100: "
            "+33-40% gpt2, +120% Qwen2.5-0.5B token-budget); the traced estimator replays the "
            "plan's order" + _pad_hint(profile))


def traced_note(info: dict, reserved: int, profile: Profile | None = None) -> str:
    """The traced estimator's note on the replay (bytes shown in MiB)."""
    single = info.get("single_step_reserved_bytes", reserved)
    shapes = ", ".join(f"{b}x{t}" for b, t in info.get("replayed", []))
    return (f"{info['distinct_shapes']} distinct batch shapes in {info['plan_batches']} batches: "
            f"reserved replays the allocator over the {len(info.get('replayed', []))} batches "
            f"that grow the cache, in plan order ({shapes}; {info.get('records', 0)} such "
            f"batches in the plan): {reserved / 2**20:,.0f} MiB vs {single / 2**20:,.0f} MiB for "
            "one step at the worst shape; the order matters (another seed can differ by tens of "
            "percent)" + _pad_hint(profile))
