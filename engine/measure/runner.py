"""A measured run: real training or inference steps on CUDA or CPU (DESIGN.md, 'What "measured" means').

Protocol (CUDA)
    ``PYTORCH_CUDA_ALLOC_CONF`` is set before CUDA starts; gc, ``empty_cache``, reset peaks, sync;
    baseline = ``memory_allocated()`` before the model; the model is built on the device
    (``engine.models.build_model``: fp32, or cast to bf16/fp16 for pure-precision profiles, with the
    model-side techniques applied); the optimizer has torch's defaults for the device (AdamW, or SGD
    lr 1e-3 without momentum); ``profile.steps`` steps run, each forward + loss + backward +
    optimizer step + ``zero_grad(set_to_none=True)`` (inference: forward under ``no_grad`` in eval
    mode). Peak = ``max_memory_allocated()`` over the steps minus the baseline; also
    ``max_memory_reserved()`` and the device's used memory (``mem_get_info``, CUDA context
    included, read at the end when the reserved pool is largest). Timings exclude the first step and
    are taken between ``torch.cuda.synchronize()`` calls; ``step_time_s`` is their median.

Protocol (CPU)
    The same loop. "Allocated" is the exact sum of live tensor storage bytes, counted by a
    ``TorchDispatchMode`` (``engine.measure.cpu_tracker``); "reserved" is the growth of the process
    RSS (sampled in a thread and at every phase point) over its value before the model was built;
    ``device_used_bytes`` is the peak RSS. ``memory_cap_bytes`` simulates a device capacity: the op
    that would exceed it raises an out-of-memory error, which becomes an OOM result.

Breakdown at the peak (how it is split, both devices)
    The peak is attributed to the (step, phase) where it happened. Peaks are read per phase
    (the peak counters are reset after each phase and the overall peak is the maximum of the
    phase peaks, which equals ``max_memory_allocated()`` over the steps). Within that phase, the
    sample point with the most allocated bytes is taken: phase start, phase end, and in backward
    every parameter's post-accumulate-grad hook. At that sample, weights (parameter and buffer
    storages, a distillation teacher's included), gradients (``.grad`` storages accumulated so far)
    and optimizer states (state tensors) are exact; ``activations`` is the rest of what was
    allocated at the sample (training: the autograd graph's saved tensors and the loss: the
    model's outputs are dropped before backward, as a plain loop does; inference: the outputs and
    whatever else is live after the forward); ``temporaries`` is the peak minus the sample
    (transient buffers between sample points: logits gradients, attention workspaces, autocast
    copies, foreach optimizer buffers, recomputed activations under checkpointing).

Other choices: ``config.use_cache`` is switched off (a scoring forward, no KV cache is returned);
inputs are copied to the device inside each step (counted, as in a real loop); token ids at or above
the model's vocabulary are taken modulo its size (noted).
"""

from __future__ import annotations

import gc
import importlib
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from engine.errors import BadInput, Cancelled
from engine.units import format_bytes

#: Entries kept by ``--snapshot`` (torch.cuda.memory._record_memory_history).
SNAPSHOT_MAX_ENTRIES = 100_000
#: Fraction of real tokens masked for the masked-LM head (BERT's 15%).
MLM_PROBABILITY = 0.15
#: Progress fractions: data, model build, then the steps.
_DATA_END, _BUILD_END = 0.10, 0.15

Progress = Callable[[float, str], None]


# ----- small helpers ---------------------------------------------------------------------------
def _optional_technique(name: str):
    """``engine.techniques.<name>`` if another part of the engine has provided it, else None."""
    try:
        return importlib.import_module(f"engine.techniques.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"engine.techniques.{name}":
            raise
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


def _oom_types():
    import torch

    types = [getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)]
    return tuple(t for t in types if t is not None)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, _oom_types()):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text.lower() or "can't allocate memory" in text
        or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


