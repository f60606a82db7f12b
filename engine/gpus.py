"""The GPU catalog: what each GPU a profile can be planned for offers, every figure with its source.

    gpu = gpus.get("l4")               # GPU record; BadInput (one line, the known names) if unknown
    gpu.memory_bytes                   # what the driver reports (nvidia-smi memory.total)
    gpu.peak_flops("bf16")             # dense tensor-core peak, FLOP/s
    gpus.for_profile(profile)          # the profile's GPU (``gpu`` field; "" = HEADROOM_DEVICE or H100 SXM)

Figures are the vendors' **dense** peaks (the datasheets print sparse ones as "with sparsity"; those
are halved here and said so), memory bandwidth in bytes/s, interconnect bandwidth in bytes/s
(bidirectional per GPU, as the datasheets print it; the multi-GPU planner reads them), memory as the
driver reports it (MiB; measured where a run here saw it, otherwise the datasheet's GB as the driver
commonly shows it, marked uncalibrated), compute capability, bf16 and flash-attention support (the
PyTorch kernels' own checks), and the CUDA context model (``engine.estimate.device``).

fp32 matmuls: PyTorch leaves ``torch.backends.cuda.matmul.allow_tf32`` off, so an fp32 matmul runs
on the fp32 cores (``fp32``), not at the ``tf32`` tensor-core rate; ``tf32`` is listed for profiles
that opt in later.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

from engine.errors import BadInput

MiB = 1 << 20
T = 1e12  # TFLOP/s
GB = 1e9  # bytes/s per GB/s

# ---- sources (one citation per datasheet: name and address) ---------------------------------------
_CC = "NVIDIA, CUDA GPUs - Compute Capability: https://developer.nvidia.com/cuda-gpus"
_FLASH = ("PyTorch aten/src/ATen/native/transformers/cuda/sdp_utils.cpp, check_flash_attention_"
          "hardware_support (flash: sm80 and newer; memory-efficient: sm50 and newer): "
          "https://github.com/pytorch/pytorch/blob/main/aten/src/ATen/native/transformers/cuda/sdp_utils.cpp")
_BF16 = ("bf16 tensor cores from Ampere (sm80) on; NVIDIA Ampere architecture whitepaper: "
         "https://images.nvidia.com/aem-dam/en-zz/Solutions/data-center/nvidia-ampere-architecture-whitepaper.pdf")
_CONTEXT_HOPPER = ("calibrated here: device_used - peak_reserved of 22 runs on an H100 80GB HBM3 "
                   "(bench/results/measure_h100_2026-11-25/matrix.jsonl) and 8 on an H200 "
                   "(bench/results/verify_h200_2026-12-01): 750.8/766.8/694.8 MiB fp32-train/"
                   "bf16-train/bf16-infer; cuBLAS workspace 32 MiB per handle on sm90+ (PyTorch "
                   "aten/src/ATen/cuda/CublasHandlePool.cpp getChosenWorkspaceSize)")
_CONTEXT_OTHER = ("uncalibrated: a CUDA 12 context with lazy module loading (about 450 MiB, the "
                  "earlier A100 table); cuBLAS workspace 8 MiB per handle below sm90 (PyTorch "
                  "aten/src/ATen/cuda/CublasHandlePool.cpp, :4096:2:16:8: https://github.com/"
                  "pytorch/pytorch/blob/main/aten/src/ATen/cuda/CublasHandlePool.cpp)")
_SMI = ("memory.total as nvidia-smi commonly reports it for this board (the datasheet's GB less the "
        "driver's reserve); not measured here")


@dataclass(frozen=True)
class ContextModel:
    """Device memory outside the caching allocator (``device_used - reserved``), as measured."""

    base_mib: float  # CUDA context + kernels + one cuBLAS handle (fp32 matmul kernels)
    train_extra_mib: float  # training: autograd's backward thread has its own handles
    half_per_handle_mib: float  # per handle once fp16/bf16 matmul kernels loaded
    cublas_workspace_mib: float  # per handle, allocated through the caching allocator
    calibrated: bool  # measured on this GPU (or its twin); otherwise a model


_HOPPER_CONTEXT = ContextModel(687, 64, 8, 32, True)
_BLACKWELL_CONTEXT = ContextModel(687, 64, 8, 32, False)
_OLDER_CONTEXT = ContextModel(450, 0, 0, 8, False)


@dataclass(frozen=True)
class GPU:
    key: str  # catalog name (``--gpu``)
    name: str  # display name
    memory_mib: int  # nvidia-smi memory.total
    compute_capability: tuple[int, int]
    bf16: bool  # bf16 tensor cores (sm80+)
    flash_attention: bool  # PyTorch's flash SDPA kernel runs here (sm80+)
    fp32_tflops: float  # dense, fp32 cores
    tf32_tflops: float  # dense, tensor cores (0: none)
    half_tflops: float  # dense fp16/bf16 tensor cores, fp32 accumulate
    fp8_tflops: float  # dense (0: none)
    bandwidth_gbps: float  # memory bandwidth, GB/s
    nvlink_gbps: float  # NVLink, GB/s bidirectional per GPU (0: none)
    pcie_gbps: float  # PCIe x16, GB/s bidirectional
    context: ContextModel
    sources: dict[str, str] = field(default_factory=dict)  # field -> citation
    aliases: tuple[str, ...] = ()
    detect: tuple[str, ...] = ()  # substrings of torch.cuda.get_device_name that mean this GPU

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MiB

    @property
    def sm(self) -> int:
        return self.compute_capability[0] * 10 + self.compute_capability[1]

    def peak_flops(self, dtype: str) -> float:
        """Dense peak FLOP/s of a matmul in ``dtype`` ("fp32", "tf32", "bf16", "fp16", "fp8").
        fp16 on a GPU without fp16 tensor cores and bf16 without bf16 ones fall to fp32."""
        if dtype in ("bf16", "fp16"):
            if dtype == "bf16" and not self.bf16:
                return self.fp32_tflops * T
            return (self.half_tflops or self.fp32_tflops) * T
        if dtype == "tf32":
            return (self.tf32_tflops or self.fp32_tflops) * T
        if dtype == "fp8":
            return (self.fp8_tflops or self.half_tflops or self.fp32_tflops) * T
        return self.fp32_tflops * T

    @property
    def bandwidth(self) -> float:
        return self.bandwidth_gbps * GB

    def source(self, field_name: str) -> str:
        return self.sources.get(field_name, "")

    def summary(self) -> str:
        return f"{self.name} ({self.memory_mib:,} MiB, sm{self.sm})"


#: Fields every entry cites (tests check each has a source).
CITED_FIELDS = ("memory_mib", "compute_capability", "bf16", "flash_attention", "fp32_tflops",
                "tf32_tflops", "half_tflops", "fp8_tflops", "bandwidth_gbps", "nvlink_gbps",
                "pcie_gbps", "context")


def _entry(key, name, memory_mib, cc, fp32, tf32, half, fp8, bw, nvlink, pcie, *, sheet, memory_src,
           context, aliases=(), detect=(), rates_note="", link_src=None) -> GPU:
    sm = cc[0] * 10 + cc[1]
    rates = sheet + (f" ({rates_note})" if rates_note else "")
    if memory_src.startswith(_SMI):
        memory_src = f"{memory_src}; the board's size: {sheet}"
    sources = {
        "memory_mib": memory_src, "compute_capability": _CC,
        "bf16": _BF16 if sm >= 80 else _BF16 + " (none below sm80)",
        "flash_attention": _FLASH,
        "fp32_tflops": rates, "tf32_tflops": rates, "half_tflops": rates, "fp8_tflops": rates,
        "bandwidth_gbps": sheet, "nvlink_gbps": link_src or sheet, "pcie_gbps": link_src or sheet,
        "context": _CONTEXT_HOPPER if context is _HOPPER_CONTEXT else _CONTEXT_OTHER
        if context is _OLDER_CONTEXT else _CONTEXT_HOPPER + " (Blackwell: assumed like Hopper, uncalibrated)",
    }
    return GPU(key=key, name=name, memory_mib=memory_mib, compute_capability=cc, bf16=sm >= 80,
               flash_attention=sm >= 80, fp32_tflops=fp32, tf32_tflops=tf32, half_tflops=half,
               fp8_tflops=fp8, bandwidth_gbps=bw, nvlink_gbps=nvlink, pcie_gbps=pcie,
               context=context, sources=sources, aliases=aliases, detect=detect)


_T4 = ("NVIDIA T4 Tensor Core GPU datasheet: https://www.nvidia.com/content/dam/en-zz/Solutions/"
       "Data-Center/tesla-t4/t4-tensor-core-datasheet-951643.pdf")
_V100 = ("NVIDIA Tesla V100 GPU Accelerator datasheet: https://images.nvidia.com/content/technologies/"
         "volta/pdf/volta-v100-datasheet-update-us-1165301-r5.pdf")
_A10 = ("NVIDIA A10 Tensor Core GPU datasheet (AWS publishes no separate A10G sheet; its G5 page "
        "https://aws.amazon.com/ec2/instance-types/g5/ names the A10G, 24 GB): "
        "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a10/pdf/a10-datasheet.pdf")
_L4 = "NVIDIA L4 Tensor Core GPU datasheet: https://resources.nvidia.com/en-us-data-center-overview/l4-gpu-datasheet"
_L40S = "NVIDIA L40S GPU datasheet: https://resources.nvidia.com/en-us-l40s/l40s-datasheet-28413"
_GA102 = ("NVIDIA Ampere GA102 GPU Architecture whitepaper (GeForce RTX 3090, table 9): "
          "https://www.nvidia.com/content/PDF/nvidia-ampere-ga-102-gpu-architecture-whitepaper-v2.pdf")
_ADA = ("NVIDIA Ada GPU Architecture whitepaper (GeForce RTX 4090, appendix table): "
        "https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf")
_RTXB = ("NVIDIA RTX Blackwell GPU Architecture whitepaper (GeForce RTX 5090): "
         "https://images.nvidia.com/aem-dam/Solutions/geforce/blackwell/nvidia-rtx-blackwell-gpu-architecture.pdf")
_A100 = ("NVIDIA A100 Tensor Core GPU datasheet: https://www.nvidia.com/content/dam/en-zz/Solutions/"
         "Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf")
_H100 = ("NVIDIA H100 Tensor Core GPU datasheet: "
         "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet")
_H200 = ("NVIDIA H200 Tensor Core GPU datasheet: "
         "https://nvdam.widen.net/s/nb5zzzsjdf/hpc-datasheet-sc23-h200-datasheet-3002446")
_B200 = ("NVIDIA HGX B200 specifications (per GPU; the page prints sparse tensor rates): "
         "https://www.nvidia.com/en-us/data-center/hgx/")
_SPARSE = "tensor rates: the datasheet's 'with sparsity' figures halved"
_GEFORCE = "tensor rates: fp16/bf16 with fp32 accumulate, dense"

CATALOG: dict[str, GPU] = {g.key: g for g in (
    _entry("t4", "T4", 15360, (7, 5), 8.1, 0, 65, 0, 320, 0, 32, sheet=_T4, memory_src=_SMI,
           context=_OLDER_CONTEXT, detect=("T4",), rates_note="FP16 mixed precision 65 TFLOPS"),
    _entry("v100-16gb", "V100 16GB (SXM2)", 16160, (7, 0), 15.7, 0, 125, 0, 900, 300, 32,
           sheet=_V100, memory_src=_SMI, context=_OLDER_CONTEXT, aliases=("v100",),
           detect=("V100-SXM2-16GB", "V100-PCIE-16GB", "V100 16GB")),
    _entry("v100-32gb", "V100 32GB (SXM2)", 32510, (7, 0), 15.7, 0, 125, 0, 900, 300, 32,
           sheet=_V100, memory_src=_SMI, context=_OLDER_CONTEXT,
           detect=("V100-SXM2-32GB", "V100-PCIE-32GB", "V100S", "V100 32GB")),
    _entry("a10g", "A10G (24 GB)", 23028, (8, 6), 31.2, 62.5, 125, 0, 600, 0, 64, sheet=_A10,
           memory_src=_SMI, context=_OLDER_CONTEXT, aliases=("a10",), detect=("A10G", "A10"),
           rates_note=_SPARSE),
    _entry("l4", "L4 (24 GB)", 23034, (8, 9), 30.3, 60, 121, 242, 300, 0, 64, sheet=_L4,
           memory_src=_SMI, context=_OLDER_CONTEXT, detect=("L4",), rates_note=_SPARSE),
    _entry("l40s", "L40S (48 GB)", 46068, (8, 9), 91.6, 183, 362, 733, 864, 0, 64, sheet=_L40S,
           memory_src=_SMI, context=_OLDER_CONTEXT, detect=("L40S",), rates_note=_SPARSE),
    _entry("rtx3090", "GeForce RTX 3090 (24 GB)", 24576, (8, 6), 35.6, 35.6, 71, 0, 936, 112.5, 64,
           sheet=_GA102, memory_src=_SMI, context=_OLDER_CONTEXT, aliases=("3090",),
           detect=("RTX 3090",), rates_note=_GEFORCE),
    _entry("rtx4090", "GeForce RTX 4090 (24 GB)", 24564, (8, 9), 82.6, 82.6, 165.2, 330.3, 1008, 0, 64,
           sheet=_ADA, memory_src=_SMI, context=_OLDER_CONTEXT, aliases=("4090",),
           detect=("RTX 4090",), rates_note=_GEFORCE),
    _entry("rtx5090", "GeForce RTX 5090 (32 GB)", 32607, (12, 0), 104.8, 104.8, 209.5, 419, 1792, 0, 128,
           sheet=_RTXB, memory_src=_SMI, context=_BLACKWELL_CONTEXT, aliases=("5090",),
           detect=("RTX 5090",), rates_note=_GEFORCE),
    _entry("a100-40gb-sxm", "A100 40GB SXM", 40960, (8, 0), 19.5, 156, 312, 0, 1555, 600, 64,
           sheet=_A100, memory_src=_SMI, context=_OLDER_CONTEXT, aliases=("a100-40gb",),
           detect=("A100-SXM4-40GB",), rates_note=_SPARSE),
    _entry("a100-40gb-pcie", "A100 40GB PCIe", 40960, (8, 0), 19.5, 156, 312, 0, 1555, 600, 64,
           sheet=_A100, memory_src=_SMI, context=_OLDER_CONTEXT, detect=("A100-PCIE-40GB",),
           rates_note=_SPARSE + "; NVLink: the 2-GPU bridge"),
    _entry("a100-80gb-sxm", "A100 80GB SXM", 81920, (8, 0), 19.5, 156, 312, 0, 2039, 600, 64,
           sheet=_A100, memory_src=_SMI, context=_OLDER_CONTEXT, aliases=("a100", "a100-80gb"),
           detect=("A100-SXM4-80GB", "A100 80GB"), rates_note=_SPARSE),
    _entry("a100-80gb-pcie", "A100 80GB PCIe", 81920, (8, 0), 19.5, 156, 312, 0, 1935, 600, 64,
           sheet=_A100, memory_src=_SMI, context=_OLDER_CONTEXT, detect=("A100 80GB PCIe",),
           rates_note=_SPARSE + "; NVLink: the 2-GPU bridge"),
    _entry("h100-sxm", "H100 SXM (80 GB)", 81559, (9, 0), 67, 494.5, 989.5, 1979, 3350, 900, 128,
           sheet=_H100, context=_HOPPER_CONTEXT, aliases=("h100",),
           memory_src="measured here: nvidia-smi on an NVIDIA H100 80GB HBM3 "
                      "(bench/results/measure_h100_2026-11-25/gpu.txt)",
           detect=("H100 80GB HBM3", "H100 SXM"), rates_note=_SPARSE),
    _entry("h100-pcie", "H100 PCIe (80 GB)", 81559, (9, 0), 51, 378, 756, 1513, 2000, 600, 128,
           sheet=_H100, memory_src=_SMI + " (the SXM board's 81,559 MiB)", context=_HOPPER_CONTEXT,
           detect=("H100 PCIe",), rates_note=_SPARSE + "; NVLink: the 2- or 4-GPU bridge"),
    _entry("h100-nvl", "H100 NVL (94 GB)", 95830, (9, 0), 60, 417.5, 835.5, 1670.5, 3900, 600, 128,
           sheet=_H100, memory_src=_SMI, context=_HOPPER_CONTEXT, detect=("H100 NVL",),
           rates_note=_SPARSE),
    _entry("h200", "H200 (141 GB)", 143771, (9, 0), 67, 494.5, 989.5, 1979, 4800, 900, 128,
           sheet=_H200, context=_HOPPER_CONTEXT,
           memory_src="measured here: torch.cuda total memory / nvidia-smi on an NVIDIA H200 "
                      "(bench/results/verify_h200_2026-12-01/call3/gpu.txt)",
           detect=("H200",), rates_note=_SPARSE + "; H200 SXM"),
    _entry("b200", "B200 (180 GB)", 183359, (10, 0), 80, 1100, 2250, 4500, 8000, 1800, 128,
           sheet=_B200, memory_src=_SMI, context=_BLACKWELL_CONTEXT, detect=("B200",),
           rates_note=_SPARSE + "; fp32 is not printed: 2x the FP64 40 TFLOPS, Blackwell's "
                                "fp32:fp64 ratio"),
    _entry("custom", "Custom (H100-like rates; memory = the budget)", 0, (9, 0), 67, 494.5, 989.5,
           1979, 3350, 900, 128, sheet=_H100 + " (custom takes the H100 SXM's rates)",
           memory_src="custom: the memory is the budget you give (the app's capacity, --budget)",
           context=_HOPPER_CONTEXT),
)}

#: The GPU estimates are for when a profile names none (and HEADROOM_DEVICE is not set).
DEFAULT = "h100-sxm"

_ALIASES: dict[str, str] = {a: g.key for g in CATALOG.values() for a in g.aliases}


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(" ", "-")


def names() -> tuple[str, ...]:
    return tuple(CATALOG)


def get(name: str) -> GPU:
    """The catalog entry named ``name`` (a key or an alias, any case); one-line BadInput listing
    the known names otherwise."""
    key = _norm(name or DEFAULT)
    key = _ALIASES.get(key, key)
    if key not in CATALOG:
        shown = name if len(name) <= 40 else name[:37] + "..."
        raise BadInput(f"unknown GPU {shown!r}; known: {', '.join(CATALOG)}")
    return CATALOG[key]


def check_name(value: str) -> None:
    """Field check: "" (the default GPU) or a catalog name."""
    if value:
        get(value)


_warned_env = False


def env_device() -> str | None:
    """``HEADROOM_DEVICE`` (deprecated: use ``--gpu`` / the profile's ``gpu``), as a catalog key."""
    global _warned_env
    value = os.environ.get("HEADROOM_DEVICE", "").strip()
    if not value:
        return None
    if not _warned_env:
        _warned_env = True
        warnings.warn("HEADROOM_DEVICE is deprecated: use --gpu NAME (the profile's gpu field)",
                      DeprecationWarning, stacklevel=3)
    try:
        return get(value).key
    except BadInput:
        return None  # as before: an unknown kind fell back to the default


def key_for(gpu_field: str) -> str:
    """The catalog key a profile's ``gpu`` value means ("" = HEADROOM_DEVICE, else DEFAULT)."""
    if gpu_field:
        return get(gpu_field).key
    return env_device() or DEFAULT


def for_profile(profile) -> GPU:
    return CATALOG[key_for(getattr(profile, "gpu", ""))]


def detect_key(device_name: str, total_bytes: int = 0) -> str | None:
    """The catalog key of a detected GPU (``torch.cuda.get_device_name``, total memory), or None."""
    name = device_name.upper()
    best = None
    for g in CATALOG.values():
        for pattern in g.detect:
            if pattern.upper() in name and (best is None or len(pattern) > best[1]):
                best = (g.key, len(pattern))
    if best is None:
        return None
    key = best[0]
    # One name, two memory sizes: pick by the memory the driver reports.
    if total_bytes and key.startswith(("a100-", "v100-")):
        family = [g for g in CATALOG.values() if g.key.startswith(key.split("-")[0])]
        pcie = "PCIE" in name
        family = [g for g in family if ("pcie" in g.key) == pcie] or family
        key = min(family, key=lambda g: abs(g.memory_bytes - total_bytes)).key
    return key


def detect_local() -> tuple[str, str, int] | None:
    """(catalog key or "custom", device name, total bytes) of this machine's GPU 0, or None.
    Creates a CUDA context: call it where that is fine (the app asks NVML first)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name(0)
        total = int(torch.cuda.get_device_properties(0).total_memory)
    except Exception:  # noqa: BLE001 - no driver
        return None
    return detect_key(name, total) or "custom", name, total


def check_precision(profile) -> None:
    """bf16 on a GPU without bf16 tensor cores (T4, V100) is refused in one line, fp16 offered."""
    if profile.target != "cuda":
        return
    gpu = for_profile(profile)
    if "bf16" in profile.precision and not gpu.bf16:
        suggestion = profile.precision.replace("bf16", "fp16")
        raise BadInput(f"{gpu.name} (sm{gpu.sm}) has no bf16 support; use --precision {suggestion}")


__all__ = ["CATALOG", "CITED_FIELDS", "DEFAULT", "GPU", "ContextModel", "check_name",
           "check_precision", "detect_key", "detect_local", "for_profile", "get", "key_for", "names"]
