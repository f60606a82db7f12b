"""Memory pooling: how PyTorch's CUDA caching allocator is set up for a run.

``alloc = default``: the allocator as shipped. ``expandable``: ``PYTORCH_CUDA_ALLOC_CONF=
expandable_segments:True`` (segments grow in place instead of new fixed-size segments: less
fragmentation when shapes vary). ``pool:SIZE``: before the run, one SIZE-byte tensor is allocated
and freed, so the caching allocator keeps one SIZE-byte segment reserved and later large blocks are
carved out of it (a warm pool: no cudaMalloc during the steps). Caveat: blocks under 1 MiB come
from separate 2 MiB "small" segments, never from the big one, and the big segment is split only
for large allocations, so reserved memory can still grow beyond SIZE.

``alloc_max_split = SIZE`` (with any of the three) adds ``max_split_size_mb:M`` (M = SIZE in MiB):
the caching allocator never splits a cached block of M or more and does not hand one to a smaller
request (PyTorch's ``CUDACachingAllocator``: ``should_split`` / ``get_free_block``). Big tensors then
get segments of their own that small ones cannot fragment, at the cost of more reserved memory when
sizes vary. A pool of M or more is therefore never carved up.

``PYTORCH_CUDA_ALLOC_CONF`` is read when CUDA initialises: the measure child process must set it
in its environment before importing/initialising torch.cuda (``child_env``).
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from typing import TYPE_CHECKING

from engine.errors import BadInput
from engine.techniques.base import AnalyticSetup, Control, Field, ProcessHooks, Technique

if TYPE_CHECKING:
    from engine.profile import Profile

ENV = "PYTORCH_CUDA_ALLOC_CONF"

EXPLANATION = (
    "Memory pooling controls PyTorch's CUDA caching allocator. The allocator keeps freed blocks "
    "reserved for reuse, so the device's used memory (reserved) is above what tensors occupy "
    "(allocated); the gap is fragmentation and cache. 'expandable' sets PYTORCH_CUDA_ALLOC_CONF="
    "expandable_segments:True, letting segments grow in place, which usually lowers reserved memory "
    "and out-of-memory errors when tensor sizes vary (dynamic padding, variable batches). "
    "'pool:SIZE' reserves one block of SIZE bytes before the run so later allocations are carved out "
    "of it without calling the driver; it does not lower the peak, and small (<1 MiB) tensors still "
    "use their own 2 MiB segments. 'Max split size' (max_split_size_mb) stops the allocator from "
    "splitting cached blocks of that size or more, so large blocks are not fragmented by small "
    "tensors; it can raise reserved memory when large sizes vary. Allocated peak, reserved peak and "
    "fragmentation are measured for each setting."
)


def applies(profile: "Profile") -> bool:
    return profile.alloc.lower() != "default" or bool(profile.alloc_max_split_bytes)


def alloc_conf(profile: "Profile") -> str | None:
    """The PYTORCH_CUDA_ALLOC_CONF value the profile needs (None: leave the environment as is).

    ``expandable`` -> ``expandable_segments:True``; ``alloc_max_split`` -> ``max_split_size_mb:M``
    (both, comma-separated, when both are set). default and pool:SIZE need no setting (the pool is
    made by ``prereserve``).
    """
    parts = []
    if profile.alloc.lower() == "expandable":
        parts.append("expandable_segments:True")
    if profile.alloc_max_split_mib:
        parts.append(f"max_split_size_mb:{profile.alloc_max_split_mib}")
    return ",".join(parts) or None


def merge_conf(current: str | None, conf: str) -> str:
    """``current`` with ``conf``'s keys set (other keys, e.g. the user's garbage_collection_threshold,
    kept): ``merge_conf("a:1,b:2", "b:3")`` -> ``"a:1,b:3"``."""
    parts = [x.strip() for x in (current or "").split(",") if x.strip()]
    new = [x.strip() for x in conf.split(",") if x.strip()]
    keys = {x.split(":", 1)[0] for x in new}
    return ",".join([x for x in parts if x.split(":", 1)[0] not in keys] + new)


def child_env(profile: "Profile", base: dict | None = None) -> dict:
    """Environment for a measure child process with the profile's allocator setting applied."""
    env = dict(os.environ if base is None else base)
    value = alloc_conf(profile)
    if value:
        env[ENV] = merge_conf(env.get(ENV, ""), value)
    return env