# ----- allocator configuration (must precede CUDA initialisation) ------------------------------
def allocator_conf(profile) -> tuple[str | None, Any, str]:
    """(PYTORCH_CUDA_ALLOC_CONF value or None, the memory_pool module or None, a note or "")."""
    pool = _optional_technique("memory_pool")
    alloc = profile.alloc.lower()
    if pool is not None and hasattr(pool, "alloc_conf"):
        return pool.alloc_conf(profile), pool, ""
    if alloc == "expandable" or profile.alloc_max_split_mib:
        parts = ["expandable_segments:True"] if alloc == "expandable" else []
        if profile.alloc_max_split_mib:
            parts.append(f"max_split_size_mb:{profile.alloc_max_split_mib}")
        return ",".join(parts), pool, ""
    if alloc.startswith("pool:"):
        return None, pool, ("the pre-reserved pool (memory_pool technique) is not available in this "
                            "build; ran with the default allocator")
    return None, pool, ""


def configure_allocator(profile, notes: list[str]):
    """Set ``PYTORCH_CUDA_ALLOC_CONF`` for the profile before CUDA starts; return the pool module.

    Refuses (BadInput) when CUDA is already initialised in this process with a different setting:
    allocator settings take effect only in a fresh process (the CLI ``measure`` child).
    """
    conf, pool, note = allocator_conf(profile)
    alloc = profile.alloc.lower()
    if note and profile.target == "cuda":
        notes.append(note)
    if profile.target != "cuda":
        if alloc != "default" or profile.alloc_max_split:
            notes.append("allocator settings apply to CUDA only; ignored on CPU")
        return None
    current = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    if conf is None:
        if current:
            notes.append(f"PYTORCH_CUDA_ALLOC_CONF={current} (from the environment)")
        return pool
    wanted = merge_alloc_conf(current, conf)
    torch_mod = sys.modules.get("torch")
    if wanted != current and torch_mod is not None and torch_mod.cuda.is_initialized():
        raise BadInput(f"CUDA is already initialised with PYTORCH_CUDA_ALLOC_CONF={current or '(unset)'}; "
                       f"the profile's allocator settings need {conf} in a fresh process "
                       f"(run `headroom measure`)")
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = wanted
    notes.append(f"PYTORCH_CUDA_ALLOC_CONF={wanted}")
    return pool


def merge_alloc_conf(current: str | None, conf: str) -> str:
    """``current`` with ``conf``'s keys set (other keys, e.g. the user's max_split_size_mb, kept)."""
    parts = [x.strip() for x in (current or "").split(",") if x.strip()]
    new = [x.strip() for x in conf.split(",") if x.strip()]
    keys = {x.split(":", 1)[0] for x in new}
    return ",".join([x for x in parts if x.split(":", 1)[0] not in keys] + new)


# ----- data ------------------------------------------------------------------------------------
_TOKEN_CACHE: dict[tuple, tuple[list[list[int]], int, int | None]] = {}


def _token_lists(profile, should_stop, progress: Progress):
    """Tokenized dataset (cached in-process per dataset and tokenizer), pad id, mask id."""
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
        ids = data.tokenize(texts, tok, should_stop=should_stop,
                            progress=lambda f, m: progress(_DATA_END * 0.9 * f, m))
        if not ids:
            raise BadInput(f"dataset {ds!r} holds no texts")
        if len(_TOKEN_CACHE) >= 4:
            _TOKEN_CACHE.pop(next(iter(_TOKEN_CACHE)))
        # Tuples of ints: the garbage collector stops traversing them (the protocol's gc is quick).
        _TOKEN_CACHE[key] = ([tuple(x) for x in ids], int(tok.pad_token_id), tok.mask_token_id)
    return _TOKEN_CACHE[key]


@dataclass
class _StepData:
    input_ids: Any  # (B, T) int64, CPU
    attention_mask: Any  # (B, T) int64, CPU
    labels: Any  # (B, T) int64 for LM heads, (B,) for classification; None for inference
    real_tokens: int
    padded_tokens: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)


def _prepare_steps(profile, config, task: str, should_stop, progress: Progress,
                   notes: list[str]) -> tuple[list[_StepData], int]:
    """The CPU tensors of each step (batches from the profile's batching strategy, cycled) and the
    number of batches in one pass over the dataset (the plan's length)."""
    import torch

    from engine import batching

    token_lists, pad_id, mask_id = _token_lists(profile, should_stop, progress)
    plan = batching.plan_batches([len(t) for t in token_lists], profile, should_stop)
    if not plan:
        raise BadInput(f"dataset {profile.dataset!r} gives no batches")
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    wrapped = False
    built: dict[int, _StepData] = {}
    steps = []
    for s in range(profile.steps):
        j = s % len(plan)
        if j not in built:
            idx, t = plan[j]
            rows = [list(token_lists[i][:profile.seq]) for i in idx]
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
            built[j] = _StepData(ids, mask, labels, real, int(ids.numel()))
        steps.append(built[j])
        if should_stop is not None and should_stop():
            raise Cancelled("measure cancelled")
    if wrapped:
        notes.append(f"the tokenizer's ids exceed the model's vocabulary of {vocab}; "
                     f"ids were taken modulo {vocab}")
    progress(_DATA_END, f"{len(plan)} batches planned; running {profile.steps} steps")
    return steps, len(plan)


