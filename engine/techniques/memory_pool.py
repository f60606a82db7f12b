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
from typing import TYPE_CHECKING

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
