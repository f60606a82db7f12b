"""A measured run: real training or inference steps on CUDA or CPU (DESIGN.md, 'What "measured" means').

Protocol (CUDA)
    ``PYTORCH_CUDA_ALLOC_CONF`` is set before CUDA starts; gc, ``empty_cache``, reset peaks, sync;
    baseline = ``memory_allocated()`` before the model; the model is built on the device
    (``engine.models.build_model``: fp32, or cast to bf16/fp16 for pure-precision profiles, with the
    model-side techniques applied); the optimizer is ``engine.optimizers.make_optimizer``'s (torch's
    defaults for AdamW, SGD lr 1e-3 momentum 0.9, bitsandbytes' 8-bit AdamW and Lion, Adafactor); ``profile.steps`` steps run, each forward + loss + backward +
    optimizer step + ``zero_grad(set_to_none=True)`` (inference: forward under ``no_grad`` in eval
    mode). Peak = ``max_memory_allocated()`` over the steps minus the baseline; also
    ``max_memory_reserved()`` and the device's used memory (``mem_get_info``, CUDA context
    included, read at the end when the reserved pool is largest). Timings exclude the first step and
    are taken between ``torch.cuda.synchronize()`` calls; ``step_time_s`` is their median.

Protocol (CPU)
    The same loop. "Allocated" is the exact sum of live tensor storage bytes, counted by a
    ``TorchDispatchMode`` (``engine.measure.probes.LiveBytesTracker``); "reserved" is the growth of
    the process RSS (sampled in a thread and at every phase point) over its value before the model
    was built; ``device_used_bytes`` is the peak RSS. ``memory_cap_bytes`` simulates a device
    capacity: the op that would exceed it raises an out-of-memory error, which becomes an OOM result.

How the peak is split into categories: ``engine.measure.attribution``. The step tensors (and the
vocabulary wrap): ``engine.measure.inputs``. The steps: ``engine.measure.loop``.

Other choices: ``config.use_cache`` is switched off (a scoring forward, no KV cache is returned);
inputs are copied to the device inside each step (counted, as in a real loop).
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from engine import techniques
from engine.data.tokens import tokenizer_info
from engine.errors import BadInput, Cancelled
from engine.measure import attribution, inputs, loop, probes
from engine.units import format_bytes

#: Entries kept by ``--snapshot`` (torch.cuda.memory._record_memory_history).
SNAPSHOT_MAX_ENTRIES = 100_000
#: Progress fractions: data, model build, then the steps.
_DATA_END, _BUILD_END = 0.10, 0.15

Progress = Callable[[float, str], None]

# Names other modules (bench/ scripts) import from here.
MLM_PROBABILITY = inputs.MLM_PROBABILITY
_prepare_steps = inputs.prepare_steps
_StepData = inputs.StepData
_CudaProbe = probes.CudaProbe
pass_report = loop.pass_report


# ----- small helpers ---------------------------------------------------------------------------
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


# ----- process setup (must precede CUDA initialisation) ---------------------------------------
def configure_process(profile, notes: list[str]) -> None:
    """Every technique's setup of this process (``ProcessHooks.configure``: the CUDA allocator's
    configuration), before anything touches CUDA."""
    for hooks in techniques.process_hooks():
        if hooks.configure is not None:
            hooks.configure(profile, notes)


def _callbacks(progress: Progress | None, should_stop: Callable[[], bool] | None):
    """A run's ``report(fraction, message)`` (fraction kept in 0..1; nothing without ``progress``)
    and ``check_stop()`` (Cancelled once ``should_stop()`` turns True); training and generation share them."""

    def report(fraction: float, message: str) -> None:
        if progress is not None:
            progress(min(1.0, max(0.0, fraction)), message)

    def check_stop() -> None:
        if should_stop is not None and should_stop():
            raise Cancelled("measure cancelled")

    return report, check_stop


# ----- the run ---------------------------------------------------------------------------------
def run_measure(profile, progress: Progress | None = None,
                should_stop: Callable[[], bool] | None = None, snapshot: str | None = None):
    """Run the profile's steps for real and measure them; an out-of-memory is a result (oom=True).

    Raises BadInput for what cannot be run here (no CUDA, snapshot on CPU, an op unsupported for the
    precision on this device) and Cancelled when ``should_stop()`` turns True.
    """
    if profile.mode == "generate":  # prefill + decode over a KV cache: engine.measure.generate
        from engine.measure.generate import run_generate

        return run_generate(profile, progress, should_stop, snapshot)
    started = time.perf_counter()
    notes: list[str] = []
    configure_process(profile, notes)  # before anything touches CUDA
    report, check_stop = _callbacks(progress, should_stop)

    device = profile.target
    config, task = _checked(profile, snapshot, notes)
    if profile.distributed:  # one rank of a torchrun launch (engine.distributed)
        from engine import distributed

        if profile.nodes > 1:
            raise BadInput(f"HSDP over {profile.nodes} nodes is planned on paper: a measured run uses "
                           f"one node (set nodes = 1)")
        if not distributed.in_rank_process():
            raise BadInput(f"--shard {profile.shard} runs one process per rank under torchrun: "
                           f"use `headroom measure` (it launches them) or measure_in_child")
        rank, world, _ = distributed.init_rank(profile)
        notes.append(f"rank {rank} of {world} ({profile.shard}, "
                     f"{'nccl' if profile.target == 'cuda' else 'gloo'}); every rank runs the "
                     f"profile's batches")
    report(0.0, "loading data")
    steps, n_plan = inputs.prepare_steps(profile, config, task, should_stop,
                                         lambda f, m: report(_DATA_END * f, m), notes)
    check_stop()

    run = attribution.PeakAttribution()
    gc.collect()
    dev, run.probe, tracker, rss, device_name = _clean_device(profile, snapshot, notes)
    probe = run.probe
    built = _Built(precision=profile.precision)
    times = loop.StepTimes()
    oom_info: tuple[int, str, str] | None = None
    try:
        with rss if rss is not None else contextlib.nullcontext():
            report(_DATA_END, f"building {profile.model} on {device}")
            _build(built, profile, dev, run, tracker, steps[0], notes, check_stop)
            report(_BUILD_END, "model ready")
            check_stop()
            gc.collect()
            probe.sync()
            probe.take_phase_peaks()
            run.start_timeline()
            # The engine's process holds far more Python objects than a plain training script (the
            # registry, transformers' modules, the dataset): a full cyclic collection inside a
            # host-bound step then costs milliseconds the user's loop would not pay. Frozen
            # objects are not scanned; what the steps allocate is collected as usual.
            gc.freeze()
            try:
                with tracker if tracker is not None else contextlib.nullcontext(), \
                        _fsdp_tracking(profile, tracker):
                    loop.run_steps(built.step_loop, steps, probe, times,
                                   lambda f, m: report(_BUILD_END + (1 - _BUILD_END) * f, m), rss,
                                   quiet_repeats=quiet_repeats(profile))
            finally:
                gc.unfreeze()
            report(1.0, "done")
            for h in built.hooks:
                h.remove()
    except Cancelled:
        raise
    except BaseException as exc:  # noqa: BLE001 - sorted below; nothing else escapes as a traceback
        if isinstance(exc, (KeyboardInterrupt, SystemExit, BadInput)):
            raise
        if not (_is_oom(exc) or (tracker is not None and tracker.oom_raised)):
            if isinstance(exc, (RuntimeError, NotImplementedError, TypeError, ValueError)):
                raise BadInput(f"the run failed at step {max(run.step, 0)} ({run.phase}) on {device} "
                               f"with {built.precision}: {loop.first_line(exc)}") from None
            raise
        run.sample()  # what is still referenced from the failing frames is what was live
        oom_info = (max(run.step, 0), run.phase, loop.first_line(exc))
        del exc

    # -- after the steps (or the OOM): free, read the device, build the result ---------------------
    if oom_info is not None:
        run.close_partial()
        built.drop()
        gc.collect()
    device_used = probe.used()
    if snapshot:
        import torch

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
    sharding = _sharding_extra(profile, built) if profile.distributed else None
    result = _result(profile, steps, n_plan, run, probe, rss, times, oom_info, notes, task=task,
                   precision=built.precision, device=device, device_name=device_name,
                   device_used=device_used, params=built.params, started=started,
                   trainable=built.trainable)
    if sharding is not None:
        result.extra["sharding"] = sharding
    return result


def quiet_repeats(profile) -> bool:
    """Repeated batch shapes run without the breakdown's bookkeeping on CUDA (``loop.run_steps``):
    there it is host time a real loop does not spend. On CPU the tracker sees every op anyway, and
    every step keeps its per-phase timeline. ``HEADROOM_INSTRUMENT_ALL=1`` instruments every step."""
    return profile.target == "cuda" and os.environ.get("HEADROOM_INSTRUMENT_ALL", "") != "1"


def _checked(profile, snapshot, notes: list[str]):
    """(config, task) of a profile this machine can run; BadInput (one line) otherwise."""
    import torch

    from engine.models import resolve_task
    from engine.prepare import prepare

    if snapshot and profile.target != "cuda":
        raise BadInput("snapshots need CUDA (--snapshot works with --target cuda)")
    if profile.target == "cuda" and not torch.cuda.is_available():
        raise BadInput("no CUDA device is available here; measure with --target cpu "
                       "(memory_cap_bytes simulates a device size)")
    prepared = prepare(profile)  # the one gate: the same refusals as estimate, plan and export
    from engine.optimizers import unavailable

    why = unavailable(profile.optimizer) if profile.is_training else ""
    if not why and profile.quant != "none":
        from engine.optimizers import bitsandbytes_missing

        missing = bitsandbytes_missing()
        why = f"{profile.quant} base weights need bitsandbytes: {missing}" if missing else ""
    if why:
        raise BadInput(f"cannot measure here: {why} (the estimate still works)")
    # the allocator note is configure_process's
    notes.extend(n for n in prepared.notes if not n.startswith("allocator settings"))
    from engine.models import source_kind

    if source_kind(profile.model) == "hub" and not profile.download_weights:
        notes.append(f"Hub model {profile.model}: random weights (memory does not depend on their "
                     "values); --download-weights loads its own")
    return prepared.config, resolve_task(profile, prepared.config)


def _clean_device(profile, snapshot, notes: list[str]):
    """(device, probe, CPU tracker, RSS sampler, device name) after the protocol's clean start:
    CUDA context created, cache emptied, the pool pre-reserved, peaks reset, baseline read."""
    import torch

    if profile.target != "cuda":
        tracker = probes.LiveBytesTracker("cpu", cap_bytes=profile.memory_cap_bytes)
        rss = probes.RssSampler()
        return torch.device("cpu"), probes.CpuProbe(tracker, rss), tracker, rss, _cpu_name()
    dev = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.init()
    torch.empty(0, device=dev)  # create the context now, outside the measured region
    torch.cuda.empty_cache()
    for hooks in techniques.process_hooks():  # e.g. a pre-reserved allocator pool
        note = hooks.before_steps(profile, str(dev)) if hooks.before_steps is not None else ""
        if note:
            notes.append(note)
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    probe = probes.CudaProbe(torch, dev)
    probe.baseline = torch.cuda.memory_allocated(dev)
    if snapshot:
        torch.cuda.memory._record_memory_history(max_entries=SNAPSHOT_MAX_ENTRIES)
    return dev, probe, None, None, torch.cuda.get_device_name(dev)


@dataclass
class _Built:
    """What the build made (filled as it goes, so an OOM mid-build still reports the params)."""

    precision: str  # the precision that runs (CPU autocast may fall back)
    params: int = 0
    trainable: int = 0  # parameters that train (LoRA: the adapters)
    hooks: list = field(default_factory=list)
    wrapped: Any = None  # the DDP / FSDP2 model (data-parallel profiles)
    optimizer: Any = None
    ddp_buckets: int = 0  # DDP gradient bucket bytes (counted by hand on CPU)
    step_loop: loop.StepLoop | None = None

    def drop(self) -> None:
        """Release the model, the techniques' extra models and the optimizer (after an OOM, before
        reading the device)."""
        self.hooks, self.step_loop, self.wrapped, self.optimizer = [], None, None, None


def _build(built: _Built, profile, dev, run, tracker, first_step, notes: list[str], check_stop):
    """The model (techniques applied, ``use_cache`` off), the techniques' extra models (a
    distillation teacher: ``LoopHooks``), the optimizer with torch's
    defaults, the gradient hooks of the attribution, autocast and the scaler: ``built.step_loop``."""
    import torch

    from engine.models import build_model, count_parameters

    run.phase = "model"
    torch.manual_seed(profile.seed)
    model = build_model(profile, str(dev))
    if hasattr(getattr(model, "config", None), "use_cache"):
        model.config.use_cache = False
    built.params = count_parameters(model)
    if profile.distributed:
        from engine import distributed

        model = distributed.wrap(model, profile, dev)
        built.wrapped = model
    hooks_on = techniques.loop_hooks(profile)
    extras = [m for h in hooks_on if h.extra_models
              for m in h.extra_models(profile, str(dev), dev.type)]
    loss_hook = next((h.loss for h in hooks_on if h.loss is not None), None)
    weight_tensors = list(model.parameters()) + list(model.buffers())
    for extra in extras:  # frozen, eval, no gradients: their weights count as weights
        weight_tensors += list(extra.parameters()) + list(extra.buffers())
    run.weights = attribution.storage_bytes(weight_tensors)
    if tracker is not None:
        for t in weight_tensors:
            tracker.track(t)
        tracker.reset_peak()
    if profile.shard == "ddp":
        # DDP's reducer allocates its gradient buckets in the first backward (and again when it
        # rebuilds them in the second step), through ATen: the tracker sees them. Their sizes, from
        # DDP's own logging data, go into the result.
        built.ddp_buckets = _ddp_bucket_bytes(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if profile.is_training:
        built.trainable = sum(p.numel() for p in trainable)
    optimizer = None
    if profile.is_training:
        model.train()
        if profile.offload == "optimizer":
            from engine.distributed import CpuOffloadedOptimizer

            optimizer = CpuOffloadedOptimizer(trainable, profile.optimizer)
        else:
            from engine.optimizers import make_optimizer

            optimizer = make_optimizer(profile.optimizer, trainable)
        built.optimizer = optimizer
        if hasattr(torch.Tensor, "register_post_accumulate_grad_hook"):
            built.hooks = [p.register_post_accumulate_grad_hook(run.grad_hook) for p in trainable]
    else:
        model.eval()
    amp_dtype = {"bf16-amp": torch.bfloat16, "fp16-amp": torch.float16}.get(profile.precision)
    if amp_dtype is not None and dev.type == "cpu":
        amp_dtype = loop.check_cpu_autocast(model, first_step, amp_dtype, notes, profile.is_training)
        if amp_dtype is None:
            built.precision = "fp32"
    scaler = loop.grad_scaler(dev.type) if amp_dtype == torch.float16 and profile.is_training \
        else None
    built.step_loop = loop.StepLoop(
        run, model, dev, profile, check_stop, optimizer=optimizer, extras=extras,
        loss_hook=loss_hook, scaler=scaler, amp_dtype=amp_dtype,
        keep_outputs=any(h.keep_outputs for h in hooks_on),
        micro_batches=profile.micro_batches if profile.is_training else 1,
        window=profile.chunk_input if not profile.is_training else 0)


def _fsdp_tracking(profile, tracker):
    if profile.shard != "fsdp2" or tracker is None:
        return contextlib.nullcontext()
    from engine.distributed import fsdp_storage_tracking

    return fsdp_storage_tracking(tracker)


def _ddp_bucket_bytes(model) -> int:
    data = model._get_ddp_logging_data()
    return sum(int(x) for x in str(data.get("bucket_sizes", "")).split(",") if x.strip())


def _sharding_extra(profile, built: _Built) -> dict[str, Any]:
    """This rank's part of a data-parallel run: rank, world, the shards it held."""
    import torch.distributed as dist

    from engine import distributed

    out: dict[str, Any] = {"rank": dist.get_rank(), "world": dist.get_world_size(),
                           "shard": profile.shard, "ddp_bucket_bytes": built.ddp_buckets}
    if built.wrapped is not None:
        held = distributed.shard_bytes(built.wrapped, built.optimizer)
        out["param_shard_bytes"], out["optimizer_shard_bytes"] = held["params"], held["states"]
    return out