def _pass_stats(steps: list[_StepData], times: list[float], seen: set) -> dict[str, Any]:
    """Steps, time and throughput of a run of consecutive steps; ``new_shapes`` counts shapes not
    in ``seen`` (updated in place)."""
    new = 0
    for st in steps:
        if st.shape not in seen:
            seen.add(st.shape)
            new += 1
    total = float(sum(times))
    real = sum(st.real_tokens for st in steps)
    padded = sum(st.padded_tokens for st in steps)
    return {
        "steps": len(steps),
        "time_s": total,
        "s_per_step": total / len(steps) if steps else 0.0,
        "real_tokens": int(real),
        "padded_tokens": int(padded),
        "useful_tokens_per_s": real / total if total > 0 else 0.0,
        "tokens_per_s": padded / total if total > 0 else 0.0,
        "new_shapes": new,
    }


def pass_report(steps: list[_StepData], all_times: list[float], n_plan: int) -> dict[str, Any]:
    """The first pass over the dataset (its first ``n_plan`` steps, where every batch shape appears
    for the first time: on CUDA each new shape may cost kernel plans or autotuning) reported apart
    from the steady state (the steps after it; None when there are none).

    ``all_times`` holds the completed steps' times, the first (warm-up) step included, so the first
    pass's time includes the warm-up; ``first_pass_excl_step0_s`` leaves it out.
    """
    done = steps[:len(all_times)]
    seen: set = set()
    first = _pass_stats(done[:n_plan], all_times[:n_plan], seen)
    first["complete"] = len(done) >= n_plan
    first["time_excl_step0_s"] = float(sum(all_times[1:n_plan]))
    later = done[1:min(n_plan, len(done))]
    first["tokens_per_s_excl_step0"] = (sum(st.padded_tokens for st in later) / first["time_excl_step0_s"]
                                        if first["time_excl_step0_s"] > 0 else 0.0)
    rest = done[n_plan:]
    steady = _pass_stats(rest, all_times[n_plan:], seen) if rest else None
    out: dict[str, Any] = {"plan_batches": n_plan, "first_pass": first, "steady": steady,
                           "first_over_steady": None}
    if steady and steady["tokens_per_s"] > 0 and first["tokens_per_s"] > 0:
        # Time per padded token, first pass over steady (1.0: no first-pass cost).
        out["first_over_steady"] = steady["tokens_per_s"] / first["tokens_per_s"]
    return out


def _micro_parts(step: _StepData, n: int) -> list[tuple[Any, Any, Any]]:
    """(ids, mask, labels) micro-batches, split as ``engine.batching.split_micro_batches`` does."""
    import torch

    from engine.batching import Batch, split_micro_batches

    if n <= 1:
        return [(step.input_ids, step.attention_mask, step.labels)]
    batch = Batch(step.input_ids, step.attention_mask, step.real_tokens, step.padded_tokens,
                  tuple(range(step.input_ids.shape[0])))
    parts = split_micro_batches(batch, n)
    labels = torch.tensor_split(step.labels, len(parts), dim=0) if step.labels is not None \
        else [None] * len(parts)
    return [(p.input_ids, p.attention_mask, lab) for p, lab in zip(parts, labels)]


# ----- memory probes ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _PhaseEnd:
    """What a probe reads at the end of a phase, in one go."""

    allocated: int  # current allocated - baseline
    reserved: int  # current reserved
    peak: int  # peak allocated - baseline since the last phase end
    peak_reserved: int  # peak reserved since the last phase end


