"""A model of PyTorch's CUDA caching allocator: reserved bytes from a sequence of allocations.

Source: ``c10/cuda/CUDACachingAllocator.cpp`` (PyTorch 2.x), its constants and policies:

* requests are rounded up to ``kMinBlockSize`` = 512 bytes (``round_size``);
* requests of at most ``kSmallSize`` = 1 MiB come from the small pool, carved out of 2 MiB
  segments (``kSmallBuffer``); larger ones from the large pool, whose new segments are 20 MiB
  (``kLargeBuffer``) for requests below ``kMinLargeAlloc`` = 10 MiB, else the request rounded up
  to ``kRoundLarge`` = 2 MiB (``get_allocation_size``);
* a free cached block is reused best-fit (smallest size >= request, then lowest address; new
  segments are placed below the earlier ones, as cudaMalloc's addresses mostly go); a block
  is split when the remainder is >= 512 bytes (small pool) or > 1 MiB (large pool)
  (``should_split``); freed blocks merge with free neighbours of the same segment;
* nothing is returned to the driver within a run (no ``empty_cache``), so reserved never shrinks;
* ``expandable_segments:True``: one growing segment per pool, mapped in pages (2 MiB for the small
  pool, 20 MiB for the large pool: ``ExpandableSegment``'s segment size); blocks never straddle
  a segment boundary, so fragmentation across segments disappears;
* ``pool:SIZE`` (Headroom's pre-reserved pool): a SIZE-byte block is allocated and freed before
  the model, so later large requests are carved from it.
* ``max_split_size_mb:M`` (``alloc_max_split``): a large-pool block is split only for a request
  below M (``should_split``: ``size < max_split_size() && remaining > kSmallSize``), so a segment of
  M or more is handed out whole; and ``get_free_block`` refuses the best-fitting cached block when
  the request is below M and the block is M or more ("do not return an oversized block for a
  large request"), or when the request is M or more and the block exceeds it by ``kLargeBuffer``
  (20 MiB) or more. Such requests get a new segment instead. Oversize segments are rounded like
  any other (``get_allocation_size``).

Known limitations: one stream only; ``roundup_power2_divisions`` and garbage-collection thresholds
are not modelled; ``max_split_size_mb`` is modelled without expandable segments only (with them
PyTorch splits regardless, and this model ignores the limit); no out-of-memory retry (cache flush,
``release_available_cached_blocks`` freeing oversize blocks first) is modelled, so reserved near
the device's capacity is overestimated; the expandable page sizes are read from ``device.py``
(calibrate there).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass

KMIN_BLOCK = 512
KSMALL_SIZE = 1 << 20
KSMALL_BUFFER = 2 << 20
KLARGE_BUFFER = 20 << 20
KMIN_LARGE_ALLOC = 10 << 20
KROUND_LARGE = 2 << 20
_TOP_ADDR = 1 << 60  # where the simulated address space starts (segments go down from it)


def round_size(n: int) -> int:
    """Block size for a request of ``n`` bytes (``round_size``)."""
    if n < KMIN_BLOCK:
        return KMIN_BLOCK
    return -(-n // KMIN_BLOCK) * KMIN_BLOCK


def allocation_size(n: int) -> int:
    """Segment size cudaMalloc'ed when no cached block fits (``get_allocation_size``)."""
    if n <= KSMALL_SIZE:
        return KSMALL_BUFFER
    if n < KMIN_LARGE_ALLOC:
        return KLARGE_BUFFER
    return -(-n // KROUND_LARGE) * KROUND_LARGE


class _Block:
    __slots__ = ("addr", "free", "next", "prev", "seg", "size")

    def __init__(self, addr, size, seg):
        self.addr, self.size, self.seg = addr, size, seg
        self.free = True
        self.prev = self.next = None


class _Pool:
    def __init__(self, small: bool):
        self.small = small
        self.free: list[tuple[int, int, int]] = []  # sorted (size, addr, id)
        self.blocks: dict[int, _Block] = {}  # id -> free block

    def insert(self, b: _Block) -> None:
        bisect.insort(self.free, (b.size, b.addr, id(b)))
        self.blocks[id(b)] = b

    def remove(self, b: _Block) -> None:
        key = (b.size, b.addr, id(b))
        i = bisect.bisect_left(self.free, key)
        if i < len(self.free) and self.free[i] == key:
            del self.free[i]
        self.blocks.pop(id(b), None)

    def best_fit(self, size: int) -> _Block | None:
        i = bisect.bisect_left(self.free, (size, -1, -1))
        if i == len(self.free):
            return None
        return self.blocks[self.free[i][2]]


@dataclass
class AllocatorStats:
    peak_allocated: int  # max of sum of live block sizes
    peak_reserved: int  # max of reserved (segments) bytes
    segments: int  # segments created (cudaMalloc calls)


class CachingAllocator:
    """Replays malloc/free of a single stream; ``reserved`` is what the driver handed out."""

    def __init__(self, expandable: bool = False, small_page: int = KSMALL_BUFFER,
                 large_page: int = KLARGE_BUFFER, max_split: int = 0):
        self.expandable = expandable
        # max_split_size in bytes; 0 = unlimited (PyTorch's default, SIZE_MAX)
        self.max_split = max_split if max_split > 0 and not expandable else 0
        self.pools = {True: _Pool(True), False: _Pool(False)}
        self.next_addr = 0
        self.reserved = 0
        self.peak_reserved = 0
        self.allocated = 0
        self.peak_allocated = 0
        self.segments = 0
        self.live: dict[object, _Block] = {}
        self.pages = {True: small_page, False: large_page}
        # expandable: per pool, the last block of the growing segment and the mapped end
        self._exp_tail: dict[bool, _Block | None] = {True: None, False: None}
        self._exp_mapped: dict[bool, int] = {True: 0, False: 0}
        self._exp_base: dict[bool, int] = {True: 0, False: 1 << 50}

    # ----- public --------------------------------------------------------------------------
    def malloc(self, handle: object, nbytes: int) -> None:
        if nbytes <= 0:
            return
        size = round_size(nbytes)
        small = size <= KSMALL_SIZE
        pool = self.pools[small]
        block = pool.best_fit(size)
        if block is not None and not small and self._oversize_refused(block, size):
            block = None
        if block is None:
            block = self._grow(small, size)
        else:
            pool.remove(block)
        block = self._split(block, size, pool)
        block.free = False
        self.live[handle] = block
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)

    def free(self, handle: object) -> None:
        block = self.live.pop(handle, None)
        if block is None:
            return
        self.allocated -= block.size
        block.free = True
        pool = self.pools[block.seg[0]]
        for nb in (block.prev, block.next):
            if nb is not None and nb.free:
                pool.remove(nb)
                block = self._merge(block, nb)
        pool.insert(block)

    def stats(self) -> AllocatorStats:
        return AllocatorStats(self.peak_allocated, self.peak_reserved, self.segments)

    # ----- internals -----------------------------------------------------------------------
    def _note_reserved(self, delta: int) -> None:
        self.reserved += delta
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    def _grow(self, small: bool, size: int) -> _Block:
        if not self.expandable:
            seg_size = allocation_size(size)
            self.segments += 1
            seg = (small, self.segments)
            # Each new segment below the last: best fit breaks ties between equal free blocks by
            # the lower address, so it takes the newest segment's. cudaMalloc on an H200 hands out
            # addresses mostly downwards; with that, three real allocator traces replay to their
            # measured reserved exactly (with increasing addresses Qwen2.5-0.5B bf16-amp was 9%
            # low: results/verify_h200_2026-12-02/call13).
            self.next_addr += seg_size + (1 << 30)  # segments are not adjacent
            block = _Block(_TOP_ADDR - self.next_addr, seg_size, seg)
            self._note_reserved(seg_size)
            return block
        # Expandable: extend the single segment of this pool, reusing a free tail block.
        page = self.pages[small]
        tail = self._exp_tail[small]
        pool = self.pools[small]
        seg = (small, 0)
        if tail is not None and tail.free:
            pool.remove(tail)
            need = size - tail.size
            start_block = tail
        else:
            need = size
            start_block = None
        end = self._exp_base[small] + self._exp_mapped[small]
        new_pages = -(-need // page) * page
        self._exp_mapped[small] += new_pages
        self._note_reserved(new_pages)
        if self.segments == 0:
            self.segments = 1
        if start_block is not None:
            start_block.size += new_pages
            return start_block
        block = _Block(end, new_pages, seg)
        block.prev = tail
        if tail is not None:
            tail.next = block
        self._exp_tail[small] = block
        return block

    def _oversize_refused(self, block: _Block, size: int) -> bool:
        """``get_free_block``'s max_split_size checks on the best-fitting cached block."""
        m = self.max_split
        if not m:
            return False
        if size < m and block.size >= m:
            return True  # an oversize block is not split for a smaller request
        return size >= m and block.size >= size + KLARGE_BUFFER

    def _split(self, block: _Block, size: int, pool: _Pool) -> _Block:
        remaining = block.size - size
        small = block.seg[0]
        large_ok = remaining > KSMALL_SIZE and (not self.max_split or size < self.max_split)
        if (small and remaining >= KMIN_BLOCK) or (not small and large_ok):
            rest = _Block(block.addr + size, remaining, block.seg)
            rest.prev, rest.next = block, block.next
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            if self.expandable and self._exp_tail[small] is block:
                self._exp_tail[small] = rest
            pool.insert(rest)
        return block

    def _merge(self, a: _Block, b: _Block) -> _Block:
        first, second = (a, b) if a.addr < b.addr else (b, a)
        first.size += second.size
        first.next = second.next
        if second.next is not None:
            second.next.prev = first
        small = first.seg[0]
        if self.expandable and self._exp_tail[small] is second:
            self._exp_tail[small] = first
        first.free = True
        return first


def simulate(events: Iterable[tuple[int, int]], *, expandable: bool = False,
             pool_bytes: int = 0, small_page: int = KSMALL_BUFFER,
             large_page: int = KLARGE_BUFFER, max_split: int = 0) -> AllocatorStats:
    """Replay (id, +bytes) allocations and (id, -bytes) frees; return the peaks.

    ``pool_bytes`` pre-reserves a block of that size (allocated and freed first); ``max_split``
    is ``max_split_size_mb`` in bytes (0: unlimited).
    """
    alloc = CachingAllocator(expandable, small_page, large_page, max_split)
    if pool_bytes > 0:
        alloc.malloc("__pool__", pool_bytes)
        alloc.free("__pool__")
        alloc.peak_allocated = alloc.allocated = 0
    for handle, delta in events:
        if delta > 0:
            alloc.malloc(handle, delta)
        elif delta < 0:
            alloc.free(handle)
    return alloc.stats()


def reserved_from_sizes(persistent: Iterable[int], transient_peak: Iterable[int], *,
                        expandable: bool = False, pool_bytes: int = 0,
                        small_page: int = KSMALL_BUFFER, large_page: int = KLARGE_BUFFER,
                        max_split: int = 0) -> int:
    """Reserved bytes for the analytic estimator, which knows tensor sizes but not their order.

    All tensors are taken as allocated and never freed (perfect cache reuse between phases, a
    lower bound for fragmentation), in closed form instead of a replay: small requests pack into
    2 MiB segments, 1-10 MiB requests into 20 MiB segments, larger ones get their own segment
    rounded to 2 MiB. Expandable segments map the pools' totals in pages. A pre-reserved pool
    serves large requests first; with ``max_split`` (bytes, 0: unlimited) it serves only requests
    below max_split, and none when the pool itself is max_split or larger (never split).
    """
    small = mid = large = oversize = 0
    for n in list(persistent) + list(transient_peak):
        if n <= 0:
            continue
        r = round_size(n)
        if r <= KSMALL_SIZE:
            small += r
        elif r < KMIN_LARGE_ALLOC:
            mid += r
        elif max_split and not expandable and r >= max_split:
            oversize += -(-r // KROUND_LARGE) * KROUND_LARGE  # own segment, never shared
        else:
            large += -(-r // KROUND_LARGE) * KROUND_LARGE
    if expandable:
        return (-(-small // small_page) * small_page
                + -(-(mid + large) // large_page) * large_page + max(0, pool_bytes - mid - large))
    reserved_small = -(-small // KSMALL_BUFFER) * KSMALL_BUFFER
    reserved_mid = -(-mid // KLARGE_BUFFER) * KLARGE_BUFFER
    reserved_large = large + oversize
    if pool_bytes:
        pool = -(-pool_bytes // KROUND_LARGE) * KROUND_LARGE
        if max_split and pool >= max_split:
            return reserved_small + pool + reserved_mid + reserved_large  # the pool is never split
        return reserved_small + max(pool, reserved_mid + large) + oversize
    return reserved_small + reserved_mid + reserved_large
