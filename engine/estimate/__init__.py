"""Estimators: peak GPU memory of a profile's measured run, predicted without a GPU.

    result = estimate(profile)                      # "auto": traced where fast enough, else analytic
    result = estimate(profile, method="analytic")   # formulas, milliseconds (analytic.py)
    result = estimate(profile, method="traced")     # one step on meta tensors, seconds (traced.py)

Both predict exactly what ``engine.measure`` reports (DESIGN.md, "What measured means"):
``torch.cuda.max_memory_allocated()`` over the steps minus what was allocated before the model
(``peak_allocated_bytes``), ``max_memory_reserved()`` (the caching allocator model,
``allocator.py``) and the device's used memory (reserved + CUDA context, ``device.py``).

The peak comes from the largest batch the padding strategy can produce: ``fixed`` gives
(batch, seq); the other strategies' batch shapes come from the dataset's token lengths
(``engine.batching``), and the shape with the largest estimated memory is reported in
``peak_batch_shape``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

from engine.data.tokens import tokenizer_info
from engine.errors import BadInput, Cancelled
from engine.prepare import prepare
from engine.profile import Profile
from engine.results import EstimateResult, LayerBytes, MemoryCategory

METHODS = ("auto", "analytic", "traced")

#: "auto" uses the traced estimator up to this many transformer blocks (its time grows with the
#: number of ops, not with widths or tokens: ~2 s for Qwen2.5-1.5B's 28 blocks on 2 CPU cores).
TRACED_MAX_LAYERS = 64


def _progress(progress, fraction: float, message: str) -> None:
    if progress is not None:
        progress(fraction, message)


def _check_stop(should_stop) -> None:
    if should_stop is not None and should_stop():
        raise Cancelled("estimate cancelled")


@functools.lru_cache(maxsize=8)
def _dataset_lengths(dataset: str, text_column: str, model: str, trust: bool) -> tuple[int, ...]:
    from engine import data

    profile = Profile(dataset=dataset, text_column=text_column, model=model,
                      trust_remote_code=trust)
    texts = data.load_texts(dataset, text_column)
    tok = data.tokenizer_for(profile)
    return tuple(len(ids) for ids in data.tokenize(texts, tok))


def batch_candidates(profile: Profile) -> tuple[list[tuple[tuple[int, int], bool]], str]:
    """(B, T) shapes worth estimating, each with "has padding", and a note on where they come from.

    ``fixed`` padding: (batch, seq), padded or not as the dataset's batches are: a batch whose
    every text reaches ``seq`` has an all-ones mask, which transformers drops; the SDPA kernel then
    differs (no mask: flash in half precision, and for grouped-query heads ``enable_gqa``, which
    sends fp32 to the math kernel with its T x T probabilities; a mask: the memory-efficient
    kernel with repeated k/v and a saved bias). Both kinds can occur; the analytic estimate picks
    the larger. Other strategies: the distinct shapes of the batches ``engine.batching`` makes from
    the dataset's token lengths.
    """
    lengths = _dataset_lengths(profile.dataset, profile.text_column, profile.model,
                               profile.trust_remote_code)
    if not lengths:
        raise BadInput(f"dataset {profile.dataset!r} has no texts")
    from engine.estimate.fragmentation import plan_of

    if profile.padding == "fixed":
        plan = plan_of(profile, lengths)
        whole = [idx for idx, _t in plan if len(idx) == profile.batch] or [idx for idx, _t in plan]
        kinds = sorted({any(lengths[i] < profile.seq for i in idx) for idx in whole}, reverse=True)
        shapes = [((profile.batch, profile.seq), k) for k in kinds]
        what = " and ".join("padded" if k else "full (no mask)" for k in kinds)
        return shapes, f"fixed padding: (batch, seq), {what} batches"

    plan = plan_of(profile, lengths)  # batching.plan_batches, memoized
    shapes: dict[tuple[int, int], set[bool]] = {}
    for idx, t in plan:  # a shape can come both padded and full (see above): both are kept
        shapes.setdefault((len(idx), t), set()).add(any(min(lengths[i], profile.seq) < t for i in idx))
    # Keep the Pareto-largest shapes: no other shape has both B and T at least as large.
    items = sorted(shapes.items(), key=lambda x: (-x[0][0] * x[0][1], -x[0][1]))
    keep = []
    for (b, t), kinds in items:
        if not any(b2 >= b and t2 >= t and (b2, t2) != (b, t) for (b2, t2), _ in keep):
            keep += [((b, t), k) for k in sorted(kinds, reverse=True)]
    return keep[:16], f"{profile.padding} batches over {len(lengths)} texts: {len(plan)} batches"


def _device_used(reserved: int, profile: Profile) -> int:
    from engine.estimate import device

    return reserved + device.context_bytes(profile.target, profile.mode == "train",
                                           profile.precision != "fp32", device.kind_of(profile))


def _layers(outcome_layers: dict[str, int], profile: Profile, weight_bytes: int,
            extra_rows: tuple = ()) -> tuple[LayerBytes, ...]:
    """Rows of the per-layer table, in model order: the embeddings, each block, the final norm and
    LM head, the techniques' extra models (``AnalyticTerms.rows``: a distillation teacher), and the
    logits; their parameters add up to the model's and
    their weight bytes to ``weight_bytes`` (the estimate's weights: the embeddings row takes the
    buffers and the allocator's rounding). Activations: saved for backward (training); the logits
    row holds the logits and the loss's tensors alive at the loss (temporaries in the breakdown)."""
    from engine.estimate.analytic import EMBEDDINGS_ROW, HEAD_ROW, LOGITS_ROW, arch_of

    arch = arch_of(profile)
    elt = 2 if profile.precision in ("bf16", "fp16") else 4
    blocks = [LayerBytes(name=name, params=p, weight_bytes=p * elt,
                         activation_bytes=int(outcome_layers.get(name, 0)))
              for name, p in zip(arch.layer_names, arch.layer_params)]
    head = LayerBytes(name=HEAD_ROW, params=arch.head_params, weight_bytes=arch.head_params * elt,
                      activation_bytes=int(outcome_layers.get(HEAD_ROW, 0)))
    tail = [head]
    tail += [LayerBytes(name=name, params=params, weight_bytes=wbytes, activation_bytes=0)
             for name, params, wbytes in extra_rows]
    tail.append(LayerBytes(name=LOGITS_ROW, params=0, weight_bytes=0,
                           activation_bytes=int(outcome_layers.get(LOGITS_ROW, 0))))
    known = sum(x.weight_bytes for x in blocks + tail)
    embed_params = arch.params - sum(arch.layer_params) - arch.head_params
    embeddings = LayerBytes(name=EMBEDDINGS_ROW, params=embed_params,
                            weight_bytes=max(0, int(weight_bytes) - known),
                            activation_bytes=int(outcome_layers.get(EMBEDDINGS_ROW, 0)))
    return tuple([embeddings] + blocks + tail)


def _analytic(profile: Profile, shapes, should_stop, replay: bool = True) -> tuple:
    """(outcome, shape, padded) of the shape with the largest peak. Shapes are compared with the
    closed-form reserved; the winner's reserved is replayed in order (``analytic_stream``) when
    ``replay``, i.e. when the analytic outcome is the answer."""
    from engine.estimate import analytic

    best = None
    model = "stream" if replay and len(shapes) == 1 else "sizes"
    for shape, padded in shapes:
        _check_stop(should_stop)
        o = analytic.estimate_shape(profile, shape, padded, reserved_model=model)
        if best is None or o.peak_allocated > best[0].peak_allocated:
            best = (o, shape, padded)
    if replay and model == "sizes":
        o, shape, padded = best
        best = (analytic.estimate_shape(profile, shape, padded), shape, padded)
    return best


def _device_events(profile: Profile, outcome, workspace: int) -> list:
    """The traced allocations in the order a CUDA run makes them, for the allocator model.

    * The model's build (``TraceOutcome.build_events``) replaces the weights: ``build_model``
      first makes the weights in the config's dtype and converts them one by one, and a tied LM
      head's own weight is made and dropped; those blocks stay cached. Without them, on an
      H200: Llama-3.2-1B fp32 inference 8x1024 and Qwen2.5-0.5B bf16-amp training 8x512 were
      10.3% and 8.5% low.
    * The cuBLAS workspaces (``workspace`` bytes: half each for forward and backward in
      training) come where step 1 first calls cuBLAS in each (``TraceOutcome.workspace_at``),
      not first: the backward's lands in whatever block is free after the loss, which on
      Gemma-3-like bf16-amp 8x512 is a 4 GiB logits segment that step 2 then cannot reuse
      (a fourth one: reserved was 16.5% low).

    Allocator traces of those runs replayed through ``allocator.simulate`` with the real segment
    addresses give the measured reserved exactly (results/verify_h200_2026-12-02/call13)."""
    events = list(outcome.events)
    if profile.target != "cuda":
        return events
    weights = [(u, n) for u, n, _ in outcome.weights]
    build = list(outcome.build_events)
    shift = 0
    if build and profile.quant == "none" and events[:len(weights)] == weights:
        events = build + events[len(weights):]
        shift = len(build) - len(weights)
    if workspace:
        parts = [workspace // 2, workspace - workspace // 2] if profile.mode == "train" \
            else [workspace]
        at = [i + shift for i in outcome.workspace_at]
        if len(at) != len(parts):  # no cuBLAS call seen: the workspaces first, as before
            at = [0] * len(parts)
        for k in reversed(range(len(parts))):
            events.insert(at[k], (f"__ws{k}__", parts[k]))
    return events


def _traced_reserved(profile: Profile, events) -> int:
    from engine.estimate import allocator, device

    c = device.constants(profile.target, device.kind_of(profile))
    stats = allocator.simulate(events, expandable=profile.alloc == "expandable",
                               pool_bytes=profile.alloc_pool_bytes,
                               max_split=profile.alloc_max_split_bytes,
                               small_page=c.expandable_small_page,
                               large_page=c.expandable_large_page)
    return stats.peak_reserved


def estimate(profile: Profile, method: str = "auto",
             progress: Callable[[float, str], None] | None = None,
             should_stop: Callable[[], bool] | None = None,
             quick: bool = False) -> EstimateResult:
    """Predict the peak memory of the profile's measured run (see module docstring).

    ``quick`` (analytic only): reserved from the closed form (``allocator.reserved_from_sizes``)
    instead of the replayed stream (``analytic_stream``, ~5-15 ms): for searches that make many
    estimates and re-estimate what they return (``plan_search``)."""
    started = time.perf_counter()
    if method not in METHODS:
        raise BadInput(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    prepare(profile)  # the one gate: the same refusals as measure, plan and export
    if profile.mode == "generate":  # prefill + decode over a KV cache: its own phases
        from engine.estimate.generate import estimate_generate

        return estimate_generate(profile, method, progress, should_stop)
    _progress(progress, 0.05, "batch shapes")
    shapes, shape_note = batch_candidates(profile)
    _check_stop(should_stop)
    _progress(progress, 0.2, "analytic estimate")
    return _estimate_at(profile, method, shapes, [shape_note], started, progress, should_stop,
                        plan_order=profile.padding != "fixed", quick=quick)


def estimate_shape(profile: Profile, shape: tuple[int, int], padded: bool = True,
                   method: str = "auto") -> EstimateResult:
    """The estimate for one given batch shape (and whether its rows carry padding), bypassing
    the dataset: for calibration against runs on synthetic batches."""
    if method not in METHODS:
        raise BadInput(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    prepare(profile)  # the one gate: the same refusals as measure, plan and export
    return _estimate_at(profile, method, [(tuple(shape), padded)],
                        [f"given batch shape {shape[0]}x{shape[1]}"], time.perf_counter(), None,
                        None)


def _speed(profile: Profile, shape: tuple[int, int], costs=None, plan_order: bool = False):
    """(fields for EstimateResult, the speed estimate's dict, a note); empty on a CPU target.

    Fixed padding: the step at ``shape``. A plan of several shapes: its padded tokens over the sum
    of its steps' times (each shape timed in closed form, scaled by the traced/closed-form ratio at
    the traced shape), and the first-pass cost of its distinct shapes beside it."""
    from engine.estimate import speed
    from engine.estimate.analytic import arch_of

    if profile.target != "cuda":
        return {}, {}, None
    if costs is not None:
        costs = speed.traced_step_costs(costs, profile.mode == "train", profile.micro_batches)
    arch = arch_of(profile)
    est = speed.estimate_speed(profile, shape, costs=costs, arch=arch)
    step_s, tps = est.step_s, est.tokens_per_s
    extra = est.to_dict()
    if plan_order:
        from engine import gpus
        from engine.estimate import fragmentation

        seq = [s for s, _ in fragmentation.plan_sequence(profile)]
        gpu = gpus.for_profile(profile)
        scale = est.step_s / speed.step_time(speed.analytic_costs(profile, arch, shape), gpu)["step_s"] \
            if costs is not None else 1.0
        times = {s: speed.step_time(speed.analytic_costs(profile, arch, s), gpu)["step_s"] * scale
                 for s in set(seq)}
        total = sum(times[s] for s in seq)
        if total:
            tps = sum(b * t for b, t in seq) / total
            step_s = total / len(seq)
        extra.update(step_s=step_s, tokens_per_s=tps, plan_steps=len(seq),
                     distinct_shapes=len(times),
                     first_pass_s=speed.calibration().first_shape_s * len(times))
    useful = _useful_tokens_per_s(profile, arch, est.step_s if not plan_order else None, step_s)
    if useful:
        extra["useful_tokens_per_s"] = useful  # real (non-pad) tokens: what padding strategies trade
    fields = {"gpu": est.gpu, "step_s": step_s, "tokens_per_s": tps,
              "speed_error": est.median_error}
    note = speed.SpeedEstimate(**{**est.to_dict(), "step_s": step_s, "tokens_per_s": tps}).note()
    if plan_order and extra.get("distinct_shapes", 1) > 1:
        note += f"; the first pass adds ~{extra['first_pass_s']:.1f} s for {extra['distinct_shapes']} shapes"
    return fields, extra, note


def _useful_tokens_per_s(profile: Profile, arch, fixed_step_s, mean_step_s) -> float:
    """Real (non-pad) tokens per second over one pass of the dataset's plan: its texts' tokens
    (cut at seq) over the plan's steps at the estimated step time. 0 where it cannot be known."""
    try:
        from engine.estimate.fragmentation import plan_of

        lengths = _dataset_lengths(profile.dataset, profile.text_column, profile.model,
                                   profile.trust_remote_code)
        plan = plan_of(profile, lengths)
    except (BadInput, OSError, ValueError):
        return 0.0
    if not plan:
        return 0.0
    real = sum(min(lengths[i], profile.seq) for idx, _t in plan for i in idx)
    step = fixed_step_s if fixed_step_s is not None else mean_step_s
    return real / (len(plan) * step) if step else 0.0


def _gpu_notes(profile: Profile) -> list[str]:
    import os

    if profile.target != "cuda" or profile.gpu or not os.environ.get("HEADROOM_DEVICE", "").strip():
        return []
    from engine import gpus

    return [f"HEADROOM_DEVICE is deprecated: use --gpu {gpus.key_for('')} (the profile's gpu field)"]


def _sharding_extra(profile: Profile) -> dict:
    """``extra["sharding"]`` of a data-parallel profile: what one rank holds."""
    if profile.shard == "none" or profile.mode != "train":
        return {}
    from engine.estimate import sharding

    return {"sharding": sharding.summary(sharding.rank_model(profile), profile)}


def _estimate_at(profile, method, shapes, notes, started, progress, should_stop,
                 plan_order: bool = False, quick: bool = False) -> EstimateResult:
    """``plan_order``: the shapes come from a plan of several shapes; reserved accounts for its
    order (``fragmentation.py``)."""
    from engine.estimate.analytic import arch_of

    # the analytic reserved replay (5-15 ms) only where the analytic outcome is the answer: not
    # for a traced estimate, nor a quick one (a technique's extra layers, a teacher's, turn the
    # replay off themselves: analytic.estimate_shape)
    traced_next = method == "traced" or (method == "auto"
                                         and arch_of(profile).layers <= TRACED_MAX_LAYERS)
    a_out, shape, padded = _analytic(profile, shapes, should_stop,
                                     replay=not quick and not traced_next)
    if method == "auto":
        layers = arch_of(profile).layers + a_out.extra_layers  # a teacher's blocks are traced too
        method = "traced" if layers <= TRACED_MAX_LAYERS else "analytic"
    from engine.estimate.notes import no_effect_notes

    notes = list(notes) + list(a_out.notes) + no_effect_notes(profile, [s for s, _ in shapes])
    notes += _gpu_notes(profile)
    from engine.estimate import device

    workspace = device.workspace_bytes(profile.target, profile.mode == "train",
                                       device.kind_of(profile))
    if method == "analytic":
        if plan_order and profile.target == "cuda":
            from engine.estimate import fragmentation

            n_distinct = len(set(fragmentation.plan_sequence(profile)))
            if n_distinct > 1:
                notes.append(fragmentation.analytic_note(profile, n_distinct))
        peak = a_out.peak_allocated
        speed_fields, speed_extra, speed_note = _speed(profile, tuple(shape), None, plan_order)
        if speed_note:
            notes.append(speed_note)
        result = EstimateResult(
            method="analytic", peak_allocated_bytes=peak,
            peak_reserved_bytes=a_out.peak_reserved,
            device_used_bytes=_device_used(a_out.peak_reserved, profile),
            breakdown=a_out.breakdown, params=a_out.params,
            layers=_layers(a_out.layer_activations, profile, a_out.breakdown.get("weights", 0),
                           a_out.extra_rows),
            peak_batch_shape=tuple(shape),
            peak_phase=a_out.peak_phase, notes=tuple(notes),
            elapsed_s=time.perf_counter() - started,
            extra={"padded": padded, "candidates": [list(s) for s, _ in shapes],
                   **({"speed": speed_extra} if speed_extra else {}), **_sharding_extra(profile)},
            tokenizer=tokenizer_info(profile), **speed_fields,
            trainable_params=a_out.trainable_params,
            optimizer_state_bytes=a_out.optimizer_state_bytes)
        _progress(progress, 1.0, "done")
        return result

    from engine.estimate import traced
    from engine.estimate.analytic import LOGITS_ROW

    _progress(progress, 0.3, f"tracing one step at {shape[0]}x{shape[1]}")
    outcome = traced.trace_step(profile, shape, has_padding=padded, should_stop=should_stop,
                                count_speed=profile.target == "cuda")
    _check_stop(should_stop)
    _progress(progress, 0.9, "allocator model")
    events = _device_events(profile, outcome, workspace)
    # CPU: no caching allocator to model (measure reports RSS growth there); reserved = allocated.
    reserved = _traced_reserved(profile, events) if profile.target == "cuda" else 0
    frag = {}
    if plan_order and profile.target == "cuda":
        from engine.estimate import fragmentation

        _progress(progress, 0.92, "allocator over the plan's shapes")
        seq_events, frag = fragmentation.sequence_events(profile, (tuple(shape), padded), events,
                                                         should_stop)
        if seq_events is not None:
            frag["single_step_reserved_bytes"] = reserved
            reserved = max(reserved, _traced_reserved(profile, seq_events))
            notes.append(fragmentation.traced_note(frag, reserved, profile))
    breakdown = dict(outcome.breakdown)
    peak_allocated, peak_phase = outcome.peak_allocated, outcome.peak_phase
    if outcome.phase_points:  # one data-parallel rank (engine.estimate.sharding)
        from engine.estimate import sharding

        peak_allocated, breakdown, peak_phase = sharding.rank_peak(profile, outcome.phase_points)
        reserved = max(reserved, peak_allocated) if profile.target == "cuda" else 0
    tmp = MemoryCategory.TEMPORARIES.value
    breakdown[tmp] = breakdown.get(tmp, 0) + workspace
    peak = peak_allocated + workspace
    reserved = max(reserved, peak)
    if outcome.backends:
        where = "CUDA" if profile.target == "cuda" else "CPU"  # the emulation logs the target's choice
        notes.append(f"SDPA kernel on {where}: " + ", ".join(outcome.backends))
    speed_fields, speed_extra, speed_note = _speed(profile, tuple(shape), outcome.costs, plan_order)
    if speed_note:
        notes.append(speed_note)
    result = EstimateResult(
        method="traced", peak_allocated_bytes=int(peak), peak_reserved_bytes=int(reserved),
        device_used_bytes=_device_used(int(reserved), profile), breakdown=breakdown,
        params=outcome.params,
        layers=_layers({**outcome.layer_activations, LOGITS_ROW: a_out.layer_activations.get(LOGITS_ROW, 0)},
                       profile, breakdown.get("weights", 0), a_out.extra_rows),
        peak_batch_shape=tuple(shape), peak_phase=peak_phase, notes=tuple(notes),
        elapsed_s=time.perf_counter() - started,
        extra={"padded": padded, "peak_step": outcome.peak_step, **_sharding_extra(profile),
               "analytic_peak_allocated_bytes": a_out.peak_allocated,
               "sdpa_backends": list(outcome.backends),
               "candidates": [list(s) for s, _ in shapes], **frag,
               **({"speed": speed_extra} if speed_extra else {})},
        tokenizer=tokenizer_info(profile), **speed_fields,
        trainable_params=outcome.trainable_params,
        optimizer_state_bytes=outcome.optimizer_state_bytes)
    _progress(progress, 1.0, "done")
    return result


__all__ = ["METHODS", "batch_candidates", "estimate", "estimate_shape"]
