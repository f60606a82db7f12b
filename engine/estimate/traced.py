"""Traced estimator: real training (or inference) steps on meta tensors, every byte accounted.

The profile's model is built on ``meta`` (techniques applied, ``engine.models.build_model``) and
runs on ``meta`` tensors (shapes, dtypes and storages but no data: nothing is allocated;
``FakeTensorMode`` is ~10x slower here and cannot fake CUDA tensors on a CPU-only torch build).
Then the measured protocol runs (``engine.measure.loop``), on the step tensors measure makes
(``engine.measure.inputs``): the optimizer with its CUDA defaults (``foreach=True`` on CUDA,
for-loop on CPU; ``fused=False``),
two steps of forward + loss + backward + optimizer step + ``zero_grad(set_to_none=True)`` (step 1
creates the optimizer states lazily, step 2 runs backward with states present: together they hold
every peak of the 3-step measurement), with gradient accumulation over up to two micro-batches.
``engine.measure.probes.LiveBytesTracker`` (the CPU measure's tracker, recording) logs each
storage's allocation and release with its category (priority: weights, gradients, optimizer,
activations, i.e. saved for backward via ``saved_tensors_hooks``, then temporaries); the peak, its
phase, the breakdown by category and the caching allocator's reserved bytes
(``allocator.simulate``) follow.

For a CUDA target, ``cuda_emulation.CudaEmulation`` replays CUDA's autocast op lists, fused
dropout and SDPA kernel choice and memory (flash / memory-efficient keep no T x T matrix), and
storages are rounded to the allocator's 512-byte blocks; local attention takes its CUDA path
(FlexAttention, emulated) instead of the blocked CPU fallback.

Sources: the measurement protocol of DESIGN.md ("What measured means"); PyTorch's MemTracker for
the categories; ``torch/optim/adam.py: _multi_tensor_adam`` (the foreach step's ``exp_avg_sq_sqrt``
temporary, one parameter-group's worth); ``transformers/loss/loss_utils.py: ForCausalLMLoss``
(``logits.float()`` upcast, then cross entropy).

Known limitations: allocations made inside CUDA kernels that are not tensors returned to Python
(cuBLAS/cuBLASLt workspaces, cuDNN workspaces, NCCL) are added as constants from ``device.py``;
kernels' internal scratch beyond the flash/efficient attention model is not seen; a technique that
branches on ``tensor.device.type == "cuda"`` takes its CPU branch here; data-dependent Python
control flow is answered as a padded batch would (``has_padding``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine.measure.inputs import micro_parts, placeholder_step, to_device
from engine.measure.probes import LiveBytesTracker
from engine.profile import Profile
from engine.results import ALLOCATED_CATEGORIES, MemoryCategory
from engine import techniques


@dataclass
class TraceOutcome:
    peak_allocated: int  # bytes, inputs/weights included (CUDA: 512-byte blocks)
    breakdown: dict[str, int]  # at the peak, by category
    peak_phase: str  # forward | backward | optimizer | start
    peak_step: int  # 1-based step of the peak
    events: list[tuple[int, int]]  # allocation id, +size / -size (for the allocator model)
    layer_activations: dict[str, int]  # per transformer block: bytes saved for backward
    params: int
    backends: tuple[str, ...] = ()  # SDPA backends chosen (CUDA emulation)
    timeline: tuple[tuple[str, int], ...] = ()  # (phase starting, live bytes at that point)
    notes: list[str] = field(default_factory=list)
    costs: object = None  # speed.StepCosts of every op, by "step:phase" (count_speed=True)
    #: (phase, moment, breakdown) of each phase's fullest moment and of each backward's end, for a
    #: data-parallel rank (engine.estimate.sharding turns them into the rank's)
    phase_points: tuple = ()
    trainable_params: int = 0  # parameters with gradients (training)
    optimizer_state_bytes: int = 0  # the optimizer's state after its first step
    #: the weight storages tracked before the step, in order: (allocation id, bytes, floating)
    weights: tuple[tuple[int, int, bool], ...] = ()
    #: the model's build as it allocates on a device (``_cached_meta_model``): (id, +/-bytes)
    #: with the surviving storages under their ids in ``events``, the rest under
    #: ("__build__", n); empty where it does not apply (quantized, extra models)
    build_events: tuple[tuple[object, int], ...] = ()
    #: indices into ``events`` just after step 1's first cuBLAS call of the forward and, in
    #: training, of the backward (each allocates its cuBLAS workspace there: ``_Tracker``)
    workspace_at: tuple[int, ...] = ()


C = MemoryCategory
#: The tracker's categories, highest priority first (a storage keeps the highest it was given).
_LABELS = tuple(c.value for c in ALLOCATED_CATEGORIES)

@functools.lru_cache(maxsize=8)
def _cached_meta_model(key: tuple) -> tuple[torch.nn.Module, tuple]:
    """The model built on ``meta`` and its build's allocations, recorded as on a device.

    ``build_model`` allocates more than the weights it returns: a tied LM head's own weight is
    made and dropped when ``tie_weights`` replaces it, and a config whose ``dtype`` is not the
    profile's is built in that dtype and then converted tensor by tensor. Those blocks stay in
    the caching allocator and count in the run's reserved (Gemma-3-like: a 640 MiB segment). The
    build's events come in allocation order; the surviving storages are named by their index in
    the weights' order (parameters, then buffers, each storage once), the rest ("__build__", n).
    """
    from engine.models import build_model

    tracker = LiveBytesTracker(device="meta", block_bytes=512, record=True)
    with tracker:
        model = build_model(Profile(**dict(key)), "meta")
    tracker.detach()
    final: dict[int, int] = {}
    for t in (*model.parameters(), *model.buffers()):
        uid = tracker.allocation_id(t)
        if uid is not None and uid not in final:
            final[uid] = len(final)
    events = tuple((("__weight__", final[u]) if u in final else ("__build__", u), d)
                   for u, d in tracker.events)
    return model, events


def _meta_model(profile: Profile, with_build: bool = False):
    """A fresh copy of the profile's model on ``meta`` (and, ``with_build``, its build's events:
    ``_cached_meta_model``; none for a quantized model).

    The built model is cached per architecture (the fields that change its structure); each
    trace gets a deep copy (tens of milliseconds) because a step attaches grads and hooks.
    """
    import copy

    from engine.estimate.analytic import _arch_fields

    key = tuple((f, getattr(profile, f)) for f in _arch_fields() + ("target",))
    if profile.quant != "none":
        # bitsandbytes' packed meta parameters do not deep-copy (set_data across tensor types):
        # a fresh build on meta instead (allocates nothing)
        from engine.models import build_model

        model, build = build_model(profile, "meta"), ()
    else:
        cached, build = _cached_meta_model(key)
        model = copy.deepcopy(cached)
    if hasattr(getattr(model, "config", None), "use_cache"):
        model.config.use_cache = False  # as measure: a scoring forward returns no KV cache
    return (model, build) if with_build else model


#: ATen ops that call cuBLAS on CUDA: the first one on a thread creates that thread's cuBLAS
#: handle and its workspace (``getCurrentCUDABlasHandle``); the backward runs on autograd's
#: device thread, so it makes a second one. On an H200 both land just after the first GEMM's
#: output (allocator traces, results/verify_h200_2026-12-02/call13).
_CUBLAS_OPS = frozenset(getattr(torch.ops.aten, n) for n in (
    "mm", "addmm", "bmm", "baddbmm", "addbmm", "_addmm_activation", "mv", "addmv", "dot",
    "vdot", "_scaled_mm", "_int_mm") if hasattr(torch.ops.aten, n))


_SAFE_SOFTMAX = getattr(torch.ops.aten, "_safe_softmax", None)
_SAFE_SOFTMAX = _SAFE_SOFTMAX.default if _SAFE_SOFTMAX is not None else None


class _Tracker(LiveBytesTracker):
    """The live-bytes tracker of a trace; for a CUDA target (``cuda``) it also notes, per phase
    mark, the event index after the phase's first cuBLAS call (``_CUBLAS_OPS``) and makes the
    blocks ``_safe_softmax`` makes on CUDA."""

    def __init__(self, *args, cuda: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.cuda = cuda
        self.first_cublas: dict[int, int] = {}  # index in phase_marks -> index in events

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.cuda:
            return super().__torch_dispatch__(func, types, args, kwargs)
        if func is _SAFE_SOFTMAX:
            return self._safe_softmax(func, types, args, kwargs)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if func.overloadpacket in _CUBLAS_OPS:
            self.first_cublas.setdefault(len(self.phase_marks) - 1, len(self.events))
        return out

    def _safe_softmax(self, func, types, args, kwargs):
        """``_safe_softmax`` (SDPA's math path) is one op on meta; on CUDA it also makes a bool
        ``eq(-inf)`` mask of its input's shape and the rows' ``all`` after its output, freed on
        return (on an H200: +output, +mask, -mask in Llama-3.2-1B fp32's allocator trace; the
        mask's blocks moved Qwen2.5-0.5B LoRA fp32's reserved by 10%: results/verify_h200_2026-12-02/call15)."""
        out = super().__torch_dispatch__(func, types, args, kwargs)
        x, dim = args[0], args[1]
        masked = torch.empty_like(x, dtype=torch.bool)
        self.track(masked)
        shape = list(x.shape)
        shape[dim] = 1
        rows = torch.empty(shape, dtype=torch.bool, device=x.device)
        self.track(rows)
        del rows, masked
        return out

    def workspace_at(self, training: bool) -> tuple[int, ...]:
        """Event indices of step 1's first cuBLAS call in forward (and backward, training)."""
        names = [p for _i, p in self.phase_marks]
        out = []
        for phase in ("forward", "backward") if training else ("forward",):
            if phase in names:
                at = self.first_cublas.get(names.index(phase))
                if at is not None:
                    out.append(at)
        return tuple(out)


class _Scalars:
    """Answers for data-dependent ``.item()`` calls on fake tensors, as a real batch would."""

    def __init__(self, has_padding: bool):
        self.has_padding = has_padding

    def __call__(self, t: torch.Tensor):
        if t.dtype == torch.bool:
            # HF asks "is every token real?" (padding_mask.all()) to skip the mask.
            return not self.has_padding
        if t.is_floating_point():
            return 1.0
        return 1


def trace_step(profile: Profile, batch_shape: tuple[int, int], *, has_padding: bool = True,
               model: torch.nn.Module | None = None,
               fake: bool = True, steps: int = 2,
               should_stop: Callable[[], bool] | None = None,
               count_speed: bool = False) -> TraceOutcome:
    """Run the measured protocol for one batch shape on meta tensors (or on real CPU tensors when
    ``fake`` is False and a real ``model`` is given, for validation) and account every byte."""
    from engine.errors import BadInput, Cancelled
    from engine.estimate.analytic import EMBEDDINGS_ROW, HEAD_ROW
    from engine.models import count_parameters, find_layers, load_config, resolve_task

    target = profile.target
    cuda = target == "cuda"
    config = load_config(profile.model, profile.trust_remote_code)
    task = resolve_task(profile, config)
    device = "meta" if fake else "cpu"
    build: tuple = ()
    if model is None:
        model, build = _meta_model(profile, with_build=True)
    hooks_on = techniques.loop_hooks(profile)  # the techniques' training-step changes
    extras = [m for h in hooks_on if h.extra_models for m in h.extra_models(profile, device, target)]
    loss_hook = next((h.loss for h in hooks_on if h.loss is not None), None)
    keep_outputs = any(h.keep_outputs for h in hooks_on)  # outputs = model(...) kept to the next forward
    kept = None
    params = count_parameters(model)

    amp = {"bf16-amp": torch.bfloat16, "fp16-amp": torch.float16}.get(profile.precision)
    emu = None
    if fake:
        from engine.estimate.cuda_emulation import CudaEmulation

        from engine import gpus

        emu = CudaEmulation(autocast_dtype=amp, target=target,
                            flash=gpus.for_profile(profile).flash_attention)
    # Storages rounded to the CUDA caching allocator's 512-byte blocks (kMinBlockSize) on CUDA.
    tracker = _Tracker(cuda=cuda, block_bytes=512 if cuda else 0, labels=_LABELS,
                       layer_label=C.ACTIVATIONS.value, scalar=_Scalars(has_padding))
    weights = []
    for p in [t for m in (model, *extras) for t in (*m.parameters(), *m.buffers())]:
        uid = len(tracker.sizes)  # extras: frozen models beside the student (a distillation teacher)
        tracker.track(p, C.WEIGHTS.value)
        if len(tracker.sizes) > uid:  # a new storage (tied weights are tracked once)
            weights.append((uid, tracker.sizes[uid], p.is_floating_point()))
    tracker.mark("start")

    # Per-block activation accounting (first forward only).
    hooks = []
    with contextlib.suppress(BadInput):  # a model without a block list still gets totals
        layers_path, layers = find_layers(model)
        for i, layer in enumerate(layers):
            name = f"{layers_path}.{i}"

            def pre(_m, _a, name=name):
                # an edit in the app cancels a trace within one block, not one whole step
                if should_stop is not None and should_stop():
                    raise Cancelled("estimate cancelled")
                tracker.current_layer = name

            def post(_m, _a, _o):
                tracker.current_layer = HEAD_ROW  # until the next block: the final norm, the head

            hooks.append(layer.register_forward_pre_hook(pre))
            hooks.append(layer.register_forward_hook(post))

        # outside the blocks: before the first, the embeddings; after the LM head, the loss (whose
        # tensors the per-layer table takes from the analytic model's logits row)
        def before_model(_m, _a, _k):
            tracker.current_layer = EMBEDDINGS_ROW

        def after_head(_m, _a, _o):
            tracker.current_layer = ""

        hooks.append(model.register_forward_pre_hook(before_model, with_kwargs=True))
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if isinstance(output, torch.nn.Module):
            hooks.append(output.register_forward_hook(after_head))

    def autocast_ctx():
        return autocast_context(amp, emu)

    def pack(t):
        tracker.classify(t, C.ACTIVATIONS.value)
        return t

    def unpack(t):
        return t

    training = profile.mode == "train"
    b, t = batch_shape
    # The step tensors measure makes for this shape, split (and, inference, cut to the first
    # window) before tracking starts: only their copies to the device are counted, as in measure.
    step_data = placeholder_step(b, t, task, training)
    if training:
        micro = micro_parts(step_data, profile.micro_batches)
    else:
        w = profile.chunk_input
        tw = min(w, t) if w else t
        window = (step_data.input_ids[:, :tw], step_data.attention_mask[:, :tw])
    peak_step = 1
    trainable_params = 0
    state_bytes = 0
    modes = [m for m in (emu, tracker) if m is not None]
    costs = None
    if count_speed and fake:
        from engine.estimate.speed import make_counter

        def phase_of() -> str:  # "step:phase" from the tracker's marks
            marks = tracker.phase_marks
            return f"{sum(1 for _, p in marks if p == 'end')}:{marks[-1][1] if marks else 'start'}"

        costs, op_counter, sdpa_counter = make_counter(phase_of, emu)
        # below the tracker (it sees the ops the tracker lets through), above the emulation
        modes = [m for m in (emu, sdpa_counter, op_counter, tracker) if m is not None]
    with contextlib.ExitStack() as stack:
        if emu is not None and cuda:
            from engine.estimate.cuda_emulation import cuda_local_attention

            stack.enter_context(cuda_local_attention(model, *extras))
        for m in modes:
            stack.enter_context(m)
        if training:
            model.train()
            trainable = [p for p in model.parameters() if p.requires_grad]
            trainable_params = sum(p.numel() for p in trainable)
            for p in trainable:
                p.register_post_accumulate_grad_hook(
                    lambda p: tracker.classify(p.grad, C.GRADIENTS.value))
            opt = _optimizer(profile, trainable, cuda)
            for extra in extras:
                extra.eval()
            for step in range(steps):
                before_peak = tracker.peak_bytes
                for part in micro[:2]:
                    if should_stop is not None and should_stop():
                        raise Cancelled("estimate cancelled")
                    tracker.mark("forward")
                    # measure copies each micro-batch to the device inside the step
                    ids, mask, labels = (to_device(x, device) for x in part)
                    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                        with autocast_ctx():
                            if loss_hook is not None:
                                loss = loss_hook(model, extras, ids, mask, labels, profile)
                            elif keep_outputs:
                                # rebound after the forward: the previous outputs are freed only now
                                kept = model(input_ids=ids, attention_mask=mask, labels=labels)
                                loss = kept.loss
                            else:
                                loss = model(input_ids=ids, attention_mask=mask,
                                             labels=labels).loss
                        if len(micro) > 1:
                            loss = loss / len(micro)
                        if profile.precision == "fp16-amp":
                            loss = loss * 65536.0  # GradScaler.scale
                        tracker.layer_tracking = False
                        tracker.mark("backward")
                        if emu is not None:
                            emu.backward(loss)
                        else:
                            loss.backward()
                        del loss
                    del ids, mask, labels
                tracker.mark("optimizer")
                if profile.precision == "fp16-amp":  # GradScaler.unscale_: in place
                    grads = [p.grad for p in trainable if p.grad is not None]
                    if grads:
                        torch._foreach_mul_(grads, 1.0 / 65536.0)
                    del grads
                opt.step()
                for state in opt.state.values():
                    for v in state.values():
                        if isinstance(v, torch.Tensor):
                            tracker.classify(v, C.OPTIMIZER.value)
                opt.zero_grad(set_to_none=True)
                if step == 0:
                    from engine.optimizers import held_state_bytes

                    state_bytes = held_state_bytes(opt, 512 if cuda else 0)
                tracker.mark("end")
                if tracker.peak_bytes > before_peak:
                    peak_step = step + 1
        else:
            model.eval()
            ids, mask = (to_device(x, device) for x in window)
            tracker.mark("forward")
            with torch.no_grad(), autocast_ctx():
                out = model(input_ids=ids, attention_mask=mask)
                del out
            del ids, mask
    for h in hooks:
        h.remove()
    peak_event = tracker.peak_event
    points = _phase_points(tracker) if profile.shard != "none" and training else ()
    outcome = TraceOutcome(
        peak_allocated=tracker.peak_bytes,
        breakdown=tracker.breakdown_at(peak_event),
        peak_phase=tracker.phase_at(peak_event),
        peak_step=peak_step,
        events=list(tracker.events),
        layer_activations=tracker.layer_bytes(),
        params=params,
        backends=tuple(sorted(set(emu.backend_log))) if emu is not None else (),
        timeline=tuple(tracker.timeline),
        costs=costs,
        phase_points=points,
        trainable_params=trainable_params,
        optimizer_state_bytes=state_bytes,
        weights=tuple(weights),
        build_events=_build_events(build, weights) if not extras else (),
        workspace_at=tracker.workspace_at(training) if cuda else (),
    )
    tracker.detach()
    return outcome


def _build_events(build: tuple, weights: list) -> tuple:
    """The cached build's events with the surviving storages under this trace's weight ids;
    empty when the two disagree (a model given by the caller, a different storage count)."""
    n = sum(1 for u, d in build if d > 0 and u[0] == "__weight__")
    if not build or n != len(weights):
        return ()
    ids = [u for u, _n, _f in weights]
    return tuple((ids[u[1]] if u[0] == "__weight__" else u, d) for u, d in build)


def autocast_context(amp, emu):
    """The step's autocast on meta tensors: none (fp32), the CUDA emulation's (a CUDA target), or
    CPU autocast to ``amp``. Shared by the traced training step and the traced generation."""
    import torch

    if amp is None:
        return contextlib.nullcontext()
    if emu is not None:
        return _EmuAutocast(emu)
    return torch.autocast("cpu", dtype=amp)


def _phase_points(tracker) -> tuple:
    """The fullest moment of every phase of the trace and the last moment of every backward,
    each with its breakdown by category."""
    marks = list(tracker.phase_marks) + [(len(tracker.events), "end")]
    live, cum = 0, []
    for _uid, delta in tracker.events:
        live += delta
        cum.append(live)
    out = []
    for (start, phase), (stop, _next) in zip(marks, marks[1:]):
        if phase not in ("forward", "backward", "optimizer") or stop <= start:
            continue
        best = max(range(start, stop), key=cum.__getitem__)
        out.append((phase, "", tracker.breakdown_at(best)))
        if phase == "backward":
            out.append((phase, "end", tracker.breakdown_at(stop - 1)))
    return tuple(out)


class _EmuAutocast:
    def __init__(self, emu):
        self.emu = emu

    def __enter__(self):
        self.emu.set_autocast(True)

    def __exit__(self, *exc):
        self.emu.set_autocast(False)


def _optimizer(profile: Profile, params, cuda: bool):
    """The optimizer with its defaults for the target device (foreach on CUDA, fused off)."""
    from engine.optimizers import SGD_MOMENTUM, make_optimizer

    foreach = bool(cuda)  # meta tensors would pick the for-loop
    if profile.optimizer == "sgd":
        return torch.optim.SGD(params, lr=1e-3, momentum=SGD_MOMENTUM, foreach=foreach)
    if profile.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, foreach=foreach)
    # bitsandbytes' optimizers run on meta tensors (their ops have fake kernels); Adafactor's
    # data-dependent scalars are answered by the tracker
    opt = make_optimizer(profile.optimizer, params)
    if getattr(opt, "is_paged", False):
        opt.get_state_buffer = functools.partial(_paged_state_buffer, cuda)
    return opt


def _paged_state_buffer(cuda: bool, p, dtype=torch.float32):
    """bitsandbytes' paged state buffer on meta: large ones are CUDA managed memory, outside
    torch's allocator (made outside the tracker, so not counted); on CPU it falls back to a plain
    tensor, as bitsandbytes does."""
    from torch.utils._python_dispatch import _disable_current_modes

    from engine.optimizers import BNB_PAGED_MIN

    if cuda and p.numel() >= BNB_PAGED_MIN:
        with _disable_current_modes():
            buf = torch.zeros_like(p, dtype=dtype)
        buf._headroom_managed = True  # engine.optimizers.held_state_bytes leaves it out
        return buf
    return torch.zeros_like(p, dtype=dtype)

