"""Traced estimator: real training (or inference) steps on meta tensors, every byte accounted.

The profile's model is built on ``meta`` (techniques applied, ``engine.models.build_model``) and
runs on ``meta`` tensors (shapes, dtypes and storages but no data: nothing is allocated;
``FakeTensorMode`` is ~10x slower here and cannot fake CUDA tensors on a CPU-only torch build).
Then the measured protocol runs (``engine.measure.runner``'s loop): the optimizer with its CUDA defaults (``foreach=True`` on CUDA, for-loop on CPU; ``fused=False``),
two steps of forward + loss + backward + optimizer step + ``zero_grad(set_to_none=True)`` (step 1
creates the optimizer states lazily, step 2 runs backward with states present: together they hold
every peak of the 3-step measurement), with gradient accumulation over up to two micro-batches.
``tracker.MemoryTracker`` records each storage's allocation and release; the peak, its phase, the
breakdown by category and the caching allocator's reserved bytes (``allocator.simulate``) follow.

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

from engine.estimate import tracker as trk
from engine.profile import Profile


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


_ARCH_FIELDS = ("model", "trust_remote_code", "mode", "task", "precision", "checkpointing",
                "checkpoint_every", "attn", "prune", "mlp", "ffn_chunks", "target")


@functools.lru_cache(maxsize=8)
def _cached_meta_model(key: tuple, teacher: bool) -> torch.nn.Module:
    from engine.models import build_model

    profile = Profile(**dict(zip(_ARCH_FIELDS, key)))
    if teacher:
        return build_model(profile, "meta", apply_techniques=False)
    return build_model(profile, "meta")


def _meta_model(profile: Profile, teacher: bool = False) -> torch.nn.Module:
    """A fresh copy of the profile's model (or its distillation teacher) on ``meta``.

    The built model is cached per architecture (the fields that change its structure); each
    trace gets a deep copy (tens of milliseconds) because a step attaches grads and hooks.
    """
    import copy

    if teacher:
        key = tuple(getattr(profile.replace(model=profile.distill_from, prune="", mlp="default",
                                            ffn_chunks=1, checkpointing=False, attn="sdpa"), f)
                    for f in _ARCH_FIELDS)
        model = copy.deepcopy(_cached_meta_model(key, True))
        model.to(teacher_dtype(profile))
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model
    key = tuple(getattr(profile, f) for f in _ARCH_FIELDS)
    model = copy.deepcopy(_cached_meta_model(key, False))
    if hasattr(getattr(model, "config", None), "use_cache"):
        model.config.use_cache = False  # as measure: a scoring forward returns no KV cache
    return model


def teacher_dtype(profile: Profile) -> torch.dtype:
    """Teacher weights' dtype: the distillation technique's rule for the target, else the student's."""
    try:
        from engine.techniques import distillation as dist  # another engineer's module

        fn = getattr(dist, "teacher_dtype", None)
        if fn is not None:
            return fn(profile, profile.target)
    except ImportError:
        pass
    from engine.models import dtype_of

    return dtype_of(profile)


def _distill_loss_fn():
    try:
        from engine.techniques import distillation as dist

        for name in ("distillation_loss", "distill_loss"):
            fn = getattr(dist, name, None)
            if fn is not None:
                return fn
    except ImportError:
        pass
    return default_distill_loss


def default_distill_loss(student_logits, teacher_logits, labels, profile=None,
                         temperature: float = 2.0, alpha: float = 0.5):
    """Hinton et al. 2015: T^2 * KL(softmax(t/T) || softmax(s/T)) mixed with the hard-label CE."""
    import torch.nn.functional as F

    vocab = student_logits.shape[-1]
    s = student_logits.float().reshape(-1, vocab)  # (N, V)
    t = teacher_logits.float().reshape(-1, vocab)  # (N, V)
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                  reduction="batchmean", log_target=True) * temperature ** 2
    ce = F.cross_entropy(s, labels.reshape(-1), ignore_index=-100)
    return (1 - alpha) * kl + alpha * ce


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


