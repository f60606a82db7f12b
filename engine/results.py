"""Result records: frozen dataclasses of raw bytes and seconds, keyed by memory category.

They cross threads and processes whole (``to_dict``/``from_dict`` round-trip through JSON) and never
hold tensors or widgets. Units are converted only for display (``engine.units``).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any


class MemoryCategory(str, enum.Enum):
    """Where bytes go (after PyTorch's MemTracker categories)."""

    WEIGHTS = "weights"  # parameters (and buffers)
    GRADIENTS = "gradients"  # .grad of trainable parameters
    OPTIMIZER = "optimizer"  # optimizer states (Adam m and v, momentum)
    ACTIVATIONS = "activations"  # tensors saved for backward (or live forward tensors in inference)
    TEMPORARIES = "temporaries"  # transient buffers at the peak: logits, loss, autocast copies, workspaces
    KV_CACHE = "kv_cache"  # generation: the KV cache's tensors (not in ALLOCATED_CATEGORIES: only
    #                        generation breakdowns carry it, see GENERATE_CATEGORIES)
    ALLOCATOR = "allocator_overhead"  # reserved minus allocated (caching allocator rounding/cache)
    CONTEXT = "cuda_context"  # CUDA context and kernels (device used minus reserved)


#: The categories that add up to peak allocated bytes.
ALLOCATED_CATEGORIES = (
    MemoryCategory.WEIGHTS,
    MemoryCategory.GRADIENTS,
    MemoryCategory.OPTIMIZER,
    MemoryCategory.ACTIVATIONS,
    MemoryCategory.TEMPORARIES,
)


#: The allocated categories of a generation run (training and inference breakdowns keep theirs).
GENERATE_CATEGORIES = (MemoryCategory.WEIGHTS, MemoryCategory.KV_CACHE, MemoryCategory.ACTIVATIONS,
                       MemoryCategory.TEMPORARIES)


def empty_breakdown() -> dict[str, int]:
    return {c.value: 0 for c in ALLOCATED_CATEGORIES}


@dataclass(frozen=True)
class LayerBytes:
    name: str  # module path, e.g. "transformer.h.3"
    params: int  # parameter count
    weight_bytes: int  # bytes of its parameters
    activation_bytes: int  # bytes it saves for backward (or keeps live in inference)


@dataclass(frozen=True)
class EstimateResult:
    method: str  # "analytic" | "traced"
    peak_allocated_bytes: int  # predicted torch.cuda.max_memory_allocated() over the steps
    peak_reserved_bytes: int  # predicted torch.cuda.max_memory_reserved()
    device_used_bytes: int  # reserved + CUDA context (what nvidia-smi shows)
    breakdown: dict[str, int]  # bytes at the peak by MemoryCategory value (ALLOCATED_CATEGORIES)
    params: int  # parameter count of the (technique-modified) model
    layers: tuple[LayerBytes, ...] = ()  # per-layer breakdown
    peak_batch_shape: tuple[int, int] = (0, 0)  # (B, T) of the batch that sets the peak
    peak_phase: str = ""  # where the peak happens: forward | backward | optimizer (| step)
    notes: tuple[str, ...] = ()  # honest remarks (e.g. "unstructured pruning saves no dense memory")
    elapsed_s: float = 0.0  # wall time of the estimate itself
    kv_cache_bytes: int = 0  # generation: the cache tensors' bytes at the end (sum of nbytes)
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific numbers
    gpu: str = ""  # catalog key of the GPU the estimate is for (engine.gpus; "" on CPU)
    step_s: float = 0.0  # estimated time of one step (optimizer step included) on that GPU
    tokens_per_s: float = 0.0  # estimated padded tokens per second (B*T / step_s)
    speed_error: float = 0.0  # expected relative error of step_s (the calibration's median)
    tokenizer: dict[str, str] = field(default_factory=dict)  # engine.data.tokens.tokenizer_info
    trainable_params: int = 0  # parameters with gradients and optimizer state (LoRA: the adapters)
    optimizer_state_bytes: int = 0  # the optimizer's state after its first step (training)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = [dataclasses.asdict(layer) for layer in self.layers]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EstimateResult":
        d = dict(d)
        d["layers"] = tuple(LayerBytes(**x) for x in d.get("layers", ()))
        d["peak_batch_shape"] = tuple(d.get("peak_batch_shape", (0, 0)))
        d["notes"] = tuple(d.get("notes", ()))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class TimelinePoint:
    step: int  # 0-based step index
    phase: str  # "forward" | "backward" | "optimizer" | "start"; "step": a quiet CUDA step (one
    #             point at its end: a repeated batch shape, run without the per-phase reads)
    allocated_bytes: int  # memory_allocated() after the phase (live tensor bytes on CPU)
    reserved_bytes: int  # memory_reserved() after the phase (RSS on CPU)


@dataclass(frozen=True)
class MeasureResult:
    device: str  # "cuda" | "cpu"
    device_name: str  # e.g. "NVIDIA H100 80GB HBM3" or the CPU model
    peak_allocated_bytes: int  # max_memory_allocated() minus allocated before the model
    peak_reserved_bytes: int  # max_memory_reserved() (CPU: peak RSS growth)
    device_used_bytes: int  # mem_get_info used at the peak point (CUDA context included)
    breakdown: dict[str, int]  # bytes at the peak by MemoryCategory value
    step_time_s: float  # median step time, first step excluded
    tokens_per_s: float  # padded tokens processed per second (what the GPU did)
    useful_tokens_per_s: float  # real (non-pad) tokens per second
    real_tokens: int  # non-pad tokens over the timed steps
    padded_tokens: int  # all tokens (pad included) over the timed steps
    steps: int  # steps run
    params: int  # parameter count of the model that ran
    oom: bool = False  # the run ran out of memory (an outcome, not an error)
    oom_step: int = -1  # step where it happened
    oom_phase: str = ""  # forward | backward | optimizer
    timeline: tuple[TimelinePoint, ...] = ()  # allocated/reserved after each phase of each step
    first_step_s: float = 0.0  # time of the first (warm-up) step
    distinct_shapes: int = 0  # number of distinct (B, T) batch shapes seen
    losses: tuple[float, ...] = ()  # loss per step (training)
    notes: tuple[str, ...] = ()
    elapsed_s: float = 0.0  # wall time of the whole run, model build included
    kv_cache_bytes: int = 0  # generation: the cache tensors' bytes at the end (sum of nbytes)
    prefill_tokens_per_s: float = 0.0  # generation: prompt tokens (all sequences) per second
    decode_tokens_per_s: float = 0.0  # generation: new tokens per second, all sequences together
    time_to_first_token_s: float = 0.0  # generation: the prefill, to the first new token
    extra: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, str] = field(default_factory=dict)  # engine.data.tokens.tokenizer_info
    trainable_params: int = 0  # parameters with gradients and optimizer state (LoRA: the adapters)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["timeline"] = [dataclasses.asdict(p) for p in self.timeline]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MeasureResult":
        d = dict(d)
        d["timeline"] = tuple(TimelinePoint(**x) for x in d.get("timeline", ()))
        d["losses"] = tuple(d.get("losses", ()))
        d["notes"] = tuple(d.get("notes", ()))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
