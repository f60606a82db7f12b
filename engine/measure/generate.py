"""A measured generation run (``--mode generate``): prefill, then greedy decode over the model's own
KV cache (``engine.measure.decode``), on CUDA or CPU, in the same child process, with the same
progress, cancel and out-of-memory-as-a-result as the training runs (``engine.measure.runner``).

Protocol: the runner's clean start (allocator settings, context, empty cache, reset peaks,
baseline before the model); the model built on the device with the profile's techniques and
``use_cache`` on; the B prompts (``prompt_tensors``); ``profile.steps`` generations, each with a
new cache (the first is the warm-up: its memory counts, its timings do not, unless it is the only
one). Each generation reads the probe at the first new token (the prefill's peak, time to first
token) and at the end (the decode's peak); the timeline holds allocated/reserved and the cache's
bytes after every new token of the first (warm-up) generation. CPU: allocated is the live-bytes tracker's
exact sum of tensor storages (``memory_cap_bytes`` simulates a capacity), reserved the RSS growth.

The cache's bytes are the sum of its tensors' ``nbytes`` at the end (``kv_cache_bytes``); the
breakdown's ``kv_cache`` is the storage behind them (a dynamic sliding layer's tensors are views).
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from typing import Any

import torch

from engine.errors import BadInput, Cancelled
from engine.measure import decode, probes, runner
from engine.results import GENERATE_CATEGORIES, MemoryCategory, MeasureResult, TimelinePoint
from engine.units import format_bytes

C = MemoryCategory


def prompt_tensors(profile, config, should_stop, notes: list[str]):
    """(input_ids, attention_mask, real tokens): the B prompts on CPU (``make_prompts``); token ids
    at or above the model's vocabulary are taken modulo its size."""
    from engine.measure.inputs import token_lists

    tokens, pad_id, _ = token_lists(profile, should_stop, lambda f, m: None)
    tokens = [t for t in tokens if t]
    if not tokens:
        raise BadInput(f"dataset {profile.dataset!r} has no texts to prompt with")
    ids, mask = make_prompts(tokens, pad_id, profile.batch, profile.prompt_len, profile.seq)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab and int(ids.max()) >= vocab:
        ids = ids % vocab
        notes.append(f"the tokenizer's ids exceed the model's vocabulary of {vocab}; "
                     f"ids were taken modulo {vocab}")
    return ids, mask, int(mask.sum())