class _CudaProbe:
    """The caching allocator's counters, read from ``memory_stats_as_nested_dict``.

    ``torch.cuda.memory_allocated`` and its siblings each flatten and sort the allocator's whole
    stats dict (~0.1 ms); a step reads the counters at every phase boundary and at 16 points of the
    backward, so the nested dict is read once per point and indexed instead.
    """

    def __init__(self, torch, device):
        self.torch, self.device = torch, device
        self.baseline = 0

    def _stats(self) -> tuple[dict, dict]:
        stats = self.torch.cuda.memory_stats_as_nested_dict(self.device)
        return stats["allocated_bytes"]["all"], stats["reserved_bytes"]["all"]

    def allocated(self) -> int:
        return self._stats()[0]["current"] - self.baseline

    def reserved(self) -> int:
        return self._stats()[1]["current"]

    def take_phase_peaks(self) -> tuple[int, int]:
        """(peak allocated - baseline, peak reserved) since the last call; resets the counters."""
        end = self.phase_end()
        return end.peak, end.peak_reserved

    def phase_end(self) -> _PhaseEnd:
        """Current and peak counters since the last phase end (one read); resets the peaks."""
        alloc, reserved = self._stats()
        self.torch.cuda.reset_peak_memory_stats(self.device)
        return _PhaseEnd(alloc["current"] - self.baseline, reserved["current"],
                         alloc["peak"] - self.baseline, reserved["peak"])

    def sync(self) -> None:
        self.torch.cuda.synchronize(self.device)

    def used(self) -> int:
        free, total = self.torch.cuda.mem_get_info(self.device)
        return int(total - free)


class _CpuProbe:
    def __init__(self, tracker, rss):
        self.tracker, self.rss = tracker, rss

    def allocated(self) -> int:
        return self.tracker.live_bytes

    def reserved(self) -> int:
        return self.rss.sample() - self.rss.start_bytes

    def take_phase_peaks(self) -> tuple[int, int]:
        peak = self.tracker.peak_bytes
        self.tracker.reset_peak()
        return peak, self.rss.peak_bytes - self.rss.start_bytes

    def phase_end(self) -> _PhaseEnd:
        allocated, reserved = self.allocated(), self.reserved()
        peak, peak_reserved = self.take_phase_peaks()
        return _PhaseEnd(allocated, reserved, peak, peak_reserved)

    def sync(self) -> None:
        pass

    def used(self) -> int:
        return self.rss.peak_bytes


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (tied weights and views counted once)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if t is None:
            continue
        st = t.untyped_storage()
        seen[(str(t.device), st.data_ptr())] = st.nbytes()
    return sum(seen.values())


def _optimizer_state_bytes(optimizer) -> int:
    import torch

    return _storage_bytes(v for state in optimizer.state.values() for v in state.values()
                          if isinstance(v, torch.Tensor))


@dataclass
class _PhaseRecord:
    step: int
    phase: str
    peak: int = 0  # peak allocated (over baseline) during the phase
    sample_alloc: int = -1  # allocated at the fullest sample point of the phase
    sample_grads: int = 0  # gradient bytes at that sample
    sample_states: int = 0  # optimizer state bytes at that sample


