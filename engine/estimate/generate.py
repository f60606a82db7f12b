"""Estimates of a generation run (``--mode generate``): prefill, then greedy decode over a KV cache.

What is counted (bytes; the measured run is ``engine.measure.generate``, the loop
``engine.measure.decode.greedy_generate``):

* **the KV cache**, exact per layer from the cache classes transformers builds for the config
  (``DynamicCache(config=...)`` / ``StaticCache``: full layers, sliding-window layers with their
  window): 2 x B x kv_heads x head_dim x cached tokens x the compute dtype's bytes. A dynamic full
  layer holds P + N - 1 tokens at the end (the last token is never fed back); a dynamic sliding
  layer keeps its last ``window - 1`` tokens as a view of a ``window``-token tensor (the storage);
  a static cache is allocated at its full length P + N in the prefill (a sliding layer at
  ``min(window, P + N)``).
* **prefill**: weights, the prompt tensors, the cache written so far, one block's live tensors at
  (B, P) (the inference estimate's block model, ``analytic.layer_cost``) or, at the head, the final
  hidden states and the last position's logits only (``logits_to_keep=1``) with their fp32 copy.
* **decode**: weights, the cache at its final size, the growing sequences and mask, the concat of
  a dynamic layer (the new tensor beside the old one), one block's temporaries at one token
  (grouped-query keys/values repeated over the cache where the attention path repeats them) and
  the logits.
* **reserved** (CUDA): the caching allocator model (``allocator.simulate``) replaying the cache's
  growth step by step (each dynamic step reallocates every layer's keys and values, so freed
  blocks are too small for the next step: reserved grows beyond allocated); CPU: reserved =
  allocated, as for the other modes.

The traced estimator runs the same loop (``greedy_generate``) on meta tensors under the live-bytes
tracker, every decode step included, and replays its allocation log through the allocator model.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

from engine.errors import BadInput, Cancelled
from engine.profile import Profile
from engine.results import GENERATE_CATEGORIES, EstimateResult, MemoryCategory

C = MemoryCategory
_LABELS = tuple(c.value for c in GENERATE_CATEGORIES)


# ----- the prompt ---------------------------------------------------------------------------------
def prompt_lengths(profile: Profile) -> list[int]:
    """Prompt tokens of each of the B sequences: prompt_len, or the dataset's first B texts (cycled,
    empty ones skipped) cut at seq; ``engine.measure.generate.prompt_tensors`` builds the same."""
    if profile.prompt_len:
        return [profile.prompt_len] * profile.batch
    from engine.estimate import _dataset_lengths

    lengths = [n for n in _dataset_lengths(profile.dataset, profile.text_column, profile.model,
                                           profile.trust_remote_code) if n > 0]
    if not lengths:
        raise BadInput(f"dataset {profile.dataset!r} has no texts to prompt with")
    return [min(lengths[i % len(lengths)], profile.seq) for i in range(profile.batch)]


def prompt_shape(profile: Profile) -> tuple[int, int, bool]:
    """(B, P, left-padded): P is the longest prompt."""
    lengths = prompt_lengths(profile)
    return len(lengths), max(lengths), min(lengths) < max(lengths)


# ----- the cache ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheLayer:
    kind: str  # full | sliding | none (a layer that stores nothing)
    window: int  # sliding window (0 for full layers)


@functools.lru_cache(maxsize=32)
def _cache_kinds(model: str, trust: bool, n_layers: int) -> tuple[CacheLayer, ...]:
    from transformers import DynamicCache

    from engine.models import load_config

    config = load_config(model, trust)
    cache = DynamicCache(config=config)
    out = []
    for layer in getattr(cache, "layers", ())[:n_layers]:
        name = type(layer).__name__
        if name == "DummyLayer" or not hasattr(layer, "update"):
            out.append(CacheLayer("none", 0))
        elif getattr(layer, "is_sliding", False):
            out.append(CacheLayer("sliding", int(layer.sliding_window)))
        else:
            out.append(CacheLayer("full", 0))
    # no layer types in the config: transformers replicates full layers lazily
    out += [CacheLayer("full", 0)] * (n_layers - len(out))
    return tuple(out)


def cache_kinds(profile: Profile) -> tuple[CacheLayer, ...]:
    """Each block's cache layer, as transformers builds it for the model's config."""
    from engine.estimate.analytic import arch_of

    return _cache_kinds(profile.model, profile.trust_remote_code, arch_of(profile).layers)


def compute_bytes(profile: Profile) -> int:
    """Bytes of the compute dtype (the cache's): fp32, else the half type (autocast or pure)."""
    return 4 if profile.precision == "fp32" else 2


def token_bytes(profile: Profile, batch: int) -> int:
    """Keys + values bytes of one cached token of one layer over the batch."""
    from engine.estimate.analytic import arch_of

    arch = arch_of(profile)
    return 2 * batch * arch.kv_heads * arch.head_dim * compute_bytes(profile)


def layer_tokens(layer: CacheLayer, cache: str, p: int, n: int, fed: int) -> tuple[int, int]:
    """(tokens the layer's tensors hold, tokens of their storage) after ``fed`` tokens went
    through the model (the prompt's p, then one per decode step); ``n`` new tokens in all."""
    if layer.kind == "none":
        return 0, 0
    w = layer.window
    if cache == "static":
        m = p + n if layer.kind == "full" else min(w, p + n)
        return m, m
    if layer.kind == "full":
        return fed, fed
    held = min(fed, w - 1)
    if fed == p:  # after the prefill: a view of the whole prompt's keys
        return held, p
    return held, min(fed, w)  # the concat of the previous w - 1 tokens and the new one


def cache_totals(profile: Profile, b: int, p: int, fed: int) -> tuple[int, int, list[int]]:
    """(bytes held, storage bytes, storage bytes per layer) after ``fed`` tokens."""
    per = token_bytes(profile, b)
    held = storage = 0
    layers = []
    for layer in cache_kinds(profile):
        h, s = layer_tokens(layer, profile.cache, p, profile.new_tokens, fed)
        held += h * per
        storage += s * per
        layers.append(s * per)
    return held, storage, layers


def kv_cache_bytes(profile: Profile) -> int:
    """The cache tensors' bytes at the end of the run (sum of nbytes), as measure reports them."""
    b, p, _ = prompt_shape(profile)
    return cache_totals(profile, b, p, p + profile.new_tokens - 1)[0]


# ----- analytic ---------------------------------------------------------------------------------
def _r(n: int, cuda: bool) -> int:
    from engine.estimate.allocator import round_size

    n = int(n)
    return round_size(n) if (cuda and n > 0) else n


def _analytic(profile: Profile) -> dict:
    from engine.estimate import analytic, device
    from engine.estimate.allocator import simulate

    cuda = profile.target == "cuda"
    arch = analytic.arch_of(profile)
    b, p, padded = prompt_shape(profile)
    n = profile.new_tokens
    e = compute_bytes(profile)
    r = 2 if profile.precision in ("bf16", "fp16") else 4  # residual stream
    h, v = arch.hidden, arch.vocab
    weights_list = [_r(k * s, cuda) for k, s in arch.param_tensors]
    weights = sum(weights_list) + _r(arch.buffer_bytes, cuda)
    workspace = device.workspace_bytes(profile.target, False)
    prompt = 3 * _r(b * p * 8, cuda)  # ids and mask copied to the device, position ids
    attn = "eager" if profile.attn == "eager" else "sdpa"
    kinds = cache_kinds(profile)
    masked = padded or attn == "eager" or any(k.kind == "sliding" for k in kinds)
    live_layer = _prefill_block(arch, b, p, e, r, cuda, attn, masked, max(1, profile.ffn_chunks))
    logits = _r(b * v * e, cuda) + _r(b * v * 4, cuda)  # last position's logits, fp32 copy
    head = _r(b * p * h * r, cuda) + _r(b * p * h * 4, cuda) + logits  # final norm (fp32), logits
    _, prefill_cache, _ = cache_totals(profile, b, p, p)
    if profile.cache == "static":
        prefill_cache = cache_totals(profile, b, p, p)[1]
    prefill_tmp = prompt + workspace + max(live_layer, head)
    prefill = weights + prefill_cache + prefill_tmp
    # decode, at its last step (the cache at its largest)
    fed = p + n - 1
    held, final_storage, per_layer = cache_totals(profile, b, p, fed)
    kv_heads, a, d = arch.kv_heads, arch.heads, arch.head_dim
    grow = 2 * _r(b * (p + n) * 8, cuda)  # sequences and mask, grown each step
    concat = max(per_layer, default=0) // 2 if profile.cache == "dynamic" else 0
    # grouped-query heads with a mask (padding, sliding layers, eager): keys and values repeated
    # over the cache and the math path's scaled copies (SDPA cannot take enable_gqa with a mask)
    repeat = 4 * b * a * (fed + 1) * d * e if kv_heads != a and masked else 0
    scores = b * a * (fed + 1) * 4 * 2
    step_layer = _r(repeat, cuda) + _r(scores, cuda) + 6 * _r(b * max(h, arch.ffn) * 4, cuda)
    decode_tmp = prompt + grow + workspace + concat + max(step_layer, logits + _r(b * h * 4, cuda))
    decode = weights + final_storage + decode_tmp if n > 1 else 0
    phase = "decode" if decode >= prefill else "prefill"
    if phase == "decode":
        breakdown = {C.WEIGHTS.value: weights, C.KV_CACHE.value: final_storage,
                     C.ACTIVATIONS.value: 0, C.TEMPORARIES.value: decode_tmp}
    else:
        breakdown = {C.WEIGHTS.value: weights, C.KV_CACHE.value: prefill_cache,
                     C.ACTIVATIONS.value: 0, C.TEMPORARIES.value: prefill_tmp}
    peak = max(prefill, decode)
    reserved = peak
    if cuda:
        reserved = max(peak, simulate(_growth_events(profile, b, p, weights_list, prefill_tmp,
                                                     decode_tmp - concat)).peak_reserved)
    return {"peak": peak, "reserved": reserved, "phase": phase, "breakdown": breakdown,
            "prefill": prefill, "decode": decode, "kv_cache_bytes": held,
            "kv_cache_storage_bytes": final_storage, "shape": (b, p), "padded": padded,
            "params": arch.params}


def _prefill_block(arch, b: int, p: int, e: int, r: int, cuda: bool, attn: str, masked: bool,
                   ffn_chunks: int) -> int:
    """Bytes alive inside one block's prefill forward under no_grad, beyond the residual stream's
    input: the larger of the MLP (its input and normed copies, and the intermediates alive at
    once: gate/up/act/product of a gated MLP, three; gelu_new's chain, five and a half) and the
    attention (q, k, v before and after RoPE, a materialised mask, eager's probabilities).
    The counts are those the traced estimate sees at its peak (Llama-3.2-1B, Qwen2.5-0.5B,
    gemma-3-270m-like, GPT-2 at B x P up to 32 x 2048: within ~5% of the traced prefill, against
    ~2x for the training-step block model)."""
    E = b * p
    h, f = arch.hidden, arch.ffn
    hq, hk = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    per_f = 3.0 if arch.gated or arch.act != "gelu_new" else 5.5
    rows = -(-E // ffn_chunks)
    mlp = 5 * _r(E * h * r, cuda) + int(per_f * _r(rows * f * e, cuda))
    mask = _r(b * p * p * (e if attn == "eager" else 1), cuda) if masked else 0
    att = 5 * _r(E * h * r, cuda) + 2 * _r(E * (hq + 2 * hk) * e, cuda) + mask
    if attn == "eager":
        att += 2 * _r(b * arch.heads * p * p * 4, cuda)
    return max(mlp, att)


def _growth_events(profile: Profile, b: int, p: int, weights: list[int], prefill_tmp: int,
                   step_tmp: int, pieces: int = 4) -> list[tuple[int, int]]:
    """An allocation log of the run for the allocator model: the weights; the prefill block by
    block (each layer's keys and values, then its temporaries in ``pieces`` pieces, freed: the
    next layer's cache is carved from their holes, as in the run; 0: the prefill's temporaries as
    one block around the whole cache); then every decode step's cache reallocations (dynamic)
    and temporaries."""
    events: list[tuple[int, int]] = []
    uid = iter(range(1 << 62))
    for w in weights:
        events.append((next(uid), w))
    per = token_bytes(profile, b) // 2  # one of keys / values
    kinds = cache_kinds(profile)
    n = profile.new_tokens
    live: list[list[tuple[int, int]]] = []
    piece = _r(prefill_tmp // max(1, pieces), True)
    whole = next(uid)
    if not pieces:
        events.append((whole, prefill_tmp))
    for layer in kinds:
        _, tokens = layer_tokens(layer, profile.cache, p, n, p)
        pair = []
        for _ in range(2):
            k = next(uid)
            events.append((k, _r(tokens * per, True)))
            pair.append((k, _r(tokens * per, True)))
        live.append(pair)
        ids = [next(uid) for _ in range(pieces)]
        events += [(t, piece) for t in ids] + [(t, -piece) for t in ids]
    if not pieces:
        events.append((whole, -prefill_tmp))
    if profile.cache == "static":
        if n > 1:
            events += [(tmp := next(uid), step_tmp), (tmp, -step_tmp)]
        return events
    # dynamic: each step concatenates every layer's keys and values into new tensors
    step = max(1, (n - 1) // 512)  # long runs: every k-th step (the growth pattern is the same)
    for fed in list(range(p + 1, p + n, step)) + ([p + n - 1] if n > 1 else []):
        tmp = next(uid)
        events.append((tmp, step_tmp))
        for i, layer in enumerate(kinds):
            _, tokens = layer_tokens(layer, "dynamic", p, n, fed)
            size = _r(tokens * per, True)
            for j in range(2):
                old_id, old_size = live[i][j]
                if old_size == size:
                    continue
                k = next(uid)
                events.append((k, size))
                events.append((old_id, -old_size))
                live[i][j] = (k, size)
        events.append((tmp, -step_tmp))
    return events


# ----- traced -------------------------------------------------------------------------------------
def trace_generate(profile: Profile, should_stop=None, model=None, fake: bool = True) -> dict:
    """The measured loop on meta tensors (or, ``fake=False`` with a real CPU ``model``, on real
    tensors: for validation), every decode step, under the live-bytes tracker."""
    import contextlib

    import torch

    from engine.estimate.traced import _meta_model, _Scalars, autocast_context
    from engine.measure import decode
    from engine.measure.inputs import to_device
    from engine.measure.probes import LiveBytesTracker

    cuda = profile.target == "cuda"
    b, p, padded = prompt_shape(profile)
    n = profile.new_tokens
    device = "meta" if fake else "cpu"
    if model is None:
        model = _meta_model(profile)
    model.eval()
    model.config.use_cache = True
    amp = {"bf16-amp": torch.bfloat16, "fp16-amp": torch.float16}.get(profile.precision)
    emu = None
    if fake:
        from engine.estimate.cuda_emulation import CudaEmulation

        emu = CudaEmulation(autocast_dtype=amp, target=profile.target)
    tracker = LiveBytesTracker(block_bytes=512 if cuda else 0, labels=_LABELS,
                               scalar=_Scalars(padded))
    for t in list(model.parameters()) + list(model.buffers()):
        tracker.track(t, C.WEIGHTS.value)
    ids_cpu = torch.zeros((b, p), dtype=torch.long)
    mask_cpu = torch.ones((b, p), dtype=torch.long)
    if padded:
        mask_cpu[0, 0] = 0
    phases: dict[str, tuple[int, int]] = {}
    state = {"cache": None}

    def classify_cache():
        for pair in decode.cache_layers(state["cache"]):
            for t in pair:
                tracker.classify(t, C.KV_CACHE.value)

    def on_token(i: int) -> None:
        if should_stop is not None and should_stop():
            raise Cancelled("estimate cancelled")
        classify_cache()
        if i == 0:
            phases["prefill"] = (tracker.peak_bytes, tracker.peak_event)
            tracker.reset_peak()
            tracker.mark("decode")

    def autocast_ctx():
        return autocast_context(amp, emu)

    jump = n > TRACED_FULL_STEPS
    with contextlib.ExitStack() as stack:
        if emu is not None and cuda:
            from engine.estimate.cuda_emulation import cuda_local_attention

            stack.enter_context(cuda_local_attention(model))
        for m in (emu, tracker):
            if m is not None:
                stack.enter_context(m)
        tracker.mark("prefill")
        ids, mask = to_device(ids_cpu, device), to_device(mask_cpu, device)
        state["cache"] = decode.make_cache(model, profile.cache, p + n)
        with autocast_ctx():
            out = decode.greedy_generate(model, ids, mask, state["cache"], 2 if jump else n,
                                         on_token)
            if jump:  # the state before the last step, then the last step as the loop runs it
                del out
                out = _last_step(profile, model, state["cache"], b, p, n, device)
                on_token(n - 1)
        classify_cache()
        held = decode.cache_bytes(state["cache"])
        storage = decode.cache_storage_bytes(state["cache"])
        del out, ids, mask
        if n > 1:
            phases["decode"] = (tracker.peak_bytes, tracker.peak_event)
        state["cache"] = None
    prefill_peak, prefill_event = phases["prefill"]
    decode_peak, decode_event = phases.get("decode", (0, -1))
    phase, event = ("decode", decode_event) if decode_peak >= prefill_peak else \
        ("prefill", prefill_event)
    out = {"peak": max(prefill_peak, decode_peak), "phase": phase,
           "breakdown": tracker.breakdown_at(event), "prefill": prefill_peak,
           "decode": decode_peak, "kv_cache_bytes": held, "kv_cache_storage_bytes": storage,
           "events": list(tracker.events), "shape": (b, p), "padded": padded,
           "backends": tuple(sorted(set(emu.backend_log))) if emu is not None else ()}
    tracker.detach()
    return out


#: Decode steps the traced estimate runs one by one; longer runs trace the prefill, the first
#: decode step and the last (the cache at its largest, set to its size there), and model the
#: steps between (the cache's growth) in the allocator replay.
TRACED_FULL_STEPS = 16


def _last_step(profile: Profile, model, cache, b: int, p: int, n: int, device: str):
    """The cache, sequences and mask as they are before the last decode step (P + N - 2 tokens
    fed), then that step (``decode.next_tokens``, as ``greedy_generate`` runs it); returns the
    sequences."""
    import torch

    from engine.measure import decode

    fed = p + n - 2
    for layer, kind in zip(getattr(cache, "layers", ()), cache_kinds(profile)):
        keys = getattr(layer, "keys", None)
        if kind.kind == "none" or not isinstance(keys, torch.Tensor):
            continue
        if profile.cache == "static":  # preallocated: only the positions move
            if isinstance(getattr(layer, "cumulative_length_int", None), int):
                layer.cumulative_length_int = fed
            continue
        held, stored = layer_tokens(kind, "dynamic", p, n, fed)
        for name in ("keys", "values"):
            old = getattr(layer, name)
            shape, dtype = list(old.shape), old.dtype
            setattr(layer, name, None)  # freed first: the run never holds both
            del old
            shape[-2] = stored
            new = torch.empty(shape, dtype=dtype, device=device)
            setattr(layer, name, new[..., -held:, :] if held < stored else new)
            del new
        if isinstance(getattr(layer, "cumulative_length", None), int):
            layer.cumulative_length = fed
    sequences = torch.empty((b, fed + 1), dtype=torch.long, device=device)  # (B, P + N - 1)
    mask = torch.empty((b, fed + 1), dtype=torch.long, device=device)
    chosen = torch.empty((b,), dtype=torch.long, device=device)
    position_ids = torch.empty((b, 1), dtype=torch.long, device=device)
    with torch.no_grad():
        chosen = decode.next_tokens(model, chosen[:, None], mask, position_ids,
                                    decode.forward_kwargs(model, cache))
        return torch.cat([sequences, chosen[:, None]], dim=-1)


# ----- the estimate -------------------------------------------------------------------------------
def estimate_generate(profile: Profile, method: str = "auto", progress=None,
                      should_stop=None) -> EstimateResult:
    """The EstimateResult of a generation profile (``engine.estimate.estimate`` calls it)."""
    from engine.estimate import TRACED_MAX_LAYERS, _device_used, _layers, _traced_reserved, device
    from engine.estimate.analytic import arch_of

    started = time.perf_counter()
    if progress is not None:
        progress(0.1, "generation: analytic estimate")
    a = _analytic(profile)
    if method == "auto":
        method = "traced" if arch_of(profile).layers <= TRACED_MAX_LAYERS else "analytic"
    b, p = a["shape"]
    notes = [f"generation: {b} sequences x ({p} prompt + {profile.new_tokens} new) tokens, "
             f"{profile.cache} cache"]
    kinds = cache_kinds(profile)
    sliding = [k.window for k in kinds if k.kind == "sliding"]
    if sliding:
        notes.append(f"{len(sliding)} of {len(kinds)} layers cache a sliding window of "
                     f"{max(sliding)} tokens")
    extra = {"prompt_shape": [b, p], "padded": a["padded"], "new_tokens": profile.new_tokens,
             "cache": profile.cache, "cache_layers": [k.kind for k in kinds],
             "analytic_peak_allocated_bytes": a["peak"],
             "kv_cache_storage_bytes": a["kv_cache_storage_bytes"]}
    if method == "analytic":
        out, reserved = a, a["reserved"]
    else:
        if progress is not None:
            progress(0.3, f"tracing prefill + {profile.new_tokens - 1} decode steps")
        out = trace_generate(profile, should_stop)
        workspace = device.workspace_bytes(profile.target, False)
        events = out["events"]
        if workspace:
            events = [("__ws0__", workspace)] + events
        out = dict(out)
        out["peak"] += workspace
        out["prefill"] += workspace
        out["decode"] += workspace if out["decode"] else 0
        out["breakdown"] = dict(out["breakdown"])
        out["breakdown"][C.TEMPORARIES.value] += workspace
        reserved = _traced_reserved(profile, events) if profile.target == "cuda" else 0
        reserved = max(reserved, out["peak"])
        if profile.target == "cuda" and profile.cache == "dynamic" \
                and profile.new_tokens > TRACED_FULL_STEPS:
            # the steps between the first and the last were not traced: their reallocations
            # replayed with the traced prefill's and last step's temporaries
            from engine.estimate.allocator import simulate

            w = out["breakdown"].get(C.WEIGHTS.value, 0)
            prefill_cache = cache_totals(profile, b, p, p)[1]
            final_cache = cache_totals(profile, b, p, p + profile.new_tokens - 1)[1]
            arch = arch_of(profile)
            weights_list = [_r(k * s_, True) for k, s_ in arch.param_tensors]
            grown = simulate(_growth_events(profile, b, p, weights_list,
                                            max(0, out["prefill"] - w - prefill_cache),
                                            max(0, out["decode"] - w - final_cache), pieces=0))
            reserved = max(reserved, grown.peak_reserved)
            notes.append(f"traced: prefill, the first and the last of {profile.new_tokens - 1} "
                         f"decode steps; the cache's growth between them replayed in the allocator")
        if out["backends"]:
            notes.append("SDPA kernel: " + ", ".join(out["backends"]))
    extra["cache_growth_bytes"] = [cache_totals(profile, b, p, p + i)[1]
                                   for i in range(profile.new_tokens)]
    extra.update({"prefill_peak_allocated_bytes": int(out["prefill"]),
                  "decode_peak_allocated_bytes": int(out["decode"])})
    weights = out["breakdown"].get(C.WEIGHTS.value, 0)
    speed_fields = _speed(profile, b, p, weights, extra, notes)
    if progress is not None:
        progress(1.0, "done")
    return EstimateResult(
        method=method, peak_allocated_bytes=int(out["peak"]), peak_reserved_bytes=int(reserved),
        device_used_bytes=_device_used(int(reserved), profile),
        breakdown={k: int(v) for k, v in out["breakdown"].items()}, params=a["params"],
        layers=_layers({}, profile, weights), peak_batch_shape=(b, p + profile.new_tokens),
        peak_phase=out["phase"], notes=tuple(notes), elapsed_s=time.perf_counter() - started,
        kv_cache_bytes=int(out["kv_cache_bytes"]), extra=extra, **speed_fields)


def _speed(profile: Profile, b: int, p: int, weights: int, extra: dict, notes: list) -> dict:
    """The speed estimator's view (``engine.estimate.speed``, CUDA targets): the prefill as one
    forward of B x P tokens, each decode step bytes-bound over the weights and the cache at its
    size then (``decode_step_s``), averaged over the steps. Fields for EstimateResult."""
    if profile.target != "cuda":
        return {}
    from engine import gpus
    from engine.estimate import speed
    from engine.estimate.analytic import arch_of

    arch = arch_of(profile)
    gpu = gpus.for_profile(profile)
    n = profile.new_tokens
    prefill = speed.estimate_speed(profile, (b, p), arch=arch)
    fed = sorted({p + (n - 1) * i // 63 for i in range(64)}) if n > 64 else range(p, p + n)
    steps = [speed.decode_step_s(gpu, weights, cache_totals(profile, b, p, f)[1], arch.layers, b)
             for f in fed]
    step_s = sum(steps) / len(steps)
    decode_tps = b / step_s if step_s else 0.0
    extra.update({"estimated_time_to_first_token_s": prefill.step_s if prefill else 0.0,
                  "estimated_prefill_tokens_per_s": prefill.tokens_per_s if prefill else 0.0,
                  "estimated_decode_tokens_per_s": decode_tps,
                  "estimated_decode_step_s": step_s})
    cal = speed.calibration()
    notes.append(f"speed on {gpu.key}: decode {decode_tps:,.0f} tokens/s ({step_s * 1e3:.2f} ms a "
                 f"step: weights + cache read once, or the host issuing its kernels), first token "
                 f"{(prefill.step_s if prefill else 0) * 1e3:.0f} ms; "
                 + (f"expected error ±{cal.median_error:.0%} median" if cal.median_error
                    else "uncalibrated for generation"))
    return {"gpu": gpu.key, "step_s": step_s, "tokens_per_s": decode_tps,
            "speed_error": cal.median_error}


__all__ = ["cache_kinds", "estimate_generate", "kv_cache_bytes", "prompt_shape", "trace_generate"]