def _make_inputs(b: int, t: int, task: str, has_padding: bool, device: str = "meta",
                 labels: bool = True):
    """The tensors measure copies to the device: ids, mask (and labels when training)."""
    ids = torch.zeros((b, t), dtype=torch.long, device=device)  # (B, T)
    mask = torch.ones((b, t), dtype=torch.long, device=device)  # (B, T)
    if not labels:
        return ids, mask, None
    if task == "classification":
        lab = torch.zeros((b,), dtype=torch.long, device=device)  # (B,)
    else:
        lab = torch.zeros((b, t), dtype=torch.long, device=device)  # (B, T), -100 at padding
    return ids, mask, lab


@contextlib.contextmanager
def _nullctx():
    yield


def trace_step(profile: Profile, batch_shape: tuple[int, int], *, has_padding: bool = True,
               model: torch.nn.Module | None = None, teacher: torch.nn.Module | None = None,
               fake: bool = True, steps: int = 2,
               should_stop: Callable[[], bool] | None = None) -> TraceOutcome:
    """Run the measured protocol for one batch shape on meta tensors (or on real CPU tensors when
    ``fake`` is False and a real ``model`` is given, for validation) and account every byte."""
    from engine.errors import BadInput, Cancelled
    from engine.models import count_parameters, find_layers, load_config, resolve_task

    target = profile.target
    cuda = target == "cuda"
    config = load_config(profile.model, profile.trust_remote_code)
    task = resolve_task(profile, config)
    device = "meta" if fake else "cpu"
    if model is None:
        model = _meta_model(profile)
    if profile.distill_from and teacher is None and profile.mode == "train":
        teacher = _meta_model(profile, teacher=True)
    params = count_parameters(model)

    amp = {"bf16-amp": torch.bfloat16, "fp16-amp": torch.float16}.get(profile.precision)
    emu = None
    if fake:
        from engine.estimate.cuda_emulation import CudaEmulation

        emu = CudaEmulation(autocast_dtype=amp, target=target)
    tracker = trk.MemoryTracker(cuda_rounding=cuda, scalar=_Scalars(has_padding))
    for p in list(model.parameters()) + list(model.buffers()):
        tracker.track(p, trk.WEIGHTS)
    if teacher is not None:
        for p in list(teacher.parameters()) + list(teacher.buffers()):
            tracker.track(p, trk.WEIGHTS)
    tracker.mark_phase("start")

    # Per-block activation accounting (first forward only).
    hooks = []
    with contextlib.suppress(BadInput):  # a model without a block list still gets totals
        layers_path, layers = find_layers(model)
        for i, layer in enumerate(layers):
            name = f"{layers_path}.{i}"

            def pre(_m, _a, name=name):
                tracker.current_layer = name

            def post(_m, _a, _o):
                tracker.current_layer = ""

            hooks.append(layer.register_forward_pre_hook(pre))
            hooks.append(layer.register_forward_hook(post))

    def autocast_ctx():
        if amp is None:
            return _nullctx()
        if emu is not None:
            return _EmuAutocast(emu)
        return torch.autocast("cpu", dtype=amp)

    def pack(t):
        tracker.classify(t, trk.ACTIVATIONS)
        return t

    def unpack(t):
        return t

    training = profile.mode == "train"
    b, t = batch_shape
    distill = _distill_loss_fn() if teacher is not None else None
    peak_step = 1
    modes = [m for m in (emu, tracker) if m is not None]
    with contextlib.ExitStack() as stack:
        for m in modes:
            stack.enter_context(m)
        if emu is not None and cuda:
            from engine.estimate.cuda_emulation import cuda_local_attention

            stack.enter_context(cuda_local_attention())
        if training:
            model.train()
            trainable = [p for p in model.parameters() if p.requires_grad]
            for p in trainable:
                p.register_post_accumulate_grad_hook(
                    lambda p: tracker.classify(p.grad, trk.GRADIENTS))
            opt = _optimizer(profile, trainable, cuda)
            if teacher is not None:
                teacher.eval()
            micro = _micro_sizes(b, profile.micro_batches)
            for step in range(steps):
                before_peak = tracker.peak
                for j, mb in enumerate(micro[:2]):
                    if should_stop is not None and should_stop():
                        raise Cancelled("estimate cancelled")
                    tracker.mark_phase("forward")
                    # measure copies each micro-batch to the device inside the step
                    ids, mask, labels = _make_inputs(mb, t, task, has_padding, device)
                    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                        with autocast_ctx():
                            if teacher is not None:
                                with torch.no_grad():
                                    t_logits = teacher(input_ids=ids, attention_mask=mask).logits
                                logits = model(input_ids=ids, attention_mask=mask).logits
                                loss = distill(logits, t_logits, labels, profile)
                                del t_logits, logits
                            else:
                                loss = model(input_ids=ids, attention_mask=mask,
                                             labels=labels).loss
                        if len(micro) > 1:
                            loss = loss / len(micro)
                        if profile.precision == "fp16-amp":
                            loss = loss * 65536.0  # GradScaler.scale
                        tracker.layer_tracking = False
                        tracker.mark_phase("backward")
                        if emu is not None:
                            emu.backward(loss)
                        else:
                            loss.backward()
                        del loss
                    del ids, mask, labels
                tracker.mark_phase("optimizer")
                if profile.precision == "fp16-amp":  # GradScaler.unscale_: in place
                    grads = [p.grad for p in trainable if p.grad is not None]
                    if grads:
                        torch._foreach_mul_(grads, 1.0 / 65536.0)
                    del grads
                opt.step()
                for state in opt.state.values():
                    for v in state.values():
                        if isinstance(v, torch.Tensor):
                            tracker.classify(v, trk.OPTIMIZER)
                opt.zero_grad(set_to_none=True)
                tracker.mark_phase("end")
                if tracker.peak > before_peak:
                    peak_step = step + 1
        else:
            model.eval()
            w = profile.chunk_input
            tw = min(w, t) if w else t
            ids, mask, _labels = _make_inputs(b, tw, task, has_padding, device, labels=False)
            tracker.mark_phase("forward")
            with torch.no_grad(), autocast_ctx():
                out = model(input_ids=ids, attention_mask=mask)
                del out
            del ids, mask, _labels
    for h in hooks:
        h.remove()
    peak_event = tracker.peak_event
    outcome = TraceOutcome(
        peak_allocated=tracker.peak,
        breakdown=tracker.breakdown_at(peak_event),
        peak_phase=tracker.phase_at(peak_event),
        peak_step=peak_step,
        events=list(tracker.events),
        layer_activations=tracker.layer_activation_bytes(),
        params=params,
        backends=tuple(sorted(set(emu.backend_log))) if emu is not None else (),
        timeline=tuple(tracker.timeline),
    )
    tracker.detach()
    return outcome


class _EmuAutocast:
    def __init__(self, emu):
        self.emu = emu

    def __enter__(self):
        self.emu.set_autocast(True)

    def __exit__(self, *exc):
        self.emu.set_autocast(False)


def _micro_sizes(b: int, n: int) -> list[int]:
    """Rows per micro-batch as ``torch.tensor_split`` cuts them (largest first)."""
    k = max(1, min(n, b))
    base, extra = divmod(b, k)
    return [base + (1 if i < extra else 0) for i in range(k)]


def _optimizer(profile: Profile, params, cuda: bool):
    """The optimizer with its defaults for the target device (foreach on CUDA, fused off)."""
    foreach = bool(cuda)
    if profile.optimizer == "sgd":
        return torch.optim.SGD(params, lr=1e-3, foreach=foreach)
    return torch.optim.AdamW(params, lr=1e-4, foreach=foreach)