@dataclass
class _Run:
    """Mutable state of one run: the phase being measured and what was recorded so far."""

    probe: Any = None
    weights: int = 0
    grads: int = 0  # gradient bytes accumulated so far (post-accumulate hooks)
    grad_ids: set = field(default_factory=set)
    grads_sampled: int = 0  # gradient bytes at the last sample taken from a gradient hook
    states: int = 0
    states_of: int = 0  # parameters with optimizer state when ``states`` was counted
    step: int = -1
    phase: str = "model"
    current: _PhaseRecord | None = None
    records: list[_PhaseRecord] = field(default_factory=list)
    peak_reserved: int = 0
    timeline: list = field(default_factory=list)

    def begin(self, step: int, phase: str) -> None:
        self.step, self.phase = step, phase
        self.current = _PhaseRecord(step, phase)
        self.sample()

    def sample(self, alloc: int | None = None) -> None:
        rec = self.current
        if rec is None:
            return
        if alloc is None:
            alloc = self.probe.allocated()
        if alloc > rec.sample_alloc:
            rec.sample_alloc, rec.sample_grads, rec.sample_states = alloc, self.grads, self.states

    def end(self) -> None:
        from engine.results import TimelinePoint

        end = self.probe.phase_end()  # one read: the phase's last sample, its peaks, the timeline point
        self.sample(end.allocated)
        rec = self.current
        rec.peak = max(end.peak, rec.sample_alloc)
        self.peak_reserved = max(self.peak_reserved, end.peak_reserved)
        self.records.append(rec)
        self.timeline.append(TimelinePoint(self.step, self.phase, int(end.allocated), int(end.reserved)))
        self.current = None

    def close_partial(self) -> None:
        """After an OOM: record the interrupted phase's peak."""
        if self.current is not None:
            rec = self.current
            peak, reserved = self.probe.take_phase_peaks()
            rec.peak = max(peak, rec.sample_alloc)
            self.peak_reserved = max(self.peak_reserved, reserved)
            self.records.append(rec)
            self.current = None

    def grad_hook(self, param) -> None:
        key = id(param)
        if key not in self.grad_ids and param.grad is not None:
            self.grad_ids.add(key)
            self.grads += param.grad.untyped_storage().nbytes()
        # Reading the allocator's counters builds its whole stats dict (~0.1 ms): sampling after
        # every parameter cost up to 40 ms a step (bert-base, H100), enough to hide an AMP
        # speed-up. A sample per 1/16 of the weights' bytes keeps the breakdown's resolution.
        if self.grads - self.grads_sampled >= max(self.weights // 16, 1):
            self.grads_sampled = self.grads
            self.sample()

    def peak_record(self) -> _PhaseRecord | None:
        return max(self.records, key=lambda r: r.peak) if self.records else None

    def breakdown(self) -> dict[str, int]:
        from engine.results import MemoryCategory as C

        rec = self.peak_record()
        out = {c.value: 0 for c in (C.WEIGHTS, C.GRADIENTS, C.OPTIMIZER, C.ACTIVATIONS, C.TEMPORARIES)}
        if rec is None:
            return out
        left = rec.peak
        for cat, n in ((C.WEIGHTS, self.weights), (C.OPTIMIZER, rec.sample_states),
                       (C.GRADIENTS, rec.sample_grads),
                       (C.ACTIVATIONS, rec.sample_alloc - self.weights - rec.sample_states - rec.sample_grads)):
            take = max(0, min(n, left))
            out[cat.value] = take
            left -= take
        out[C.TEMPORARIES.value] = max(0, left)
        return out


# ----- the run ---------------------------------------------------------------------------------
def run_measure(profile, progress: Progress | None = None,
                should_stop: Callable[[], bool] | None = None, snapshot: str | None = None):
    """Run the profile's steps for real and measure them; an out-of-memory is a result (oom=True).

    Raises BadInput for what cannot be run here (no CUDA, snapshot on CPU, an op unsupported for the
    precision on this device) and Cancelled when ``should_stop()`` turns True.
    """
    started = time.perf_counter()
    notes: list[str] = []
    pool = configure_allocator(profile, notes)  # before anything touches CUDA

    def report(fraction: float, message: str) -> None:
        if progress is not None:
            progress(min(1.0, max(0.0, fraction)), message)

    def check_stop() -> None:
        if should_stop is not None and should_stop():
            raise Cancelled("measure cancelled")

    import torch

    from engine.models import build_model, check_profile, count_parameters, resolve_task

    device = profile.target
    if snapshot and device != "cuda":
        raise BadInput("snapshots need CUDA (--snapshot works with --target cuda)")
    if device == "cuda" and not torch.cuda.is_available():
        raise BadInput("no CUDA device is available here; measure with --target cpu "
                       "(memory_cap_bytes simulates a device size)")
    config = check_profile(profile)
    from engine.techniques.explanations import check_compatible

    # BadInput (one line) for combinations that cannot work; the allocator note is configure_allocator's.
    notes.extend(n for n in check_compatible(profile) if not n.startswith("allocator settings"))
    task = resolve_task(profile, config)
    distill = None
    if profile.distill_from:
        distill = _optional_technique("distillation")
        if distill is None:
            raise BadInput("distillation not available yet")

    report(0.0, "loading data")
    steps, n_plan = _prepare_steps(profile, config, task, should_stop, report, notes)
    check_stop()

    precision = profile.precision
    amp_dtype = {"bf16-amp": torch.bfloat16, "fp16-amp": torch.float16}.get(precision)

    # -- clean device, baseline ---------------------------------------------------------------
    run = _Run()
    rss = tracker = None
    gc.collect()
    if device == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.init()
        torch.empty(0, device=dev)  # create the context now, outside the measured region
        torch.cuda.empty_cache()
        if pool is not None and hasattr(pool, "prereserve"):
            note = pool.prereserve(profile, str(dev))
            if isinstance(note, str) and note:
                notes.append(note)
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        probe = _CudaProbe(torch, dev)
        probe.baseline = torch.cuda.memory_allocated(dev)
        device_name = torch.cuda.get_device_name(dev)
        if snapshot:
            torch.cuda.memory._record_memory_history(max_entries=SNAPSHOT_MAX_ENTRIES)
    else:
        from engine.measure.cpu_tracker import LiveBytesTracker, RssSampler

        dev = torch.device("cpu")
        tracker = LiveBytesTracker("cpu", cap_bytes=profile.memory_cap_bytes)
        rss = RssSampler()
        probe = _CpuProbe(tracker, rss)
        device_name = _cpu_name()
    run.probe = probe

    result_kwargs: dict[str, Any] = {}
    step_times: list[float] = []
    losses: list[float] = []
    first_step_s = 0.0
    oom_info: tuple[int, str, str] | None = None
    params = 0
    scaler = None
    try:
        if rss is not None:
            rss.__enter__()
        # -- model, teacher, optimizer --------------------------------------------------------
        report(_DATA_END, f"building {profile.model} on {device}")
        run.phase = "model"
        torch.manual_seed(profile.seed)
        model = build_model(profile, str(dev))
        if hasattr(getattr(model, "config", None), "use_cache"):
            model.config.use_cache = False
        params = count_parameters(model)
        teacher = None
        if distill is not None:
            teacher = distill.build_teacher(profile, str(dev))
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        weight_tensors = list(model.parameters()) + list(model.buffers())
        if teacher is not None:
            weight_tensors += list(teacher.parameters()) + list(teacher.buffers())
        run.weights = _storage_bytes(weight_tensors)
        if tracker is not None:
            for t in weight_tensors:
                tracker.track(t)
            tracker.reset_peak()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = None
        hooks = []
        if profile.is_training:
            model.train()
            if profile.optimizer == "sgd":
                optimizer = torch.optim.SGD(trainable, lr=1e-3)
            else:
                optimizer = torch.optim.AdamW(trainable)
            if hasattr(torch.Tensor, "register_post_accumulate_grad_hook"):
                hooks = [p.register_post_accumulate_grad_hook(run.grad_hook) for p in trainable]
        else:
            model.eval()

        if amp_dtype is not None and device == "cpu":
            amp_dtype = _check_cpu_autocast(torch, model, steps[0], amp_dtype, notes,
                                            profile.is_training)
            if amp_dtype is None:
                precision = "fp32"
        if amp_dtype == torch.float16 and profile.is_training:
            scaler = _grad_scaler(torch, device)

        def autocast():
            if amp_dtype is None:
                return _nullcontext()
            return torch.autocast(device_type=device, dtype=amp_dtype)

        report(_BUILD_END, "model ready")
        check_stop()
        gc.collect()
        probe.sync()
        probe.take_phase_peaks()
        run.timeline.append(_timeline_start(probe))

        n_micro = profile.micro_batches if profile.is_training else 1
        window = profile.chunk_input if not profile.is_training else 0
        ctx = tracker if tracker is not None else _nullcontext()
        with ctx:
            for s, step in enumerate(steps):
                check_stop()
                report(_BUILD_END + (1 - _BUILD_END) * s / len(steps), f"step {s + 1}/{len(steps)}")
                probe.sync()
                t0 = time.perf_counter()
                if profile.is_training:
                    loss_value = _train_step(torch, run, s, step, model, teacher, optimizer, scaler,
                                             autocast, dev, n_micro, distill, profile, check_stop)
                else:
                    loss_value = None
                    _infer_step(torch, run, s, step, model, autocast, dev, window)
                probe.sync()
                elapsed = time.perf_counter() - t0
                if s == 0:
                    first_step_s = elapsed
                else:
                    step_times.append(elapsed)
                if loss_value is not None:
                    losses.append(float(loss_value))
                if rss is not None:
                    rss.sample()
        report(1.0, "done")
        for h in hooks:
            h.remove()
    except Cancelled:
        raise
    except BaseException as exc:  # noqa: BLE001 - sorted below; nothing else escapes as a traceback
        if isinstance(exc, (KeyboardInterrupt, SystemExit, BadInput)):
            raise
        if not (_is_oom(exc) or (tracker is not None and tracker.oom_raised)):
            if isinstance(exc, (RuntimeError, NotImplementedError, TypeError, ValueError)):
                raise BadInput(f"the run failed at step {max(run.step, 0)} ({run.phase}) on {device} "
                               f"with {precision}: {_first_line(exc)}") from None
            raise
        run.sample()  # what is still referenced from the failing frames is what was live
        oom_info = (max(run.step, 0), run.phase, _first_line(exc))
        del exc
    finally:
        if rss is not None:
            rss.__exit__(None, None, None)

    # -- after the steps (or the OOM): free, read the device, build the result ---------------------
    if oom_info is not None:
        run.close_partial()
        model = teacher = optimizer = scaler = None  # noqa: F841 - drop references
        gc.collect()
    device_used = probe.used()
    if snapshot:
        try:
            torch.cuda.memory._dump_snapshot(snapshot)
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
        notes.append(f"memory snapshot written to {snapshot} (open it at https://pytorch.org/memory_viz)")
    if device == "cuda":
        notes.append("CUDA: peak = max_memory_allocated() over the steps minus the baseline")
    else:
        notes.append("CPU: peak = tracked live tensor bytes; reserved = RSS growth; "
                     "timings include the tracker's per-op overhead")
        if profile.memory_cap_bytes:
            notes.append(f"simulated capacity {format_bytes(profile.memory_cap_bytes)} of live tensors")
    if precision != profile.precision:
        result_kwargs.setdefault("extra", {})["precision_ran"] = precision

    rec = run.peak_record()
    completed = (1 if first_step_s else 0) + len(step_times)  # steps that ran to the end
    run_steps = steps[:max(run.step + 1, 0)] if oom_info is not None else steps  # the failing one too
    timed = steps[1:completed] if completed > 1 else steps[:completed]
    times = step_times if step_times else ([first_step_s] if first_step_s else [])
    if len(steps) == 1 and oom_info is None:
        notes.append("one step only: timings include the warm-up step")
    total_time = sum(times)
    real = sum(st.real_tokens for st in timed) if times else 0
    padded = sum(st.padded_tokens for st in timed) if times else 0
    from engine.results import MeasureResult

    extra = result_kwargs.pop("extra", {})
    extra.update({
        "task": task,
        "precision": precision,
        "peak_step": rec.step if rec else -1,
        "peak_phase": rec.phase if rec else "",
        "baseline_bytes": getattr(probe, "baseline", 0),
        "weights_bytes": run.weights,
        "optimizer_state_bytes": run.states,
        "micro_batches": profile.micro_batches if profile.is_training else 1,
        "chunk_input": profile.chunk_input if not profile.is_training else 0,
        "phase_peaks": [[r.step, r.phase, r.peak] for r in run.records],
        "distinct_shapes": len({st.shape for st in run_steps}),
        "passes": pass_report(steps, ([first_step_s] if completed else []) + step_times, n_plan),
    })
    if rss is not None:
        extra["rss_start_bytes"] = rss.start_bytes
        extra["rss_peak_bytes"] = rss.peak_bytes
    if oom_info is not None:
        extra["oom_message"] = oom_info[2]
        notes.append(f"out of memory at step {oom_info[0]} ({oom_info[1]}): {oom_info[2]}")
    return MeasureResult(
        device=device,
        device_name=device_name,
        peak_allocated_bytes=int(rec.peak if rec else 0),
        peak_reserved_bytes=int(run.peak_reserved),
        device_used_bytes=int(device_used),
        breakdown=run.breakdown(),
        step_time_s=float(statistics.median(times)) if times else 0.0,
        tokens_per_s=padded / total_time if total_time > 0 else 0.0,
        useful_tokens_per_s=real / total_time if total_time > 0 else 0.0,
        real_tokens=int(real),
        padded_tokens=int(padded),
        steps=completed,
        params=int(params),
        oom=oom_info is not None,
        oom_step=oom_info[0] if oom_info is not None else -1,
        oom_phase=oom_info[1] if oom_info is not None else "",
        timeline=tuple(run.timeline),
        first_step_s=float(first_step_s),
        distinct_shapes=len({st.shape for st in run_steps}),
        losses=tuple(losses),
        notes=tuple(notes),
        elapsed_s=time.perf_counter() - started,
        extra=extra,
    )


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _timeline_start(probe):
    from engine.results import TimelinePoint

    return TimelinePoint(0, "start", int(probe.allocated()), int(probe.reserved()))


def _grad_scaler(torch, device: str):
    amp = getattr(torch, "amp", None)
    if amp is not None and hasattr(amp, "GradScaler"):
        return amp.GradScaler(device)
    return torch.cuda.amp.GradScaler()  # pragma: no cover - torch < 2.3


def _check_cpu_autocast(torch, model, step: _StepData, dtype, notes: list[str], training: bool):
    """CPU autocast fp16/bf16 may lack kernels for some ops: try one tiny step before measuring.

    Returns the dtype to run with (fp16 falls back to bf16, bf16 to fp32), with a note.
    """
    ids = step.input_ids[:1, :8]
    mask = step.attention_mask[:1, :8]
    for candidate in ([dtype, torch.bfloat16] if dtype == torch.float16 else [dtype]):
        try:
            with torch.autocast(device_type="cpu", dtype=candidate):
                out = model(input_ids=ids, attention_mask=mask)
                loss = out.logits.float().mean()
            if training:
                loss.backward()
                model.zero_grad(set_to_none=True)
            if candidate != dtype:
                notes.append(f"CPU autocast fp16 is not supported for this model here; "
                             f"ran bf16 autocast instead (same 2-byte activations)")
            return candidate
        except (RuntimeError, NotImplementedError) as exc:
            first = _first_line(exc)
            model.zero_grad(set_to_none=True)
    notes.append(f"CPU autocast is not supported for this model here ({first}); ran fp32")
    return None


def _to_device(t, dev):
    return None if t is None else t.to(dev, copy=True)


def _train_step(torch, run: _Run, s: int, step: _StepData, model, teacher, optimizer, scaler,
                autocast, dev, n_micro: int, distill, profile, check_stop):
    parts = _micro_parts(step, n_micro)
    total_loss = None
    for j, (ids, mask, labels) in enumerate(parts):
        if j:
            check_stop()
        run.begin(s, "forward")
        ids, mask, labels = _to_device(ids, dev), _to_device(mask, dev), _to_device(labels, dev)
        with autocast():
            # As in a plain loop, only the loss is kept: the outputs (logits) are dropped before
            # backward, so what stays alive is what autograd saved.
            if distill is not None:
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=ids, attention_mask=mask).logits
                logits = model(input_ids=ids, attention_mask=mask).logits
                loss = distill.distillation_loss(logits, teacher_logits, labels, profile)
                del teacher_logits, logits
            else:
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss = loss / len(parts)
        run.end()
        run.begin(s, "backward")
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        detached = loss.detach()
        del loss, ids, mask, labels
        total_loss = detached if total_loss is None else total_loss + detached
        run.end()
    run.begin(s, "optimizer")
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if len(optimizer.state) != run.states_of:  # state tensors appear once per parameter, then stay
        run.states, run.states_of = _optimizer_state_bytes(optimizer), len(optimizer.state)
    run.sample()
    optimizer.zero_grad(set_to_none=True)
    run.grads, run.grad_ids, run.grads_sampled = 0, set(), 0
    run.end()
    return total_loss


def _infer_step(torch, run: _Run, s: int, step: _StepData, model, autocast, dev, window: int):
    from engine.batching import windows

    T = step.input_ids.shape[1]
    spans = [(w[0], w[-1] + 1) for w in windows(range(T), window)] if window and T > window \
        else [(0, T)]
    run.begin(s, "forward")
    with torch.no_grad():
        for a, b in spans:
            ids = _to_device(step.input_ids[:, a:b], dev)  # (B, W)
            mask = _to_device(step.attention_mask[:, a:b], dev)  # (B, W)
            with autocast():
                out = model(input_ids=ids, attention_mask=mask)
            run.sample()
            del out, ids, mask
    run.end()
