"""Calibrate a GPU: measure what the estimators add outside the step's tensors, write a device entry.

    headroom calibrate --json                 # on a machine with CUDA; writes DEVICES_DIR/NAME.json
    headroom calibrate --output h200.json     # or there
    headroom estimate --gpu NAME …            # the estimators use the entry for that GPU

NAME is the GPU's catalog key (``engine.gpus``, e.g. ``h200``); an entry overrides the catalog's
context model and workspaces for that GPU.

What is measured (``engine.estimate.device`` models each of these):

* ``context_bytes`` and its parts, the way the estimator is defined: ``device_used - peak_reserved``
  of real ``headroom measure`` runs, each in a fresh child process (the CUDA context, the kernels
  loaded lazily and the library handles outside the caching allocator), for tiny-gpt2 in fp32
  inference (the base), fp32 training (+ autograd's backward-thread handles), bf16-amp inference
  and training (+ half-precision matmul kernels per handle);
* the cuBLAS workspace per handle (allocated through the caching allocator, so it counts in
  ``max_memory_allocated``): the allocated bytes a first matmul adds beyond its output, on the main
  thread and on autograd's backward thread (whether training holds a second one);
* probes in this process (kept in the entry's ``probes``, not used by the estimators): device used
  minus reserved right after CUDA init, after an fp32, a bf16 and an fp16 cuBLAS matmul.

Another process on the same GPU adds to ``mem_get_info``'s used bytes: calibrate an idle GPU.

The loader at the end (``devices_dir``, ``load_entry``) reads entries without importing torch.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import re
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

from engine.errors import BadInput

MiB = 1 << 20

#: The device entry's keys that ``engine.estimate.device.DeviceConstants`` takes.
ENTRY_FIELDS = ("context_bytes", "cublas_workspace_bytes", "workspace_handles_train",
                "workspace_handles_infer", "expandable_small_page", "expandable_large_page",
                "capacity_bytes", "context_train_extra_bytes", "context_half_bytes")

#: The measured runs behind the context: (mode, precision), each in its own process.
CONTEXT_RUNS = (("infer", "fp32"), ("train", "fp32"), ("infer", "bf16-amp"), ("train", "bf16-amp"))
PROBE_MODEL = "tiny-gpt2"


# ----- where entries live, and reading them (no torch) --------------------------------------------
def devices_dir() -> Path:
    """``HEADROOM_DEVICES_DIR``, else ``$XDG_CONFIG_HOME/headroom/devices`` (``~/.config/...``)."""
    override = os.environ.get("HEADROOM_DEVICES_DIR", "").strip()
    if override:
        return Path(override)
    base = os.environ.get("XDG_CONFIG_HOME", "").strip() or str(Path.home() / ".config")
    return Path(base) / "headroom" / "devices"


def entry_name(device_name: str, total_bytes: int = 0) -> str:
    """The key a GPU's entry is saved under: its GPU catalog key (``engine.gpus``: ``NVIDIA H200``
    -> ``h200``, what ``--gpu`` names), else the name as a slug (``nvidia-foo-9000``)."""
    from engine import gpus

    key = gpus.detect_key(device_name, total_bytes)
    if key:
        return key
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "gpu"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-") or "gpu"


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), int) and data[k] >= 0
                                             for k in ENTRY_FIELDS):
        return None  # not a device entry (or a damaged one): the built-in constants stay
    return data


@functools.lru_cache(maxsize=32)
def _load_cached(path: str, mtime_ns: int) -> dict[str, Any] | None:
    return _read(Path(path))


def load_entry(kind: str) -> dict[str, Any] | None:
    """The calibrated entry for device kind ``kind`` (``DEVICES_DIR/KIND.json``), or None."""
    if not kind or not re.fullmatch(r"[a-z0-9._-]+", kind):
        return None
    path = devices_dir() / f"{kind}.json"
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        return None
    return _load_cached(str(path), mtime)


def constants_of(entry: dict[str, Any], name: str):
    """``DeviceConstants`` from an entry (the fields it has; the rest keep their defaults)."""
    from engine.estimate.device import DeviceConstants

    known = {f.name for f in fields(DeviceConstants)}
    return DeviceConstants(name=name, **{k: int(entry[k]) for k in ENTRY_FIELDS if k in known})


# ----- measuring (needs CUDA) -------------------------------------------------------------------
def _probes(torch, dev) -> dict[str, Any]:
    """Used minus reserved after init and after a first matmul per dtype; the workspaces."""
    def sync_used() -> int:
        torch.cuda.synchronize(dev)
        free, total = torch.cuda.mem_get_info(dev)
        return int(total - free)

    out: dict[str, Any] = {}
    torch.zeros(1, device=dev)
    out["used_after_init_bytes"] = sync_used()
    out["context_after_init_bytes"] = out["used_after_init_bytes"] - torch.cuda.memory_reserved(dev)
    n = 1024
    a = torch.randn(n, n, device=dev)
    before = torch.cuda.memory_allocated(dev)
    c = a @ a
    used = sync_used()
    workspace = torch.cuda.memory_allocated(dev) - before - c.untyped_storage().nbytes()
    out["context_after_fp32_matmul_bytes"] = used - torch.cuda.memory_reserved(dev)
    out["cublas_workspace_main_bytes"] = int(workspace)
    # autograd runs backward on its own device thread, with its own cuBLAS handle and workspace
    w = torch.randn(n, n, device=dev, requires_grad=True)
    loss = (a @ w).sum()
    before = torch.cuda.memory_allocated(dev)
    loss.backward()
    used = sync_used()
    out["cublas_workspace_backward_bytes"] = int(torch.cuda.memory_allocated(dev) - before
                                                 - w.grad.untyped_storage().nbytes())
    out["context_after_fp32_backward_bytes"] = used - torch.cuda.memory_reserved(dev)
    previous = out["context_after_fp32_backward_bytes"]
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        h = a.to(dtype)
        _ = h @ h
        used = sync_used()
        ctx = used - torch.cuda.memory_reserved(dev)
        out[f"context_after_{name}_matmul_bytes"] = ctx
        out[f"{name}_matmul_kernels_bytes"] = ctx - previous
        previous = ctx
        del h, _
    del a, c, w, loss
    return out


def _context_runs(progress) -> dict[str, int]:
    """``device_used - peak_reserved`` of real measured runs, one fresh process each."""
    from engine.measure.process import measure_in_child
    from engine.profile import Profile

    out = {}
    for i, (mode, precision) in enumerate(CONTEXT_RUNS):
        if progress:
            progress(0.05 + 0.75 * i / len(CONTEXT_RUNS), f"measured run: {PROBE_MODEL} {mode} {precision}")
        profile = Profile(name="calibrate", model=PROBE_MODEL, target="cuda", mode=mode,
                          precision=precision, batch=2, seq=64, steps=2)
        result = measure_in_child(profile)
        if result.oom or not result.device_used_bytes:
            raise BadInput(f"the calibration run {mode} {precision} did not finish: "
                           f"{(result.notes or ('no device memory reading',))[-1]}")
        out[f"{mode}_{precision}"] = int(result.device_used_bytes - result.peak_reserved_bytes)
    return out


def calibrate(name: str = "", progress: Callable[[float, str], None] | None = None) -> dict[str, Any]:
    """Measure this machine's first CUDA GPU; the device entry (a JSON-ready dict)."""
    try:
        import torch
    except ImportError:
        raise BadInput("calibrate needs PyTorch with CUDA; torch is not installed") from None
    if not torch.cuda.is_available():
        raise BadInput("calibrate needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    # The measured runs first, before this process makes a CUDA context of its own: each child's
    # device_used is read with mem_get_info, which counts the whole device, so a context (and
    # allocator cache) held here would be counted in every run's context (H200, 2026-12-02: +832 MiB
    # in all four modes when the probes ran first).
    runs = _context_runs(progress)
    dev = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(dev)
    if progress:
        progress(0.85, f"probes on {props.name}")
    probes = _probes(torch, dev)
    base = runs["infer_fp32"]
    train_extra = runs["train_fp32"] - base
    half_infer = runs["infer_bf16-amp"] - base  # one handle (forward)
    half_train = runs["train_bf16-amp"] - runs["train_fp32"]  # two handles (forward, backward)
    handles_train = 2 if probes["cublas_workspace_backward_bytes"] > 0 else 1
    half_per_handle = max(0, round((half_infer + half_train) / (1 + handles_train)))
    workspace = max(probes["cublas_workspace_main_bytes"], 0)
    entry = {
        "name": _slug(name) if name else entry_name(props.name, int(props.total_memory)),
        "device_name": props.name,
        "context_bytes": max(0, int(base)),
        "cublas_workspace_bytes": int(workspace),
        "workspace_handles_train": handles_train,
        "workspace_handles_infer": 1,
        # not measured: changing the allocator's settings needs a fresh process per setting
        "expandable_small_page": 2 * MiB,
        "expandable_large_page": 20 * MiB,
        "capacity_bytes": int(torch.cuda.mem_get_info(dev)[1]),
        "context_train_extra_bytes": max(0, int(train_extra)),
        "context_half_bytes": int(half_per_handle),
        "measured_context_bytes": runs,  # device_used - peak_reserved per (mode, precision) run
        "probes": probes,
        "compute_capability": list(torch.cuda.get_device_capability(dev)),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "calibrated_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "probe_model": PROBE_MODEL,
    }
    if progress:
        progress(1.0, "done")
    return entry


def write_entry(entry: dict[str, Any], output: str | os.PathLike | None = None) -> Path:
    """Write the entry (atomically) to ``output`` or ``devices_dir()/NAME.json``; its path."""
    from engine.profile import atomic_write_text

    path = Path(output) if output else devices_dir() / f"{entry['name']}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(entry, indent=2) + "\n")
    except OSError as exc:
        raise BadInput(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
