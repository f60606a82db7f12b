"""Speed estimate: step time and tokens/s of a profile's measured run on a catalog GPU.

Two ways, one time model:

* **traced** (``OpCounter``, during ``traced.trace_step``): every ATen op of the measured step on
  meta tensors, with its FLOPs (``torch.utils.flop_counter``'s formula table, the one
  ``FlopCounterMode`` uses) and the bytes it reads and writes; fused SDPA kernels (emulated, so no
  ATen matmul runs) get the flash/efficient FLOPs from their shapes, forward at the call and
  backward when autograd reaches them (so checkpoint recompute is counted as it happens).
* **analytic** (``analytic_costs``): the same quantities in closed form from the architecture
  (matmul parameters x tokens, attention T^2, activation and optimizer traffic, op counts per
  block), microseconds.

Time of one step on a GPU (``step_time``): each op class against its roofline,
``max(FLOPs / (peak x e_compute), bytes / (bandwidth x e_memory), kernel floor)``, summed over the
ops (the GPU's time), against the host's time to issue them (``ops x host_op_s``: PyTorch eager,
autograd and Python per op; the bert-base 8x512 steps on the H200 were host-bound, 17 ms of CUDA
time against ~66 ms of host time), whichever is longer, plus the part of the shorter one that
does not overlap (the step's synchronisations) and a fixed per-step cost. The
efficiencies and host costs are fitted to measured runs by ``bench/fit_speed.py`` and read from
``engine/resources/speed_calibration.json``, with the calibration's median and worst error, which
every estimate reports as its expected error. Variable batch shapes add a first-pass cost per new
shape (cuBLAS heuristics, kernel loading), reported apart from the steady tokens/s, as measure
reports its steady step time.
"""

from __future__ import annotations

import functools
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

#: Op classes of the roofline.
MATMUL, ATTENTION, MEMORY = "matmul", "attention", "memory"


@dataclass(frozen=True)
class Calibration:
    e_matmul_half: float = 0.55  # achieved / peak for fp16/bf16 matmuls
    e_matmul_fp32: float = 0.70  # achieved / peak for fp32 matmuls (fp32 cores)
    e_attention: float = 0.40  # fused attention kernels / half peak
    e_memory: float = 0.60  # achieved / peak memory bandwidth, memory-bound ops
    kernel_floor_s: float = 4e-6  # shortest kernel (launch + tail)
    host_op_s: float = 22e-6  # host time to issue one op from Python (modules, the optimizer)
    host_op_infer_s: float = 22e-6  # ... with grad mode off (inference, decoding): no autograd
    #                                 graph to record, no tensors to save
    host_op_bwd_s: float = 8e-6  # ... from autograd's C++ engine (backward, grad mode off)
    step_fixed_s: float = 1.5e-3  # per training step: host work outside ops (zero_grad, loss.item)
    step_fixed_infer_s: float = 0.5e-3  # per inference step
    first_shape_s: float = 0.45  # one-time cost of a new batch shape (first step minus steady)
    serial_share: float = 0.2  # share of the shorter of GPU/host time not hidden under the longer
    #                            (syncs at the loss, the optimizer and step boundaries)
    # calibration scores (bench/fit_speed.py): relative error of tokens/s
    median_error: float = 0.0
    worst_error: float = 0.0
    rows: int = 0
    source: str = "uncalibrated defaults"
    # analytic closed form, fitted to traced counts
    act_bytes_per_token_hidden: float = 60.0  # memory-bound bytes per (token x hidden x layer), fwd
    ops_per_layer_fwd: float = 40.0
    ops_fixed_fwd: float = 30.0
    bwd_ops_ratio: float = 1.8
    #: host ops per phase ("infer_forward", "train_forward", "backward") from the block's modules:
    #: {feature: ops} with the features of ``host_op_features`` per block, and "fixed" once
    host_ops_model: dict = field(default_factory=dict, hash=False)


#: What a block is made of, for its host-op count (``analytic.Arch.block_modules``).
HOST_OP_FEATURES = ("block", "linear", "rmsnorm", "layernorm", "dropout", "other", "rotary",
                    "half_linear", "half_norm")