def make_prompts(token_lists, pad_token_id, batch, prompt_len, seq):
    """(input_ids, attention_mask), (B, P): ``prompt_len`` > 0: rows of exactly that many tokens
    cut from the texts' token stream (cycled); 0: the first ``batch`` texts (cycled) cut at ``seq``,
    left-padded to the longest (decoders generate after the last real token). Torch only: the
    exported script embeds it."""
    token_lists = [ids for ids in token_lists if len(ids)]
    if prompt_len:
        stream = []
        i = 0
        while len(stream) < batch * prompt_len:
            stream.extend(token_lists[i % len(token_lists)])
            i += 1
        input_ids = torch.tensor(stream[:batch * prompt_len], dtype=torch.long).view(batch, prompt_len)
        return input_ids, torch.ones_like(input_ids)
    rows = [list(token_lists[i % len(token_lists)][:seq]) for i in range(batch)]
    longest = max(len(r) for r in rows)
    input_ids = torch.tensor([[pad_token_id] * (longest - len(r)) + r for r in rows], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return input_ids, attention_mask


class _Generation:
    """One generation's reads: the probe at the first token and at the end, the timeline."""

    def __init__(self, probe, check_stop, report, cache_ref, record: bool, new_tokens: int):
        self.probe, self.check_stop, self.report = probe, check_stop, report
        self.cache_ref, self.record, self.new_tokens = cache_ref, record, new_tokens
        self.prefill = (0, 0)  # (peak allocated, peak reserved)
        self.decode = (0, 0)
        self.prefill_cache = 0  # storage bytes after the prefill
        self.started = self.first = self.ended = 0.0
        self.step = -1  # tokens chosen so far - 1
        self.timeline: list[TimelinePoint] = []
        self.growth: list[int] = []

    def phase(self) -> str:
        return "prefill" if self.step < 0 else "decode"

    def on_token(self, i: int) -> None:
        self.step = i
        if i == 0:
            self.probe.sync()
            self.first = time.perf_counter()
            end = self.probe.phase_end()
            self.prefill = (end.peak, end.peak_reserved)
            self.prefill_cache = decode.cache_storage_bytes(self.cache_ref())
        if self.record:
            self.growth.append(decode.cache_storage_bytes(self.cache_ref()))
            self.timeline.append(TimelinePoint(step=i, phase="prefill" if i == 0 else "decode",
                                               allocated_bytes=int(self.probe.allocated()),
                                               reserved_bytes=int(self.probe.reserved())))
        if i % 8 == 0 or i + 1 == self.new_tokens:
            self.report((i + 1) / self.new_tokens, f"token {i + 1}/{self.new_tokens}")
        self.check_stop()


def run_generate(profile, progress=None, should_stop=None, snapshot=None) -> MeasureResult:
    """Measure the profile's generation (see the module docstring); an OOM is a result."""
    from engine.models import build_model, count_parameters

    started = time.perf_counter()
    notes: list[str] = []
    runner.configure_process(profile, notes)
    report, check_stop = runner._callbacks(progress, should_stop)

    config, _task = runner._checked(profile, snapshot, notes)
    report(0.0, "loading prompts")
    ids_cpu, mask_cpu, real = prompt_tensors(profile, config, should_stop, notes)
    b, p = ids_cpu.shape
    n = profile.new_tokens
    check_stop()
    gc.collect()
    dev, probe, tracker, rss, device_name = runner._clean_device(profile, snapshot, notes)
    runs = max(1, profile.steps)
    gens: list[_Generation] = []
    held = storage = 0
    weights = 0
    params = 0
    precision = profile.precision
    oom: tuple[int, str, str] | None = None
    current: _Generation | None = None
    state: dict[str, Any] = {"cache": None}
    try:
        with rss if rss is not None else contextlib.nullcontext():
            report(0.05, f"building {profile.model} on {dev.type}")
            torch.manual_seed(profile.seed)
            model = build_model(profile, str(dev))
            model.eval()
            model.config.use_cache = True
            params = count_parameters(model)
            tensors = list(model.parameters()) + list(model.buffers())
            weights = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                           for t in tensors}.values())
            if tracker is not None:
                for t in tensors:
                    tracker.track(t)
                tracker.reset_peak()
            amp = {"bf16-amp": torch.bfloat16, "fp16-amp": torch.float16}.get(profile.precision)
            if amp is not None and dev.type == "cpu":
                from engine.measure import loop
                from engine.measure.inputs import StepData

                amp = loop.check_cpu_autocast(model, StepData(ids_cpu, mask_cpu, None, real,
                                                              ids_cpu.numel()), amp, notes, False)
                if amp is None:
                    precision = "fp32"
            gc.collect()
            probe.sync()
            probe.take_phase_peaks()
            with tracker if tracker is not None else contextlib.nullcontext():
                for r in range(runs):
                    current = _Generation(probe, check_stop, lambda f, m, r=r: report(
                        0.1 + 0.9 * (r + f) / runs, f"generation {r + 1}/{runs}: {m}"),
                        lambda: state["cache"], r == 0, n)  # the warm-up records the timeline
                    ids, mask = ids_cpu.to(dev, copy=True), mask_cpu.to(dev, copy=True)
                    current.started = time.perf_counter()
                    state["cache"] = decode.make_cache(model, profile.cache, p + n)
                    ctx = torch.autocast(dev.type, dtype=amp) if amp is not None \
                        else contextlib.nullcontext()
                    with ctx:
                        out = decode.greedy_generate(model, ids, mask, state["cache"], n,
                                                     current.on_token)
                    probe.sync()
                    current.ended = time.perf_counter()
                    end = probe.phase_end()
                    current.decode = (end.peak, end.peak_reserved) if n > 1 else (0, 0)
                    held = decode.cache_bytes(state["cache"])
                    storage = decode.cache_storage_bytes(state["cache"])
                    del out, ids, mask
                    state["cache"] = None
                    gens.append(current)
                    current = None
            report(1.0, "done")
    except Cancelled:
        raise
    except BaseException as exc:  # noqa: BLE001 - sorted as the training runner does
        if isinstance(exc, (KeyboardInterrupt, SystemExit, BadInput)):
            raise
        if not (runner._is_oom(exc) or (tracker is not None and tracker.oom_raised)):
            # AssertionError: a kernel's shape check (bitsandbytes' CPU 4-bit matmul at one token)
            if isinstance(exc, (RuntimeError, NotImplementedError, TypeError, ValueError,
                                AssertionError)):
                phase = current.phase() if current is not None else "model"
                raise BadInput(f"the generation failed ({phase}) on {dev.type} with "
                               f"{precision}: {runner.loop.first_line(exc)}") from None
            raise
        from engine.measure import loop

        step = current.step + 1 if current is not None else 0
        phase = current.phase() if current is not None else "model"
        oom = (step, phase, loop.first_line(exc))
        if current is not None:
            end = probe.phase_end()
            if phase == "prefill":
                current.prefill = (end.peak, end.peak_reserved)
            else:
                current.decode = (end.peak, end.peak_reserved)
            current.ended = time.perf_counter()
            gens.append(current)
        del exc
        state["cache"] = None
        gc.collect()
    device_used = probe.used()
    return _result(profile, gens, oom, notes, dev=dev.type, device_name=device_name,
                   device_used=device_used, params=params, weights=weights, held=held,
                   storage=storage, shape=(b, p), real=real, precision=precision,
                   baseline=probe.baseline, rss=rss, started=started)


