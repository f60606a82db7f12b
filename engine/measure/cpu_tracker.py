"""CPU memory tracking: live tensor bytes (exact, per storage) and the process RSS (sampled).

CPU has no caching allocator with statistics, so a measured CPU run counts bytes itself:

``LiveBytesTracker`` is a ``TorchDispatchMode``. Every tensor an ATen op returns (forward, the
autograd engine's backward ops, optimizer updates, factory calls) has its storage registered once
with a weak reference whose callback subtracts the bytes when the storage dies, so ``live_bytes``
is the sum of the sizes of the distinct live storages (views counted once) and ``peak_bytes`` the
largest value since ``reset_peak``. Tensors that already exist when tracking starts (parameters,
buffers) are registered with ``track``. This is PyTorch's MemTracker approach, without its module
hooks. Cost: one Python call per ATen op (about 10-30 us), which matters for timing, not for bytes;
CPU timings are indicative only.

A simulated capacity (``cap_bytes``) makes the op that would push live bytes beyond it raise
``SimulatedOutOfMemory`` (a ``torch.OutOfMemoryError``), as the CUDA allocator would.

``RssSampler`` samples the resident set size in a thread (every ``interval_s``) and at the points
the runner asks (``sample()``), keeping the maximum: a coarse upper view including the
interpreter, libraries and allocator slack.
"""

from __future__ import annotations

import os
import threading
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.units import format_bytes

try:  # torch >= 2.5 exposes it at the top level; older releases under torch.cuda
    _OOM_BASE = torch.OutOfMemoryError
except AttributeError:  # pragma: no cover
    _OOM_BASE = torch.cuda.OutOfMemoryError


class SimulatedOutOfMemory(_OOM_BASE):
    """Live tensor bytes would exceed the profile's simulated capacity (``memory_cap_bytes``)."""


def _iter_tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _iter_tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _iter_tensors(x)


class LiveBytesTracker(TorchDispatchMode):
    """Distinct live storage bytes on one device, their peak, and an optional capacity."""

    def __init__(self, device: str = "cpu", cap_bytes: int = 0):
        super().__init__()
        self.device_type = torch.device(device).type
        self.cap_bytes = int(cap_bytes)  # 0 = no capacity
        self.live_bytes = 0  # distinct live storages, bytes
        self.peak_bytes = 0  # max of live_bytes since reset_peak()
        self.oom_raised = False  # the capacity was hit (the error may be wrapped by autograd)
        self._sizes: dict[int, int] = {}  # id(storage) -> bytes counted
        self._refs: dict[int, weakref.ref] = {}

    # ----- bookkeeping --------------------------------------------------------------------
    def _forget(self, key: int) -> None:
        self.live_bytes -= self._sizes.pop(key, 0)
        self._refs.pop(key, None)

    def track(self, tensor: torch.Tensor) -> None:
        """Count a tensor's storage (once), e.g. parameters that exist before tracking starts."""
        if tensor.device.type != self.device_type or tensor.is_sparse or tensor.is_nested:
            return
        try:
            st = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (some subclasses)
            return
        key = id(st)
        nbytes = st.nbytes()
        old = self._sizes.get(key)
        if old == nbytes:
            return
        live = self.live_bytes + nbytes - (old or 0)
        if self.cap_bytes and live > self.cap_bytes:
            # Like the CUDA allocator: the allocation that does not fit is refused, not counted.
            self.oom_raised = True
            raise SimulatedOutOfMemory(
                f"simulated capacity of {format_bytes(self.cap_bytes)} exceeded: "
                f"{format_bytes(self.live_bytes)} of live tensors, "
                f"{format_bytes(nbytes - (old or 0))} more requested")
        if old is None:
            self._refs[key] = weakref.ref(st, lambda _r, k=key: self._forget(k))
        self._sizes[key] = nbytes
        self.live_bytes = live
        if live > self.peak_bytes:
            self.peak_bytes = live

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes

    # ----- the dispatch mode ---------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in _iter_tensors(out):
            self.track(t)
        return out


def _rss_reader():
    """A fast function returning this process's RSS in bytes (``/proc`` on Linux, else psutil)."""
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    try:
        with open("/proc/self/statm", "rb") as fh:
            fh.read()

        def read() -> int:
            with open("/proc/self/statm", "rb") as fh:
                return int(fh.read().split()[1]) * page
        return read
    except OSError:
        pass
    try:
        import psutil

        proc = psutil.Process()
        return lambda: proc.memory_info().rss
    except ImportError:  # pragma: no cover
        import resource
        import sys

        scale = 1 if sys.platform == "darwin" else 1024
        return lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class RssSampler:
    """Peak resident set size: a background thread samples every ``interval_s`` seconds."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self._read = _rss_reader()
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
