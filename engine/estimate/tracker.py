"""Live-bytes accounting of every tensor storage an op creates, by category (fake or real tensors).

A ``TorchDispatchMode`` sees each op's outputs; a new storage is recorded with its size (rounded
to the allocator's 512-byte blocks when modelling CUDA) and a ``weakref.finalize`` on the storage
records its release. The sequence of (storage, +bytes / -bytes) events gives the peak, the phase
of the peak, the caching allocator's reserved bytes (``allocator.simulate``) and, replayed with
each storage's final category, the breakdown at the peak. The same tracker runs on real CPU
tensors, which is how the tests check the traced estimator against a real run.

Categories (priority, highest first): weights, gradients, optimizer, activations (saved for
backward, via ``saved_tensors_hooks``), temporaries (everything else).
Idea after PyTorch's MemTracker (``torch.distributed._tools.mem_tracker``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

WEIGHTS, GRADIENTS, OPTIMIZER, ACTIVATIONS, TEMPORARIES = (
    "weights", "gradients", "optimizer", "activations", "temporaries")
_PRIORITY = {WEIGHTS: 5, GRADIENTS: 4, OPTIMIZER: 3, ACTIVATIONS: 2, TEMPORARIES: 1}

_aten = torch.ops.aten


def round_block(nbytes: int) -> int:
    """CUDA caching allocator block size: requests rounded up to 512 bytes (kMinBlockSize)."""
    if nbytes <= 0:
        return 0
    return ((nbytes + 511) // 512) * 512


class MemoryTracker(TorchDispatchMode):
    """Records storage allocations/frees made by ops while active.

    ``scalar`` answers data-dependent ``.item()`` calls under fake tensors (returns a number).
    """

    def __init__(self, cuda_rounding: bool, scalar: Callable[[torch.Tensor], object] | None = None):
        super().__init__()
        self.cuda_rounding = cuda_rounding
        self.scalar = scalar
        self.events: list[tuple[int, int]] = []  # (allocation id, +size | -size)
        self.live: dict[int, tuple[int, int]] = {}  # storage key -> (allocation id, size)
        self.sizes: list[int] = []  # allocation id -> size
        self.category: list[str] = []  # allocation id -> category
        self.layer: dict[int, str] = {}  # allocation id -> layer that saved it
        self.current = 0
        self.peak = 0
        self.peak_event = -1
        self.phase_marks: list[tuple[int, str]] = []  # (event index, phase name)
        self.current_layer = ""
        self.layer_tracking = True
        self.timeline: list[tuple[str, int]] = []  # (phase starting, live bytes then)
        self._finalizers: list = []

    # ----- recording -----------------------------------------------------------------------
    def size_of(self, nbytes: int) -> int:
        return round_block(nbytes) if self.cuda_rounding else nbytes

    def track(self, t: torch.Tensor, category: str = TEMPORARIES) -> None:
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key = st._cdata
        if key in self.live:
            self.classify(t, category)
            return
        size = self.size_of(st.nbytes())
        uid = len(self.sizes)
        self.sizes.append(size)
        self.category.append(category)
        self.live[key] = (uid, size)
        self.events.append((uid, size))
        self.current += size
        if self.current > self.peak:
            self.peak = self.current
            self.peak_event = len(self.events) - 1
        self._finalizers.append(weakref.finalize(st, self._free, key))

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is None:
            return
        uid, size = entry
        self.events.append((uid, -size))
        self.current -= size

    def classify(self, t: torch.Tensor, category: str) -> None:
        try:
            key = t.untyped_storage()._cdata
        except (RuntimeError, NotImplementedError):
            return
        entry = self.live.get(key)
        if entry is None:
            return
        uid = entry[0]
        if _PRIORITY[category] > _PRIORITY[self.category[uid]]:
            self.category[uid] = category
        if category == ACTIVATIONS and self.layer_tracking and self.current_layer \
                and uid not in self.layer and self.category[uid] == ACTIVATIONS:
            self.layer[uid] = self.current_layer

    def mark_phase(self, name: str) -> None:
        self.phase_marks.append((len(self.events), name))
        self.timeline.append((name, self.current))

    def detach(self) -> None:
        """Stop listening for frees (tracked objects may outlive the tracker)."""
        for f in self._finalizers:
            f.detach()
        self._finalizers.clear()

    # ----- dispatch ------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _aten._local_scalar_dense.default and self.scalar is not None:
            try:
                return func(*args, **kwargs)
            except (RuntimeError, NotImplementedError):  # meta/fake: no data; answer as a run would
                return self.scalar(args[0])
        out = func(*args, **kwargs)
        flat, _ = tree_flatten(out)
        for t in flat:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out

    # ----- results -------------------------------------------------------------------------
    def phase_at(self, event_index: int) -> str:
        phase = "start"
        for idx, name in self.phase_marks:
            if idx <= event_index:
                phase = name
            else:
                break
        return phase

    def breakdown_at(self, event_index: int) -> dict[str, int]:
        """Live bytes by (final) category just after event ``event_index``."""
        live: dict[int, int] = {}
        for key, delta in self.events[:event_index + 1]:
            if delta > 0:
                live[key] = delta
            else:
                live.pop(key, None)
        out = {WEIGHTS: 0, GRADIENTS: 0, OPTIMIZER: 0, ACTIVATIONS: 0, TEMPORARIES: 0}
        for uid, size in live.items():
            out[self.category[uid]] += size
        return out

    def layer_activation_bytes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for uid, name in self.layer.items():
            if self.category[uid] == ACTIVATIONS:
                out[name] = out.get(name, 0) + self.sizes[uid]
        return out