def host_op_features(arch, half: bool) -> dict[str, float]:
    """Per-block counts that the host's ops follow: each Linear, norm and dropout module issues a
    few ATen ops (an RMSNorm about six, a LayerNorm one), rotary positions a dozen, and autocast a
    cast per Linear input and norm output."""
    k = dict(arch.block_modules)
    norms = k.get("rmsnorm", 0) + k.get("layernorm", 0)
    return {"block": 1.0, "linear": float(k.get("linear", 0)), "rmsnorm": float(k.get("rmsnorm", 0)),
            "layernorm": float(k.get("layernorm", 0)), "dropout": float(k.get("dropout", 0)),
            "other": float(k.get("other", 0)), "rotary": float(bool(arch.rotary)),
            "half_linear": float(half) * k.get("linear", 0), "half_norm": float(half) * norms}


def analytic_host_ops(arch, phase: str, half: bool, cal: "Calibration") -> float | None:
    """Host ops of one pass (``phase``: infer_forward, train_forward or backward) from the block's
    modules, or None without a fitted model (the per-layer constants apply)."""
    model = (cal.host_ops_model or {}).get(phase)
    if not model or not arch.block_modules:
        return None
    x = host_op_features(arch, half)
    per_block = sum(model.get(k, 0.0) * v for k, v in x.items())
    return max(1.0, arch.layers * per_block + model.get("fixed", 0.0))


@functools.lru_cache(maxsize=1)
def calibration() -> Calibration:
    from importlib import resources

    try:
        text = resources.files("engine.resources").joinpath("speed_calibration.json").read_text()
    except (FileNotFoundError, ModuleNotFoundError):
        return Calibration()
    data = json.loads(text)
    known = set(Calibration.__dataclass_fields__)
    return Calibration(**{k: v for k, v in data.get("constants", data).items() if k in known})


# ----- what a step does -------------------------------------------------------------------------
@dataclass
class StepCosts:
    """One step's ops, grouped: (class, half, flops, bytes) -> count, per phase."""

    ops: dict[str, Counter] = field(default_factory=dict)  # phase -> Counter[(cls, half, fl, by)]
    host_ops: dict[str, float] = field(default_factory=dict)  # phase -> ops issued by the host

    def add(self, phase: str, cls: str, half: bool, flops: float, nbytes: float,
            host: float = 1.0, kernels: int = 1) -> None:
        c = self.ops.setdefault(phase, Counter())
        c[(cls, bool(half), float(flops), float(nbytes), int(kernels))] += 1
        self.host_ops[phase] = self.host_ops.get(phase, 0.0) + host

    def scaled(self, factors: dict[str, float]) -> "StepCosts":
        out = StepCosts()
        for phase, c in self.ops.items():
            f = factors.get(phase, 1.0)
            out.ops[phase] = Counter({k: v * f for k, v in c.items()})
            out.host_ops[phase] = self.host_ops.get(phase, 0.0) * f
        return out

    def totals(self) -> dict[str, float]:
        flops = sum(k[2] * n for c in self.ops.values() for k, n in c.items())
        nbytes = sum(k[3] * n for c in self.ops.values() for k, n in c.items())
        return {"flops": flops, "bytes": nbytes, "host_ops": sum(self.host_ops.values()),
                "kernels": sum(k[4] * n for c in self.ops.values() for k, n in c.items())}

    def to_json(self) -> dict[str, Any]:
        return {"ops": {p: [[*k, n] for k, n in c.items()] for p, c in self.ops.items()},
                "host_ops": dict(self.host_ops)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "StepCosts":
        out = cls()
        for p, rows in d["ops"].items():
            out.ops[p] = Counter({(r[0], bool(r[1]), float(r[2]), float(r[3]), int(r[4])): r[5]
                                  for r in rows})
        out.host_ops = {p: float(v) for p, v in d["host_ops"].items()}
        return out


def step_time(costs: StepCosts, gpu, cal: Calibration | None = None) -> dict[str, float]:
    """Seconds of one step on ``gpu`` (an ``engine.gpus.GPU``): GPU time (roofline per op), host
    time, and the step (the longer of the two plus the fixed cost)."""
    cal = cal or calibration()
    bw = gpu.bandwidth * cal.e_memory
    half_peak = gpu.peak_flops("bf16")
    fp32_peak = gpu.peak_flops("fp32")
    gpu_s = 0.0
    by_class = {MATMUL: 0.0, ATTENTION: 0.0, MEMORY: 0.0}
    for c in costs.ops.values():
        for (cls, half, flops, nbytes, kernels), n in c.items():
            if cls == ATTENTION:
                rate = half_peak * cal.e_attention if half else fp32_peak * cal.e_matmul_fp32
            elif half:
                rate = half_peak * cal.e_matmul_half
            else:
                rate = fp32_peak * cal.e_matmul_fp32
            t = max(flops / rate if flops else 0.0, nbytes / bw, cal.kernel_floor_s * kernels)
            gpu_s += t * n
            by_class[cls] += t * n
    training = "backward" in costs.ops or "optimizer" in costs.ops
    per_op = cal.host_op_s if training else cal.host_op_infer_s  # no_grad: nothing recorded
    host_s = sum(n * (cal.host_op_bwd_s if phase == "backward" else per_op)
                 for phase, n in costs.host_ops.items())
    fixed = cal.step_fixed_s if training else cal.step_fixed_infer_s
    step = max(gpu_s, host_s) + cal.serial_share * min(gpu_s, host_s) + fixed
    return {"step_s": step, "gpu_s": gpu_s, "host_s": host_s, **{f"{k}_s": v for k, v in by_class.items()}}


# ----- the traced counter -----------------------------------------------------------------------
def _no_kernel_ops():
    import torch

    aten = torch.ops.aten
    return {aten.detach.default, aten.empty.memory_format, aten.empty_strided.default,
            aten.empty_like.default, aten.lift_fresh.default, aten._local_scalar_dense.default,
            aten.alias.default, aten.new_empty.default, aten.new_empty_strided.default}


def _nbytes(t) -> int:
    try:
        n = t.numel() * t.element_size()
        return min(n, t.untyped_storage().nbytes()) if t.numel() else 0
    except (RuntimeError, NotImplementedError):
        return 0


_HALF = None


def _tensors(x, out: list) -> list:
    import torch

    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, (list, tuple)):
        for y in x:
            _tensors(y, out)
    return out


