"""Memory probes: live tensor bytes (the one tracker of estimate and CPU measure), RSS, CUDA counters.

``LiveBytesTracker`` is a ``TorchDispatchMode``. Every tensor an ATen op returns (forward, the
autograd engine's backward ops, optimizer updates, factory calls) has its storage registered once
with a weak reference whose callback subtracts the bytes when the storage dies, so ``live_bytes``
is the sum of the sizes of the distinct live storages (views counted once) and ``peak_bytes`` the
largest value since ``reset_peak``. Tensors that already exist when tracking starts (parameters,
buffers) are registered with ``track``. This is PyTorch's MemTracker approach
(``torch.distributed._tools.mem_tracker``), without its module hooks. Cost: one Python call per
ATen op (about 10-30 us), which matters for timing, not for bytes; CPU timings are indicative only.

It runs on real tensors (the CPU measure; the tests check the traced estimator against a real CPU
run with it) and on ``meta`` tensors (the traced estimate, which asks for more):

- ``block_bytes=512`` rounds each storage up as CUDA's caching allocator does (kMinBlockSize);
- ``record=True`` keeps the log of (allocation id, +bytes / -bytes) events: the peak's event, the
  phase marks (``mark``) and the caching allocator's reserved bytes (``estimate.allocator.simulate``
  replays it); with ``labels`` (highest priority first; the last is the default) each allocation
  carries the highest label it was ever classified with, so ``breakdown_at`` splits the live bytes
  at the peak by final label, and allocations classified as ``layer_label`` while ``current_layer``
  is set are counted per layer (``layer_bytes``);
- ``scalar`` answers data-dependent ``.item()`` calls on tensors that have no data.

A simulated capacity (``cap_bytes``) makes the op that would push live bytes beyond it raise
``SimulatedOutOfMemory`` (a ``torch.OutOfMemoryError``), as the CUDA allocator would.

The tracker uses only torch, ``weakref`` and ``format_bytes``: ``portable_source()`` is the source
of the objects a standalone script needs for it (the exported script embeds it, and ``PROBES``:
the RSS sampler and the two probes, stdlib and torch only).

``RssSampler`` samples the resident set size in a thread (every ``interval_s``) and at the points
the runner asks (``sample()``), keeping the maximum: a coarse upper view including the
interpreter, libraries and allocator slack. ``CudaProbe`` and ``CpuProbe`` give the measure loop
the same reads on both devices (allocated, reserved, the peaks of a phase).
"""

from __future__ import annotations

import inspect
import os
import threading
import weakref
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.units import format_bytes