def _result(profile, gens, oom, notes, *, dev, device_name, device_used, params, weights, held,
            storage, shape, real, precision, baseline, rss, started) -> MeasureResult:
    b, p = shape
    n = profile.new_tokens
    prefill = max((g.prefill[0] for g in gens), default=0)
    decode_peak = max((g.decode[0] for g in gens), default=0)
    reserved = max([g.prefill[1] for g in gens] + [g.decode[1] for g in gens] + [0])
    timed = [g for g in gens if g.first and g.ended][1:] or [g for g in gens if g.first and g.ended]
    ttft = statistics.median(g.first - g.started for g in timed) if timed else 0.0
    decode_s = statistics.median(g.ended - g.first for g in timed) if timed else 0.0
    prefill_tps = b * p / ttft if ttft > 0 else 0.0
    decode_tps = b * (n - 1) / decode_s if decode_s > 0 and n > 1 else 0.0
    last = gens[-1] if gens else None
    recorded = gens[0] if gens else None  # the warm-up: its per-token reads stay out of the timings
    phase = "decode" if decode_peak >= prefill else "prefill"
    peak = max(prefill, decode_peak)
    cache_at_peak = storage if phase == "decode" else (last.prefill_cache if last else 0)
    breakdown = {c.value: 0 for c in GENERATE_CATEGORIES}
    left = peak
    for cat, amount in ((C.WEIGHTS, weights), (C.KV_CACHE, cache_at_peak)):
        take = max(0, min(amount, left))
        breakdown[cat.value] = take
        left -= take
    breakdown[C.TEMPORARIES.value] = max(0, left)
    if len(timed) == 1 and len(gens) == 1 and oom is None:
        notes.append("one generation only: timings include the warm-up")
    if dev == "cuda":
        notes.append("CUDA: peaks = max_memory_allocated() in prefill and in decode minus the "
                     "baseline")
    else:
        notes.append("CPU: peak = tracked live tensor bytes; reserved = RSS growth; timings "
                     "include the tracker's per-op overhead")
        if profile.memory_cap_bytes:
            notes.append(f"simulated capacity {format_bytes(profile.memory_cap_bytes)} of live tensors")
    extra: dict[str, Any] = {
        "task": "causal-lm", "precision": precision, "baseline_bytes": baseline,
        "weights_bytes": weights, "prompt_shape": [b, p], "new_tokens": n, "cache": profile.cache,
        "prefill_peak_allocated_bytes": int(prefill),
        "prefill_peak_reserved_bytes": int(max((g.prefill[1] for g in gens), default=0)),
        "decode_peak_allocated_bytes": int(decode_peak),
        "decode_peak_reserved_bytes": int(max((g.decode[1] for g in gens), default=0)),
        "kv_cache_storage_bytes": int(storage),
        "decode_tokens_per_s_per_sequence": decode_tps / b if b else 0.0,
        "generations": len(gens), "peak_phase": phase,
        "cache_growth_bytes": list(recorded.growth) if recorded else [],
    }
    if precision != profile.precision:
        extra["precision_ran"] = precision
    runner._rss_and_oom(extra, notes, rss, oom, "token")
    step_time = decode_s / (n - 1) if decode_s and n > 1 else ttft
    completed = [g for g in gens if g.ended and g.step + 1 == n]
    return MeasureResult(
        device=dev, device_name=device_name, peak_allocated_bytes=int(peak),
        peak_reserved_bytes=int(reserved), device_used_bytes=int(device_used),
        breakdown=breakdown, step_time_s=float(step_time), tokens_per_s=float(decode_tps),
        useful_tokens_per_s=float(decode_tps), real_tokens=int(real + b * n),
        padded_tokens=int(b * (p + n)), steps=len(completed), params=int(params),
        oom=oom is not None, oom_step=oom[0] if oom else -1, oom_phase=oom[1] if oom else "",
        timeline=tuple(recorded.timeline) if recorded else (), first_step_s=float(
            gens[0].ended - gens[0].started) if gens and gens[0].ended else 0.0,
        distinct_shapes=1, notes=tuple(notes), elapsed_s=time.perf_counter() - started,
        kv_cache_bytes=int(held), prefill_tokens_per_s=float(prefill_tps),
        decode_tokens_per_s=float(decode_tps), time_to_first_token_s=float(ttft), extra=extra)


__all__ = ["make_prompts", "prompt_tensors", "run_generate"]