#: A foreach op launches one kernel per this many tensors (``multi_tensor_apply``'s chunks are
#: bounded by ``depth_to_max_tensors``: 110 tensors for one list, 24-64 for several).
FOREACH_TENSORS_PER_KERNEL = 36


def make_counter(step_phase, emu=None):
    """A dispatch mode recording each op's cost into a ``StepCosts`` under ``step_phase()`` (the
    traced step's "step:phase"), and a function mode counting fused SDPA FLOPs (``emu``: the CUDA
    emulation whose backend log says which kernel ran). In backward, ops issued with grad mode on
    are a checkpoint's recompute (Python modules: "recompute"); autograd's own run with it off."""
    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    skip = _no_kernel_ops()

    def phase_of() -> str:
        sp = step_phase()
        if sp.endswith(":backward") and torch.is_grad_enabled():
            return sp[: -len("backward")] + "recompute"
        return sp
    half = (torch.float16, torch.bfloat16)
    costs = StepCosts()

    class OpCounter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if func in skip or getattr(func, "is_view", False):
                return out
            ins = _tensors(args, [])
            _tensors(list(kwargs.values()), ins)
            outs = _tensors(out, [])
            if not ins and not outs:
                return out
            nbytes = sum(_nbytes(t) for t in ins) + sum(_nbytes(t) for t in outs)
            flops = 0
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                try:
                    flops = formula(*args, **kwargs, out_val=out)
                except Exception:  # noqa: BLE001 - an op variant the formula does not take
                    flops = 0
            is_half = any(t.dtype in half for t in ins if t.is_floating_point())
            name = func._overloadpacket.__name__
            kernels = 1
            if name.startswith("_foreach_"):
                n = max(len(a) for a in args if isinstance(a, (list, tuple))) if args else 1
                kernels = max(1, math.ceil(n / FOREACH_TENSORS_PER_KERNEL))
            cls = ATTENTION if "scaled_dot_product" in name else MATMUL if flops else MEMORY
            costs.add(phase_of(), cls, is_half, flops, nbytes, host=1.0, kernels=kernels)
            return out

    class SdpaCounter(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is not torch.nn.functional.scaled_dot_product_attention:
                return func(*args, **kwargs)
            before = len(emu.backend_log) if emu is not None else 0
            out = func(*args, **kwargs)
            backend = emu.backend_log[-1] if emu is not None and len(emu.backend_log) > before else ""
            if backend not in ("flash", "efficient"):
                return out  # math: its matmuls and softmax are ATen ops, counted as they run
            q, k, v = args[:3]
            b, h, t, d = q.shape
            s = k.shape[-2]
            causal = bool(kwargs.get("is_causal", args[5] if len(args) > 5 else False))
            fwd = 4.0 * b * h * t * s * d * (0.5 if causal else 1.0)  # causal: masked blocks skipped
            io = sum(_nbytes(x) for x in (q, k, v, out))
            is_half = q.dtype in half
            costs.add(phase_of(), ATTENTION, is_half, fwd, io, host=0.0)
            if isinstance(out, torch.Tensor) and out.requires_grad:
                def on_backward(grad, fwd=fwd, io=io, is_half=is_half):
                    # flash/efficient backward: recompute P, then dV, dP, dQ, dK: 2.5x the forward
                    costs.add(phase_of(), ATTENTION, is_half, 2.5 * fwd, 2 * io, host=0.0)
                    return grad

                out.register_hook(on_backward)
            return out

    return costs, OpCounter(), SdpaCounter()


def traced_step_costs(costs: StepCosts, training: bool, micro_batches: int) -> StepCosts:
    """One measured step from the trace's phases: the trace runs two steps of up to two micro-
    batches; the second step (optimizer states present) is the steady one."""
    steady = {p: c for p, c in costs.ops.items() if p.startswith("1:")} or \
        {p: c for p, c in costs.ops.items() if p.startswith("0:")}
    out = StepCosts()
    for p, c in steady.items():
        phase = p.split(":", 1)[1]
        out.ops[phase] = Counter(c)
        out.host_ops[phase] = costs.host_ops.get(p, 0.0)
    if training and micro_batches > 2:
        f = micro_batches / 2
        out = out.scaled({"forward": f, "backward": f, "recompute": f})
    return out


# ----- the analytic closed form -----------------------------------------------------------------
def analytic_costs(profile, arch, shape: tuple[int, int]) -> StepCosts:
    """The step's FLOPs, bytes and op counts from the architecture (``analytic.Arch``)."""
    from engine import techniques

    cal = calibration()
    b, t = shape
    training = profile.mode == "train"
    setup = techniques.analytic_setup(profile, b, t)  # micro-batches, windows, checkpointing
    micro = max(1, setup.passes) if training else 1
    rows, t = setup.rows, setup.tokens
    tokens = rows * t  # per pass
    half = profile.precision != "fp32"
    elt = 2 if half else 4
    h, layers = arch.hidden, arch.layers
    n_mm = 6 * layers + 1  # q, k, v, o, up, down per block (+ the head)
    mm_fwd = 2.0 * (sum(arch.layer_params) + arch.vocab * h) * tokens
    causal = 0.5 if arch.family != "bert" else 1.0
    span = min(t, 2 * setup.window) if setup.window else t  # local attention: the window's keys
    attn_fwd = 4.0 * rows * arch.heads * t * span * arch.head_dim * causal  # per layer
    attn_io = 4.0 * tokens * h * elt
    act_bytes = cal.act_bytes_per_token_hidden * tokens * h * layers * elt / 2
    weight_bytes = arch.params * elt
    n_fwd = analytic_host_ops(arch, "train_forward" if training else "infer_forward", half, cal)
    if n_fwd is None:
        n_fwd = cal.ops_per_layer_fwd * layers + cal.ops_fixed_fwd
    n_bwd = analytic_host_ops(arch, "backward", half, cal)
    if n_bwd is None:
        n_bwd = n_fwd * cal.bwd_ops_ratio
    costs = StepCosts()

    def put(phase, cls, flops, nbytes, count, host, kernels=1):
        c = costs.ops.setdefault(phase, Counter())
        c[(cls, half, float(flops), float(nbytes), int(kernels))] += count
        costs.host_ops[phase] = costs.host_ops.get(phase, 0.0) + host

    def one_pass(phase, m_mm, m_attn, m_bytes, ops):
        put(phase, MATMUL, mm_fwd * m_mm / n_mm, weight_bytes * m_bytes / n_mm + act_bytes / n_mm,
            n_mm * micro, n_mm * m_mm * micro)
        put(phase, ATTENTION if half else MATMUL, attn_fwd * m_attn, attn_io * m_bytes,
            layers * micro, 0.0)
        mem_ops = max(1.0, ops - n_mm * m_mm)
        put(phase, MEMORY, 0.0, act_bytes * m_bytes / mem_ops, mem_ops * micro, mem_ops * micro)

    one_pass("forward", 1.0, 1.0, 1.0, n_fwd)
    if training:
        # checkpointed blocks run their forward again in backward
        share = 1.0 / setup.checkpoint_every if setup.checkpoint_every else 0.0
        # backward: the inputs' gradients always, the weights' only where they train (LoRA:
        # the frozen base matrices get none)
        trainable = arch.trainable_params if arch.trainable_tensors else arch.params
        share_trained = min(1.0, trainable / max(1, arch.params))
        one_pass("backward", 1.0 + share_trained, 2.5, 1.0 + share_trained, n_bwd)
        if share:
            one_pass("recompute", share, share, share, n_fwd * share)
        # optimizer: foreach over the parameters, memory-bound
        n_tensors = len(arch.trainable_tensors or arch.param_tensors)
        words = 4 if profile.optimizer == "adamw" else 2  # fp32 words kept per parameter
        opt_bytes = trainable * 4 * 4 * words  # reads and writes of p, g, states, temporaries
        foreach_ops = 12 if profile.optimizer == "adamw" else 4
        kernels = max(1, math.ceil(n_tensors / FOREACH_TENSORS_PER_KERNEL))
        c = costs.ops.setdefault("optimizer", Counter())
        c[(MEMORY, False, 0.0, opt_bytes / foreach_ops, kernels)] += foreach_ops
        costs.host_ops["optimizer"] = foreach_ops + 0.2 * n_tensors  # zero_grad, per-tensor work
    return costs


# ----- the result ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpeedEstimate:
    gpu: str  # catalog key
    step_s: float
    tokens_per_s: float
    gpu_s: float
    host_s: float
    bound: str  # "compute" | "memory" | "host"
    flops: float
    bytes: float
    first_pass_s: float  # one-time cost of the plan's distinct shapes (variable padding)
    median_error: float
    worst_error: float
    method: str  # traced | analytic

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

    def note(self) -> str:
        err = f"±{self.median_error:.0%} median, {self.worst_error:.0%} worst" if self.median_error \
            else "uncalibrated"
        return (f"speed on {self.gpu}: {self.tokens_per_s:,.0f} tokens/s, {self.step_s * 1e3:.1f} ms "
                f"a step ({self.bound}-bound; {self.method}; expected error {err} from the calibration)")


def estimate_speed(profile, shape: tuple[int, int], costs: StepCosts | None = None,
                   arch=None, distinct_shapes: int = 1) -> SpeedEstimate | None:
    """The profile's step time and tokens/s at ``shape`` on its GPU (None for a CPU target)."""
    if profile.target != "cuda":
        return None
    from engine import gpus

    gpu = gpus.for_profile(profile)
    cal = calibration()
    method = "traced"
    if costs is None:
        if arch is None:
            from engine.estimate.analytic import arch_of

            arch = arch_of(profile)
        costs = analytic_costs(profile, arch, shape)
        method = "analytic"
    times = step_time(costs, gpu, cal)
    b, t = shape
    step = times["step_s"]
    mm = times["matmul_s"] + times["attention_s"]
    bound = "host" if times["host_s"] >= times["gpu_s"] else \
        "compute" if mm >= times["memory_s"] else "memory"
    tot = costs.totals()
    return SpeedEstimate(gpu=gpu.key, step_s=step, tokens_per_s=b * t / step if step else 0.0,
                         gpu_s=times["gpu_s"], host_s=times["host_s"], bound=bound,
                         flops=tot["flops"], bytes=tot["bytes"],
                         first_pass_s=cal.first_shape_s * max(0, distinct_shapes),
                         median_error=cal.median_error, worst_error=cal.worst_error, method=method)


def decode_step_s(gpu, weight_bytes: int, kv_cache_bytes: int, layers: int, batch: int = 1,
                  ops_per_layer: float = 25.0) -> float:
    """One greedy decode step (generate mode): bytes-bound, every weight and the whole KV cache
    read once, against the host's time to issue the step's small kernels (under no_grad).
    ``gpu``: an ``engine.gpus.GPU`` (``gpus.get(name)``)."""
    cal = calibration()
    gpu_s = (weight_bytes + kv_cache_bytes) / (gpu.bandwidth * cal.e_memory)
    ops = ops_per_layer * layers + cal.ops_fixed_fwd
    gpu_s = max(gpu_s, ops * cal.kernel_floor_s)
    host_s = ops * cal.host_op_infer_s
    # A decode step is a forward under no_grad: the inference step's fixed cost, not the training
    # step's (26 ms there: zero_grad, the optimizer's Python; the H200 decode steps of Qwen2.5-0.5B
    # and Llama-3.2-1B took 17-30 ms in all, 2026-12-02, and were estimated at 49-60 ms with it).
    return max(gpu_s, host_s) + cal.serial_share * min(gpu_s, host_s) + cal.step_fixed_infer_s


__all__ = ["Calibration", "SpeedEstimate", "StepCosts", "analytic_costs", "calibration",
           "decode_step_s", "estimate_speed", "make_counter", "step_time", "traced_step_costs"]