# ----- the live-bytes tracker (portable: torch, weakref and format_bytes only) -------------------
class SimulatedOutOfMemory(getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
    """Live tensor bytes would exceed the simulated capacity (a profile's ``memory_cap_bytes``)."""


def iter_tensors(obj):
    """The tensors in an op's output (a tensor, or lists/tuples/dicts of them)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from iter_tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from iter_tensors(x)


class LiveBytesTracker(TorchDispatchMode):
    """Distinct live storage bytes (on one device type, or all), their peak, an optional capacity,
    and optionally the allocation log with a label per allocation."""

    def __init__(self, device=None, cap_bytes=0, *, block_bytes=0, record=False, labels=(),
                 layer_label=None, scalar=None):
        super().__init__()
        self.device_type = torch.device(device).type if device is not None else None  # None: all
        self.cap_bytes = int(cap_bytes)  # 0 = no capacity
        self.block_bytes = int(block_bytes)  # round each storage up to a multiple (0 = exact)
        self.record = bool(record or labels)  # keep the event log
        self.labels = tuple(labels)  # allocation labels, highest priority first
        self.layer_label = layer_label  # the label counted per layer
        self.scalar = scalar  # tensor -> number, for .item() on tensors without data
        self.live_bytes = 0  # distinct live storages, bytes
        self.peak_bytes = 0  # max of live_bytes since reset_peak()
        self.peak_event = -1  # index in ``events`` where peak_bytes was reached (record only)
        self.oom_raised = False  # the capacity was hit (the error may be wrapped by autograd)
        self.events: list[tuple[int, int]] = []  # (allocation id, +bytes | -bytes)
        self.sizes: list[int] = []  # allocation id -> bytes (record only)
        self.label: list = []  # allocation id -> label (record only)
        self.layer: dict[int, str] = {}  # allocation id -> layer that first held it as layer_label
        self.phase_marks: list[tuple[int, str]] = []  # (event index, phase starting)
        self.timeline: list[tuple[str, int]] = []  # (phase starting, live bytes then)
        self.current_layer = ""  # set by the caller's module hooks
        self.layer_tracking = True
        self._rank = {lab: i for i, lab in enumerate(self.labels)}
        self._live: dict[int, tuple[int, int]] = {}  # id(storage) -> (allocation id, bytes)
        self._refs: dict[int, weakref.ref] = {}
        self._next_id = 0

    # ----- bookkeeping --------------------------------------------------------------------
    def _forget(self, key):
        entry = self._live.pop(key, None)
        self._refs.pop(key, None)
        if entry is None:
            return
        self.live_bytes -= entry[1]
        if self.record:
            self.events.append((entry[0], -entry[1]))

    def _storage(self, tensor):
        # A DTensor (FSDP2's parameters, gradients, optimizer state) holds its rank's local shard.
        tensor = getattr(tensor, "_local_tensor", tensor)
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided or tensor.is_nested:
            return None
        if self.device_type is not None and tensor.device.type != self.device_type:
            return None
        try:
            return tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (some subclasses)
            return None

    def track(self, tensor, label=None):
        """Count a tensor's storage (once), e.g. parameters that exist before tracking starts;
        ``label`` classifies it (record with labels only)."""
        st = self._storage(tensor)
        if st is None:
            return
        key = id(st)
        nbytes = st.nbytes()
        if self.block_bytes and nbytes > 0:
            nbytes = -(-nbytes // self.block_bytes) * self.block_bytes
        entry = self._live.get(key)
        if entry is not None and entry[1] == nbytes:
            if label is not None:
                self._relabel(entry[0], label)
            return
        old = entry[1] if entry is not None else 0
        live = self.live_bytes + nbytes - old
        if self.cap_bytes and live > self.cap_bytes:
            # Like the CUDA allocator: the allocation that does not fit is refused, not counted.
            self.oom_raised = True
            raise SimulatedOutOfMemory(
                f"simulated capacity of {format_bytes(self.cap_bytes)} exceeded: "
                f"{format_bytes(self.live_bytes)} of live tensors, "
                f"{format_bytes(nbytes - old)} more requested")
        if entry is None:
            uid = self._next_id
            self._next_id += 1
            self._refs[key] = weakref.ref(st, lambda _r, k=key: self._forget(k))
            if self.record:
                self.sizes.append(nbytes)
                self.label.append(self.labels[-1] if self.labels else None)
        else:  # the storage was resized: a free and a new allocation under the same id
            uid = entry[0]
            if self.record:
                self.events.append((uid, -old))
                self.sizes[uid] = nbytes
        self._live[key] = (uid, nbytes)
        if self.record:
            self.events.append((uid, nbytes))
        self.live_bytes = live
        if live > self.peak_bytes:
            self.peak_bytes = live
            self.peak_event = len(self.events) - 1
        if label is not None:
            self._relabel(uid, label)

    def allocation_id(self, tensor):
        """The allocation id of a live tensor's storage, or None when it is not tracked."""
        st = self._storage(tensor)
        entry = self._live.get(id(st)) if st is not None else None
        return entry[0] if entry is not None else None

    def classify(self, tensor, label):
        """Raise the label of a live tensor's storage to ``label`` if that ranks higher."""
        st = self._storage(tensor)
        entry = self._live.get(id(st)) if st is not None else None
        if entry is not None:
            self._relabel(entry[0], label)

    def _relabel(self, uid, label):
        if not self._rank:
            return
        if self._rank[label] < self._rank[self.label[uid]]:
            self.label[uid] = label
        if label == self.layer_label and self.layer_tracking and self.current_layer \
                and uid not in self.layer and self.label[uid] == label:
            self.layer[uid] = self.current_layer

    def reset_peak(self):
        self.peak_bytes = self.live_bytes
        self.peak_event = len(self.events) - 1

    def mark(self, phase):
        """A phase starts here (for ``phase_at`` and the timeline)."""
        self.phase_marks.append((len(self.events), phase))
        self.timeline.append((phase, self.live_bytes))

    def detach(self):
        """Stop listening for frees (tracked storages may outlive the tracker)."""
        self._refs.clear()

    # ----- the dispatch mode ---------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.scalar is not None and func is torch.ops.aten._local_scalar_dense.default:
            try:
                return func(*args, **kwargs)
            except (RuntimeError, NotImplementedError):  # meta: no data; answer as a run would
                return self.scalar(args[0])
        out = func(*args, **kwargs)
        for t in iter_tensors(out):
            self.track(t)
        return out

    # ----- results (record) ----------------------------------------------------------------
    def phase_at(self, event_index):
        phase = "start"
        for idx, name in self.phase_marks:
            if idx <= event_index:
                phase = name
            else:
                break
        return phase

    def breakdown_at(self, event_index):
        """Live bytes by (final) label just after event ``event_index``."""
        live = {}
        for uid, delta in self.events[:event_index + 1]:
            if delta > 0:
                live[uid] = delta
            else:
                live.pop(uid, None)
        out = {lab: 0 for lab in self.labels}
        for uid, size in live.items():
            out[self.label[uid]] += size
        return out

    def layer_bytes(self):
        """Bytes per layer of the allocations whose final label is ``layer_label``."""
        out = {}
        for uid, name in self.layer.items():
            if self.label[uid] == self.layer_label:
                out[name] = out.get(name, 0) + self.sizes[uid]
        return out


#: What a standalone script needs, in order, to define ``LiveBytesTracker`` (besides ``import
#: weakref``, ``import torch`` and ``from torch.utils._python_dispatch import TorchDispatchMode``).
PORTABLE = (format_bytes, SimulatedOutOfMemory, iter_tensors, LiveBytesTracker)


def portable_source() -> str:
    """The source of ``PORTABLE``, ready to embed in a script."""
    return "\n\n".join(inspect.getsource(obj) for obj in PORTABLE)


# ----- process RSS (portable: stdlib only) -------------------------------------------------------
def resident_bytes():
    """This process's resident set size in bytes: /proc on Linux, else psutil, else (without it)
    the peak so far from getrusage."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, AttributeError, ValueError):
        pass
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        import resource
        import sys

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


class RssSampler:
    """Peak resident set size: a background thread samples every ``interval_s`` seconds."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self._read = resident_bytes
        self.start_bytes = self._read()
        self.peak_bytes = self.start_bytes
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        rss = self._read()
        if rss > self.peak_bytes:
            self.peak_bytes = rss
        return rss

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> "RssSampler":
        self._thread = threading.Thread(target=self._loop, name="headroom-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        self.sample()


# ----- the measure loop's reads, on both devices (portable: the exported script's PeakMemory reads
# them, so it embeds ``PROBES`` below) ---------------------------------------------------
class PhaseEnd(NamedTuple):
    """What a probe reads at the end of a phase, in one go."""

    allocated: int  # current allocated - baseline
    reserved: int  # current reserved
    peak: int  # peak allocated - baseline since the last phase end
    peak_reserved: int  # peak reserved since the last phase end


class CudaProbe:
    """The caching allocator's counters, read from ``memory_stats_as_nested_dict``.

    ``torch.cuda.memory_allocated`` and its siblings each flatten and sort the allocator's whole
    stats dict (~0.1 ms); a step reads the counters at every phase boundary and at 16 points of the
    backward, so the nested dict is read once per point and indexed instead.
    """

    def __init__(self, torch, device):
        self.torch, self.device = torch, device
        self.baseline = 0

    def _stats(self) -> tuple[dict, dict]:
        stats = self.torch.cuda.memory_stats_as_nested_dict(self.device)
        return stats["allocated_bytes"]["all"], stats["reserved_bytes"]["all"]

    def allocated(self) -> int:
        return self._stats()[0]["current"] - self.baseline

    def reserved(self) -> int:
        return self._stats()[1]["current"]

    def take_phase_peaks(self) -> tuple[int, int]:
        """(peak allocated - baseline, peak reserved) since the last call; resets the counters."""
        end = self.phase_end()
        return end.peak, end.peak_reserved

    def phase_end(self) -> PhaseEnd:
        """Current and peak counters since the last phase end (one read); resets the peaks."""
        alloc, reserved = self._stats()
        self.torch.cuda.reset_peak_memory_stats(self.device)
        return PhaseEnd(alloc["current"] - self.baseline, reserved["current"],
                        alloc["peak"] - self.baseline, reserved["peak"])

    def sync(self) -> None:
        self.torch.cuda.synchronize(self.device)

    def used(self) -> int:
        free, total = self.torch.cuda.mem_get_info(self.device)
        return int(total - free)


class CpuProbe:
    """The CPU's counterparts: tracked live tensor bytes ("allocated") and RSS growth ("reserved")."""

    def __init__(self, tracker: LiveBytesTracker, rss: RssSampler):
        self.tracker, self.rss = tracker, rss
        self.baseline = 0

    def allocated(self) -> int:
        return self.tracker.live_bytes

    def reserved(self) -> int:
        return self.rss.sample() - self.rss.start_bytes

    def take_phase_peaks(self) -> tuple[int, int]:
        peak = self.tracker.peak_bytes
        self.tracker.reset_peak()
        return peak, self.rss.peak_bytes - self.rss.start_bytes

    def phase_end(self) -> PhaseEnd:
        allocated, reserved = self.allocated(), self.reserved()
        peak, peak_reserved = self.take_phase_peaks()
        return PhaseEnd(allocated, reserved, peak, peak_reserved)

    def sync(self) -> None:
        pass

    def used(self) -> int:
        return self.rss.peak_bytes


#: What the exported script's PeakMemory reads the devices with (torch and stdlib only).
PROBES = (resident_bytes, RssSampler, PhaseEnd, CudaProbe, CpuProbe)