def configure_process(profile: "Profile", notes: list[str]) -> None:
    """Set ``PYTORCH_CUDA_ALLOC_CONF`` for the profile in this process, before CUDA starts.

    Refuses (BadInput) when CUDA is already initialised in this process with a different setting:
    allocator settings take effect only in a fresh process (the CLI ``measure`` child).
    """
    import sys

    conf = alloc_conf(profile)
    if profile.target != "cuda":
        if profile.alloc.lower() != "default" or profile.alloc_max_split:
            notes.append("allocator settings apply to CUDA only; ignored on CPU")
        return
    current = os.environ.get(ENV)
    if conf is None:
        if current:
            notes.append(f"{ENV}={current} (from the environment)")
        return
    wanted = merge_conf(current, conf)
    torch_mod = sys.modules.get("torch")
    if wanted != current and torch_mod is not None and torch_mod.cuda.is_initialized():
        raise BadInput(f"CUDA is already initialised with {ENV}={current or '(unset)'}; "
                       f"the profile's allocator settings need {conf} in a fresh process "
                       f"(run `headroom measure`)")
    os.environ[ENV] = wanted
    notes.append(f"{ENV}={wanted}")


def _child_environment(profile: "Profile", env: dict) -> dict:
    """The measure child's environment: the allocator setting for CUDA runs (the user's other
    allocator keys kept)."""
    return child_env(profile, env) if profile.target == "cuda" else env


def prereserve(profile: "Profile", device: str = "cuda") -> str:
    """For pool:SIZE on CUDA: allocate SIZE bytes once and free them (kept reserved).

    Call after CUDA is initialised and before the peak counters are reset. Returns a note for the
    result ("" when nothing was reserved: no pool asked, or not on CUDA).
    """
    size = profile.alloc_pool_bytes
    if not size:
        return ""
    import torch

    if not (str(device).startswith("cuda") and torch.cuda.is_available()):
        return ""
    block = torch.empty(size, dtype=torch.uint8, device=device)
    del block  # returns to the caching allocator, which keeps the segment reserved
    reserved = torch.cuda.memory_reserved(device)
    return (f"pre-reserved a {size / 2**20:.0f} MiB pool (reserved now {reserved / 2**20:.0f} MiB); "
            f"blocks under 1 MiB still use separate 2 MiB segments")


def fragmentation(reserved: int, allocated: int) -> float:
    """Share of reserved memory not holding tensors: 1 - allocated / reserved (0 when none)."""
    if reserved <= 0:
        return 0.0
    return max(0.0, min(1.0, 1.0 - allocated / reserved))


def allocator_stats(device: str = "cuda") -> dict:
    """Allocated/reserved now and at peak, segment count, fragmentation (CUDA; zeros elsewhere)."""
    import torch

    if not (str(device).startswith("cuda") and torch.cuda.is_available()):
        return {"allocated_bytes": 0, "reserved_bytes": 0, "peak_allocated_bytes": 0,
                "peak_reserved_bytes": 0, "segments": 0, "fragmentation": 0.0}
    stats = torch.cuda.memory_stats(device)
    allocated = int(stats.get("allocated_bytes.all.current", 0))
    reserved = int(stats.get("reserved_bytes.all.current", 0))
    return {
        "allocated_bytes": allocated,
        "reserved_bytes": reserved,
        "peak_allocated_bytes": int(stats.get("allocated_bytes.all.peak", 0)),
        "peak_reserved_bytes": int(stats.get("reserved_bytes.all.peak", 0)),
        "segments": int(stats.get("segment.all.current", 0)),
        "fragmentation": fragmentation(reserved, allocated),
    }


MAX_SPLIT_FLOOR_MIB = 20  # PyTorch refuses max_split_size_mb <= 20 (kLargeBuffer, 20 MiB)
_ALLOC_RE = re.compile(r"(default|expandable|pool:(\d+(\.\d+)?)\s*([KMGT]i?B|B)?)", re.IGNORECASE)


def _check_alloc(value: str) -> None:
    from engine.profile import parse_bytes

    if not _ALLOC_RE.fullmatch(value):
        raise BadInput(f"alloc must be default, expandable or pool:SIZE (e.g. pool:8GiB); got {value!r}")
    if value.lower().startswith("pool:"):
        parse_bytes(value.split(":", 1)[1])


def _check_max_split(value: str) -> None:
    """A size, a whole number of MiB above 20 MiB (what PyTorch accepts)."""
    from engine.profile import parse_bytes
    from engine.units import format_bytes

    if not value.strip():
        return
    try:
        size = parse_bytes(value)
    except BadInput:
        raise BadInput(f"alloc_max_split must be a size such as 256MiB or 1GiB (blocks this large "
                       f"are never split); got {value!r}") from None
    if size <= MAX_SPLIT_FLOOR_MIB * 2**20:
        raise BadInput(f"alloc_max_split must be above {MAX_SPLIT_FLOOR_MIB} MiB (PyTorch refuses "
                       f"smaller max_split_size_mb); got {value!r} = {format_bytes(size)} "
                       f"(write a unit, e.g. 512MiB)")
    if size % 2**20:
        raise BadInput(f"alloc_max_split must be a whole number of MiB (PyTorch's max_split_size_mb); "
                       f"got {value!r} = {size / 2**20:.2f} MiB")


