"""Where a measured run's peak went: per-phase peaks and the breakdown at the peak by MemoryCategory.

Breakdown at the peak (how it is split, both devices)
    The peak is attributed to the (step, phase) where it happened. Peaks are read per phase
    (the peak counters are reset after each phase and the overall peak is the maximum of the
    phase peaks, which equals ``max_memory_allocated()`` over the steps). Within that phase, the
    sample point with the most allocated bytes is taken: phase start, phase end, and in backward
    every parameter's post-accumulate-grad hook. At that sample, weights (parameter and buffer
    storages, a distillation teacher's included), gradients (``.grad`` storages accumulated so far)
    and optimizer states (state tensors) are exact; ``activations`` is the rest of what was
    allocated at the sample (training: the autograd graph's saved tensors and the loss: the
    model's outputs are dropped before backward, as a plain loop does; inference: the outputs and
    whatever else is live after the forward); ``temporaries`` is the peak minus the sample
    (transient buffers between sample points: logits gradients, attention workspaces, autocast
    copies, foreach optimizer buffers, recomputed activations under checkpointing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from engine.results import MemoryCategory, TimelinePoint, empty_breakdown


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (tied weights and views counted once)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if t is None:
            continue
        t = getattr(t, "_local_tensor", t)  # a DTensor (FSDP2): the rank's local shard
        st = t.untyped_storage()
        seen[(str(t.device), st.data_ptr())] = st.nbytes()
    return sum(seen.values())


def optimizer_state_bytes(optimizer) -> int:
    return storage_bytes(v for state in optimizer.state.values() for v in state.values()
                         if isinstance(v, torch.Tensor))


@dataclass
class PhaseRecord:
    step: int
    phase: str
    peak: int = 0  # peak allocated (over baseline) during the phase
    sample_alloc: int = -1  # allocated at the fullest sample point of the phase
    sample_grads: int = 0  # gradient bytes at that sample
    sample_states: int = 0  # optimizer state bytes at that sample


@dataclass
class PeakAttribution:
    """Mutable state of one run: the phase being measured and what was recorded so far."""

    probe: Any = None  # probes.CudaProbe | probes.CpuProbe
    weights: int = 0
    grads: int = 0  # gradient bytes accumulated so far (post-accumulate hooks)
    grad_ids: set = field(default_factory=set)
    grads_sampled: int = 0  # gradient bytes at the last sample taken from a gradient hook
    states: int = 0
    states_of: int = 0  # parameters with optimizer state when ``states`` was counted
    step: int = -1
    phase: str = "model"
    current: PhaseRecord | None = None
    records: list[PhaseRecord] = field(default_factory=list)
    peak_reserved: int = 0
    timeline: list = field(default_factory=list)
    quiet: bool = False  # inside a quiet step: phase marks and hook samples are skipped

    def begin(self, step: int, phase: str) -> None:
        if self.quiet:
            self.phase = phase  # named in an OOM's message; nothing is read
            return
        self.step, self.phase = step, phase
        self.current = PhaseRecord(step, phase)
        self.sample()

    def sample(self, alloc: int | None = None) -> None:
        rec = self.current
        if rec is None or self.quiet:
            return
        if alloc is None:
            alloc = self.probe.allocated()
        if alloc > rec.sample_alloc:
            rec.sample_alloc, rec.sample_grads, rec.sample_states = alloc, self.grads, self.states

    def end(self) -> None:
        if self.quiet:
            return
        end = self.probe.phase_end()  # one read: the phase's last sample, its peaks, the timeline point
        self.sample(end.allocated)
        rec = self.current
        rec.peak = max(end.peak, rec.sample_alloc)
        self.peak_reserved = max(self.peak_reserved, end.peak_reserved)
        self.records.append(rec)
        self.timeline.append(TimelinePoint(self.step, self.phase, int(end.allocated), int(end.reserved)))
        self.current = None

    def begin_quiet(self, step: int, template: PhaseRecord) -> None:
        """Start a quiet step; ``template`` is the instrumented record of the same batch shape
        whose breakdown the step shares."""
        self.step, self.phase, self.quiet = step, "step", True
        self.current = PhaseRecord(step, "step", sample_alloc=template.sample_alloc,
                                   sample_grads=template.sample_grads,
                                   sample_states=template.sample_states)

    def end_quiet(self) -> None:
        """End a quiet step: one read of its peak counters."""
        self.quiet = False
        self.phase = "step"
        end = self.probe.phase_end()
        rec = self.current
        rec.peak = max(end.peak, rec.sample_alloc)
        self.peak_reserved = max(self.peak_reserved, end.peak_reserved)
        self.records.append(rec)
        self.timeline.append(TimelinePoint(self.step, "step", int(end.allocated), int(end.reserved)))
        self.current = None

    def step_record(self, step: int) -> PhaseRecord | None:
        """The fullest instrumented record of ``step`` (a quiet step's template)."""
        recs = [r for r in self.records if r.step == step and r.phase != "step"]
        return max(recs, key=lambda r: r.peak) if recs else None

    def start_timeline(self) -> None:
        """The timeline's first point: what is allocated before the first step."""
        self.timeline.append(TimelinePoint(0, "start", int(self.probe.allocated()),
                                           int(self.probe.reserved())))

    def close_partial(self) -> None:
        """After an OOM: record the interrupted phase's peak."""
        self.quiet = False
        if self.current is not None:
            rec = self.current
            peak, reserved = self.probe.take_phase_peaks()
            rec.peak = max(peak, rec.sample_alloc)
            self.peak_reserved = max(self.peak_reserved, reserved)
            self.records.append(rec)
            self.current = None

    def grad_hook(self, param) -> None:
        if self.quiet:
            return
        key = id(param)
        if key not in self.grad_ids and param.grad is not None:
            self.grad_ids.add(key)
            self.grads += getattr(param.grad, "_local_tensor", param.grad).untyped_storage().nbytes()
        # Reading the allocator's counters builds its whole stats dict (~0.1 ms): sampling after
        # every parameter cost up to 40 ms a step (bert-base, H100), enough to hide an AMP
        # speed-up. A sample per 1/16 of the weights' bytes keeps the breakdown's resolution.
        if self.grads - self.grads_sampled >= max(self.weights // 16, 1):
            self.grads_sampled = self.grads
            self.sample()

    def optimizer_stepped(self, optimizer) -> None:
        """After ``optimizer.step()``: count the states (they appear once per parameter, then
        stay) and sample."""
        if self.quiet:
            return
        if len(optimizer.state) != self.states_of:
            self.states, self.states_of = optimizer_state_bytes(optimizer), len(optimizer.state)
        self.sample()

    def grads_cleared(self) -> None:
        """After ``zero_grad(set_to_none=True)``."""
        self.grads, self.grad_ids, self.grads_sampled = 0, set(), 0

    def peak_record(self) -> PhaseRecord | None:
        return max(self.records, key=lambda r: r.peak) if self.records else None

    def breakdown(self) -> dict[str, int]:
        C = MemoryCategory
        rec = self.peak_record()
        out = empty_breakdown()
        if rec is None:
            return out
        left = rec.peak
        for cat, n in ((C.WEIGHTS, self.weights), (C.OPTIMIZER, rec.sample_states),
                       (C.GRADIENTS, rec.sample_grads),
                       (C.ACTIVATIONS, rec.sample_alloc - self.weights - rec.sample_states - rec.sample_grads)):
            take = max(0, min(n, left))
            out[cat.value] = take
            left -= take
        out[C.TEMPORARIES.value] = max(0, left)
        return out