def _rss_and_oom(extra: dict[str, Any], notes: list[str], rss, oom, unit: str) -> None:
    """Adds the process RSS (when tracked) and an out-of-memory's message, (index, phase, message)
    at that ``unit`` ("step" or "token"), to a result's extra and notes."""
    if rss is not None:
        extra["rss_start_bytes"] = rss.start_bytes
        extra["rss_peak_bytes"] = rss.peak_bytes
    if oom is not None:
        extra["oom_message"] = oom[2]
        notes.append(f"out of memory at {unit} {oom[0]} ({oom[1]}): {oom[2]}")


def _result(profile, steps, n_plan, run, probe, rss, times, oom_info, notes, *, task, precision,
            device, device_name, device_used, params, started, trainable=0):
    """The MeasureResult of a finished (or out-of-memory) run."""
    from engine.results import MeasureResult

    extra: dict[str, Any] = {}
    if precision != profile.precision:
        extra["precision_ran"] = precision
    rec = run.peak_record()
    completed = times.completed  # steps that ran to the end
    run_steps = steps[:max(run.step + 1, 0)] if oom_info is not None else steps  # the failing one too
    timed = steps[1:completed] if completed > 1 else steps[:completed]
    step_times = times.step_times if times.step_times else (
        [times.first_step_s] if times.first_step_s else [])
    if len(steps) == 1 and oom_info is None:
        notes.append("one step only: timings include the warm-up step")
    total_time = sum(step_times)
    real = sum(st.real_tokens for st in timed) if step_times else 0
    padded = sum(st.padded_tokens for st in timed) if step_times else 0
    extra.update({
        "task": task,
        "precision": precision,
        "peak_step": rec.step if rec else -1,
        "peak_phase": rec.phase if rec else "",
        "baseline_bytes": probe.baseline,
        "weights_bytes": run.weights,
        "optimizer_state_bytes": run.states,
        "micro_batches": profile.micro_batches if profile.is_training else 1,
        "chunk_input": profile.chunk_input if not profile.is_training else 0,
        "phase_peaks": [[r.step, r.phase, r.peak] for r in run.records],
        "distinct_shapes": len({st.shape for st in run_steps}),
        "passes": loop.pass_report(steps, ([times.first_step_s] if completed else []) + times.step_times,
                                   n_plan),
    })
    _rss_and_oom(extra, notes, rss, oom_info, "step")
    return MeasureResult(
        device=device,
        device_name=device_name,
        peak_allocated_bytes=int(rec.peak if rec else 0),
        peak_reserved_bytes=int(run.peak_reserved),
        device_used_bytes=int(device_used),
        breakdown=run.breakdown(),
        step_time_s=float(statistics.median(step_times)) if step_times else 0.0,
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
        first_step_s=float(times.first_step_s),
        distinct_shapes=len({st.shape for st in run_steps}),
        losses=tuple(times.losses),
        notes=tuple(notes),
        elapsed_s=time.perf_counter() - started,
        extra=extra,
        tokenizer=tokenizer_info(profile),
        trainable_params=int(trainable),
    )