def _pool_bytes(p) -> int:
    """Size of ``alloc == 'pool:SIZE'`` in bytes, else 0."""
    from engine.profile import parse_bytes

    return parse_bytes(p.alloc.split(":", 1)[1]) if p.alloc.lower().startswith("pool:") else 0


def _max_split_bytes(p) -> int:
    """``alloc_max_split`` in bytes (a whole number of MiB), else 0 (no limit)."""
    from engine.profile import parse_bytes

    return parse_bytes(p.alloc_max_split) if p.alloc_max_split.strip() else 0


def check(prepared) -> list[str]:
    p = prepared.profile
    notes = []
    if (p.alloc.lower() != "default" or p.alloc_max_split) and p.target != "cuda":
        notes.append("allocator settings (memory pooling) apply to CUDA runs only")
    split = p.alloc_max_split_bytes
    if split and p.alloc_pool_bytes >= split:
        notes.append(f"the pool ({p.alloc_pool_bytes / 2**20:g} MiB) is not below the max split "
                     f"size ({split // 2**20} MiB): the allocator never splits it, so only requests "
                     f"within 20 MiB of its size can use it")
    if split and p.alloc.lower() == "expandable":
        notes.append("with expandable segments PyTorch splits blocks regardless of max_split_size_mb; "
                     "it only keeps oversize cached blocks from smaller requests")
    return notes


def analytic_setup(p: "Profile", setup: AnalyticSetup) -> AnalyticSetup:
    """The allocator the reserved-memory model simulates."""
    return replace(setup, expandable=p.alloc == "expandable", pool_bytes=p.alloc_pool_bytes,
                   max_split=p.alloc_max_split_bytes)


def _alloc_changes(values: dict) -> dict:
    kind = values["alloc"]
    return {"alloc": f"pool:{values['pool_gib']:g}GiB" if kind == "pool" else kind}


TECHNIQUE = Technique(
    name="memory_pool",
    title="Memory pooling (allocator)",
    group="allocator",
    order=90,
    fields=(
        Field("alloc", str, "default", "default | expandable | pool:SIZE (CUDA caching allocator "
              "setup)", check=_check_alloc, metavar="default|expandable|pool:SIZE",
              after="teacher_precision", label="allocator"),
        Field("alloc_max_split", str, "", '"" | SIZE: blocks this large or larger are never split '
              "(max_split_size_mb)", check=_check_max_split, metavar="SIZE|none",
              parse=lambda v: "" if v.strip().lower() in ("", "none", "off") else v.strip(),
              label="allocator max split size"),
    ),
    controls=(
        Control("alloc", "combo", "Allocator", choices={
            "default": "Default caching allocator", "expandable": "Expandable segments",
            "pool": "Pre-reserved pool"},
            read=lambda p: "pool" if p.alloc.lower().startswith("pool:") else p.alloc,
            write=_alloc_changes),
        Control("pool_gib", "float", "Pool size", low=0.25, high=1024, suffix=" GiB", initial=4.0,
                read=lambda p: p.alloc_pool_bytes / 1024**3 if p.alloc_pool_bytes else None,
                write=_alloc_changes, enabled_when=lambda p: p.alloc_pool_bytes > 0),
        Control("max_split", "spin", "Max split size", low=MAX_SPLIT_FLOOR_MIB, high=1 << 20, step=64,
                special="off", suffix=" MiB",
                read=lambda p: p.alloc_max_split_mib or MAX_SPLIT_FLOOR_MIB,
                write=lambda v: {"alloc_max_split": f"{v['max_split']}MiB"
                                 if v["max_split"] > MAX_SPLIT_FLOOR_MIB else ""},
                tooltip="PYTORCH_CUDA_ALLOC_CONF max_split_size_mb: cached blocks this large or larger "
                        "are never split, nor given to smaller tensors (off: no limit; PyTorch needs "
                        f"more than {MAX_SPLIT_FLOOR_MIB} MiB). Less fragmentation of big blocks, "
                        "possibly more reserved memory."),
    ),
    explanations={"memory_pool": EXPLANATION},
    summary_title=lambda p: f"Allocator ({p.alloc})",
    process=ProcessHooks(environment=_child_environment, configure=configure_process,
                         before_steps=prereserve),
    properties={
        "alloc_pool_bytes": _pool_bytes,
        "alloc_max_split_bytes": _max_split_bytes,
        "alloc_max_split_mib": lambda p: p.alloc_max_split_bytes // 2**20,
    },
    active=applies,
    check=check,
    analytic_setup=analytic_setup,
)
