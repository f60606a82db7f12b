"""The measured step loop: train and infer steps, their timing, and the per-pass throughput report.

A training step is, per micro-batch, the copy of its tensors to the device, forward + loss under
autocast (only the loss is kept: the outputs are dropped before backward, as in a plain loop;
``keep_outputs`` keeps them until the next forward has returned, as ``outputs = model(**batch)`` does),
backward (scaled under fp16 AMP), then the optimizer step and ``zero_grad(set_to_none=True)``. An
inference step is the forward under ``no_grad``, window by window when ``chunk_input`` is set.
Every phase is bracketed by the attribution's ``begin``/``end`` (engine.measure.attribution).
Step times are taken between two ``probe.sync()`` calls (``torch.cuda.synchronize`` on CUDA).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from engine.measure.attribution import PeakAttribution
from engine.measure.inputs import StepData, micro_parts, to_device


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


def grad_scaler(device: str):
    amp = getattr(torch, "amp", None)
    if amp is not None and hasattr(amp, "GradScaler"):
        return amp.GradScaler(device)
    return torch.cuda.amp.GradScaler()  # pragma: no cover - torch < 2.3


def check_cpu_autocast(model, step: StepData, dtype, notes: list[str], training: bool):
    """CPU autocast fp16/bf16 may lack kernels for some ops: try one tiny step before measuring.

    Returns the dtype to run with (fp16 falls back to bf16, bf16 to fp32), with a note.
    """
    ids = step.input_ids[:1, :8]
    mask = step.attention_mask[:1, :8]
    for candidate in ([dtype, torch.bfloat16] if dtype == torch.float16 else [dtype]):
        try:
            with torch.autocast(device_type="cpu", dtype=candidate):
                out = model(input_ids=ids, attention_mask=mask)
                loss = out.logits.float().mean()
            if training:
                loss.backward()
                model.zero_grad(set_to_none=True)
            if candidate != dtype:
                notes.append(f"CPU autocast fp16 is not supported for this model here; "
                             f"ran bf16 autocast instead (same 2-byte activations)")
            return candidate
        except (RuntimeError, NotImplementedError) as exc:
            first = first_line(exc)
            model.zero_grad(set_to_none=True)
    notes.append(f"CPU autocast is not supported for this model here ({first}); ran fp32")
    return None


@dataclass
class StepLoop:
    """What one step needs; ``step(s, data)`` runs step ``s`` and returns its loss (None: infer)."""

    attribution: PeakAttribution
    model: Any
    dev: Any  # torch.device
    profile: Any
    check_stop: Callable[[], None]
    optimizer: Any = None  # None: inference
    extras: list = field(default_factory=list)  # the techniques' frozen models (a teacher)
    loss_hook: Any = None  # a technique's loss (LoopHooks.loss), else the model's own
    scaler: Any = None  # GradScaler (fp16 AMP training)
    amp_dtype: Any = None  # autocast dtype, None: no autocast
    micro_batches: int = 1
    window: int = 0  # inference: tokens per window (0: whole inputs)
    keep_outputs: bool = False  # keep the forward's output object until the next forward returned
    kept: Any = None  # the kept outputs (keep_outputs)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.dev.type, dtype=self.amp_dtype)

    def step(self, s: int, data: StepData):
        if self.optimizer is not None:
            return self._train_step(s, data)
        self._infer_step(s, data)
        return None

    def _train_step(self, s: int, data: StepData):
        run, model, dev = self.attribution, self.model, self.dev
        parts = micro_parts(data, self.micro_batches)
        total_loss = None
        for j, (ids, mask, labels) in enumerate(parts):
            if j:
                self.check_stop()
            run.begin(s, "forward")
            ids, mask, labels = to_device(ids, dev), to_device(mask, dev), to_device(labels, dev)
            with self.autocast():
                # As in a plain loop, only the loss is kept: the outputs (logits) are dropped before
                # backward, so what stays alive is what autograd saved.
                if self.loss_hook is not None:
                    loss = self.loss_hook(model, self.extras, ids, mask, labels, self.profile)
                elif self.keep_outputs:
                    # ``outputs = model(**batch)`` of a hand-written loop: the name holds the outputs
                    # until it is bound again, after the next forward has returned
                    outputs = model(input_ids=ids, attention_mask=mask, labels=labels)
                    self.kept = outputs
                    loss = outputs.loss
                    del outputs
                else:
                    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss = loss / len(parts)
            run.end()
            run.begin(s, "backward")
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
            detached = loss.detach()
            del loss, ids, mask, labels
            total_loss = detached if total_loss is None else total_loss + detached
            run.end()
        run.begin(s, "optimizer")
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        run.optimizer_stepped(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        run.grads_cleared()
        run.end()
        return total_loss

    def _infer_step(self, s: int, data: StepData) -> None:
        from engine.batching import windows

        run, dev, window = self.attribution, self.dev, self.window
        T = data.input_ids.shape[1]
        spans = [(w[0], w[-1] + 1) for w in windows(range(T), window)] if window and T > window \
            else [(0, T)]
        run.begin(s, "forward")
        with torch.no_grad():
            for a, b in spans:
                ids = to_device(data.input_ids[:, a:b], dev)  # (B, W)
                mask = to_device(data.attention_mask[:, a:b], dev)  # (B, W)
                with self.autocast():
                    out = self.model(input_ids=ids, attention_mask=mask)
                run.sample()
                del out, ids, mask
        run.end()


@dataclass
class StepTimes:
    """What the timed loop has produced so far (complete steps only; kept after an OOM)."""

    first_step_s: float = 0.0  # the warm-up step
    step_times: list[float] = field(default_factory=list)  # the steps after it
    losses: list[float] = field(default_factory=list)

    @property
    def completed(self) -> int:
        return (1 if self.first_step_s else 0) + len(self.step_times)


def run_steps(loop: StepLoop, steps: list[StepData], probe, times: StepTimes,
              report: Callable[[float, str], None], rss=None, quiet_repeats: bool = False) -> None:
    """Run and time every step (between two ``probe.sync()``), appending to ``times``.

    ``report`` gets the fraction of the steps started. ``quiet_repeats``: a step whose batch shape
    was already run instrumented at step >= 1 (the optimizer's states exist from there on) runs
    quiet (``PeakAttribution.begin_quiet``): its time is the step's own, not the bookkeeping's."""
    run = loop.attribution
    templates: dict[tuple, object] = {}  # batch shape -> the record of the step that measured it
    for s, data in enumerate(steps):
        loop.check_stop()
        report(s / len(steps), f"step {s + 1}/{len(steps)}")
        template = templates.get(data.shape) if quiet_repeats else None
        probe.sync()
        t0 = time.perf_counter()
        if template is not None:
            run.begin_quiet(s, template)
        loss_value = loop.step(s, data)
        probe.sync()
        elapsed = time.perf_counter() - t0
        if template is not None:
            run.end_quiet()
        elif s >= 1 and quiet_repeats and data.shape not in templates:
            record = run.step_record(s)  # looked up once per shape, not once per quiet step
            if record is not None:
                templates[data.shape] = record
        if s == 0:
            times.first_step_s = elapsed
        else:
            times.step_times.append(elapsed)
        if loss_value is not None:
            times.losses.append(float(loss_value))
        if rss is not None:
            rss.sample()


# ----- throughput per pass over the dataset ------------------------------------------------------
def _pass_stats(steps: list[StepData], times: list[float], seen: set) -> dict[str, Any]:
    """Steps, time and throughput of a run of consecutive steps; ``new_shapes`` counts shapes not
    in ``seen`` (updated in place)."""
    new = 0
    for st in steps:
        if st.shape not in seen:
            seen.add(st.shape)
            new += 1
    total = float(sum(times))
    real = sum(st.real_tokens for st in steps)
    padded = sum(st.padded_tokens for st in steps)
    return {
        "steps": len(steps),
        "time_s": total,
        "s_per_step": total / len(steps) if steps else 0.0,
        "real_tokens": int(real),
        "padded_tokens": int(padded),
        "useful_tokens_per_s": real / total if total > 0 else 0.0,
        "tokens_per_s": padded / total if total > 0 else 0.0,
        "new_shapes": new,
    }


def pass_report(steps: list[StepData], all_times: list[float], n_plan: int) -> dict[str, Any]:
    """The first pass over the dataset (its first ``n_plan`` steps, where every batch shape appears
    for the first time: on CUDA each new shape may cost kernel plans or autotuning) reported apart
    from the steady state (the steps after it; None when there are none).

    ``all_times`` holds the completed steps' times, the first (warm-up) step included, so the first
    pass's time includes the warm-up; ``first_pass_excl_step0_s`` leaves it out.
    """
    done = steps[:len(all_times)]
    seen: set = set()
    first = _pass_stats(done[:n_plan], all_times[:n_plan], seen)
    first["complete"] = len(done) >= n_plan
    first["time_excl_step0_s"] = float(sum(all_times[1:n_plan]))
    later = done[1:min(n_plan, len(done))]
    first["tokens_per_s_excl_step0"] = (sum(st.padded_tokens for st in later) / first["time_excl_step0_s"]
                                        if first["time_excl_step0_s"] > 0 else 0.0)
    rest = done[n_plan:]
    steady = _pass_stats(rest, all_times[n_plan:], seen) if rest else None
    out: dict[str, Any] = {"plan_batches": n_plan, "first_pass": first, "steady": steady,
                           "first_over_steady": None}
    if steady and steady["tokens_per_s"] > 0 and first["tokens_per_s"] > 0:
        # Time per padded token, first pass over steady (1.0: no first-pass cost).
        out["first_over_steady"] = steady["tokens_per_s"] / first["tokens_per_s"]
    return out
