"""Device overheads outside the tensors a step creates: CUDA context, library workspaces, pages.

``device_used_bytes`` (what ``torch.cuda.mem_get_info`` / nvidia-smi show) is the allocator's
reserved bytes plus the CUDA context (driver state, loaded kernels/modules, cuBLAS/cuDNN handles).
Some library buffers are allocated *through* the caching allocator and so count in
``max_memory_allocated``: cuBLAS keeps one workspace per (handle, stream), and autograd runs the
backward pass on its own device thread (its own handle), so training holds two.

The numbers come from the GPU catalog (``engine.gpus``, its ``ContextModel``), calibrated from measured runs (the lead's GPU
JSON): ``context_bytes`` = measured ``device_used - peak_reserved``; ``cublas_workspace_bytes`` from
``max_memory_allocated`` of a tiny model minus its tensors. Defaults: PyTorch >= 2.3 on Hopper
uses ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (32 MiB per handle; ``getChosenWorkspaceSize`` in
``aten/src/ATen/cuda/CublasHandlePool.cpp``); a CUDA 12 context with lazy module loading takes
about 500 MiB on an H100 (measured values go here).

H100 calibration (bench/results/probe_h100_2026-11-24.jsonl, torch 2.11+cu130): 527 MiB used right
after CUDA init, 647 MiB after the first fp32 matmul with 52 MiB reserved (a 4 MiB tensor's 20 MiB
segment + the 32 MiB cuBLAS workspace), 737 MiB after a bf16 matmul (cuBLASLt kernels): context =
737 - 52 = 685 MiB. Training adds the autograd thread's handle (not yet measured separately).

H100 recalibration (bench/results/measure_h100_2026-11-25/matrix.jsonl: 22 ``headroom measure``
runs, one process at a time, device_used - peak_reserved; see
bench/results/estimates_vs_h100_2026-11-25.md): the difference is the same to the MiB for every
model and shape and depends only on mode and precision: 687 MiB for fp32 inference, 695 MiB for
bf16-amp inference, 751 MiB for fp32 training, 767 MiB for bf16-amp training. So: a 687 MiB base
(context + one cuBLAS handle's fp32 kernels), +64 MiB in training (autograd's backward thread
has its own cuBLAS/cuBLASLt handle), +8 MiB per handle for half-precision matmul kernels
(``context_half_bytes``; applied to fp16/bf16 autocast and pure half weights alike). Runs with
many distinct batch shapes (dynamic padding, token budgets) loaded up to ~110 MiB more kernels
(bench/results/batching_h100_2026-11-25): not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20


@dataclass(frozen=True)
class DeviceConstants:
    name: str  # catalog key (engine.gpus) or "cpu"
    context_bytes: int  # CUDA context + kernels + handles outside the caching allocator
    cublas_workspace_bytes: int  # per cuBLAS handle, allocated through the caching allocator
    workspace_handles_train: int  # handles that allocate a workspace in a training step
    workspace_handles_infer: int  # ... in an inference forward
    expandable_small_page: int  # expandable segments: page of the small pool
    expandable_large_page: int  # expandable segments: page of the large pool
    capacity_bytes: int  # total device memory (for "fits" checks)
    context_train_extra_bytes: int = 0  # training: the autograd thread's own library handles
    context_half_bytes: int = 0  # per handle, once half-precision (fp16/bf16) matmuls ran


def _from_catalog(key: str) -> DeviceConstants:
    from engine import gpus

    g = gpus.get(key)
    c = g.context
    return DeviceConstants(g.key, context_bytes=int(c.base_mib * MiB),
                           cublas_workspace_bytes=int(c.cublas_workspace_mib * MiB),
                           workspace_handles_train=2, workspace_handles_infer=1,
                           expandable_small_page=2 * MiB, expandable_large_page=20 * MiB,
                           capacity_bytes=g.memory_bytes,
                           context_train_extra_bytes=int(c.train_extra_mib * MiB),
                           context_half_bytes=int(c.half_per_handle_mib * MiB))


_CPU = DeviceConstants("cpu", context_bytes=0, cublas_workspace_bytes=0,
                       workspace_handles_train=0, workspace_handles_infer=0,
                       expandable_small_page=2 * MiB, expandable_large_page=20 * MiB,
                       capacity_bytes=0)


class _Devices(dict):
    """``DEVICES[kind]``: the old table's keys (h100, h200, a100, cpu, default) and every catalog
    name, built from the catalog on first use."""

    def __missing__(self, key: str) -> DeviceConstants:
        from engine import gpus

        if key == "cpu":
            value = _CPU
        elif key == "default":
            value = self[gpus.DEFAULT]
        else:
            value = _from_catalog(key)  # BadInput for an unknown name
        self[key] = value
        return value

    def get(self, key, default=None):  # type: ignore[override]
        from engine.errors import BadInput

        try:
            return self[key]
        except BadInput:
            return default


DEVICES: dict[str, DeviceConstants] = _Devices()


def device_kind() -> str:
    """The GPU estimates are for when a profile names none: ``HEADROOM_DEVICE`` (deprecated, with a
    DeprecationWarning; use ``--gpu``), else the catalog's default (H100 SXM)."""
    from engine import gpus

    return gpus.key_for("")


def kind_of(profile) -> str:
    """The catalog key of the profile's GPU (its ``gpu`` field, else ``device_kind()``)."""
    from engine import gpus

    return gpus.key_for(getattr(profile, "gpu", ""))


def constants(target: str, kind: str | None = None) -> DeviceConstants:
    """The GPU's constants: its ``headroom calibrate`` entry (``engine.calibrate``: measured on that
    GPU) where there is one, else the catalog's."""
    if target != "cuda":
        return DEVICES["cpu"]
    kind = kind or device_kind()
    from engine.calibrate import constants_of, load_entry

    entry = load_entry(kind)
    if entry is not None:
        return constants_of(entry, kind)
    return DEVICES.get(kind, DEVICES["default"])


def context_bytes(target: str, training: bool, half: bool, kind: str | None = None) -> int:
    """Device memory outside the caching allocator during a run: the CUDA context, loaded kernels
    and library handles (``device_used - reserved``)."""
    c = constants(target, kind)
    if target != "cuda":
        return 0
    handles = c.workspace_handles_train if training else c.workspace_handles_infer
    return (c.context_bytes + (c.context_train_extra_bytes if training else 0)
            + (c.context_half_bytes * handles if half else 0))


def workspace_bytes(target: str, training: bool, kind: str | None = None) -> int:
    """Library workspaces allocated through the caching allocator during a step."""
    c = constants(target, kind)
    handles = c.workspace_handles_train if training else c.workspace_handles_infer
    return c.cublas_workspace_bytes * handles
