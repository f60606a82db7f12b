"""Searches for speed: the fastest settings that fit a budget, and which catalog GPU a profile fits.

    result = fastest(profile, budget_bytes=24 * 2**30)   # top few settings by estimated tokens/s
    result.candidates[0].profile                         # the best, a Profile ready to use
    rows = which_gpu(profile)                            # every catalog GPU: fits?, tokens/s

``fastest`` tries precision (fp32, the GPU's AMP dtype, pure bf16 where the GPU has it),
gradient checkpointing (off, every block; the profile's every-k too), with LoRA on the ranks 8, 16
and 64 for the best of those, the dataset in token budgets or length buckets for the best (ranked
by real, non-pad tokens per second), and for each the largest batch that
fits (``engine.plan.plan``'s search) and the profile's own batch split into the fewest
micro-batches that fit; each point is the analytic estimate (memory and speed, milliseconds), so
the whole search is a few hundred estimates. Settings that change numerics (pure bf16) are marked.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.errors import BadInput, Cancelled
from engine.profile import FIELDS_BY_NAME, Profile

#: Candidates returned by default.
TOP = 5


@dataclass(frozen=True)
class Candidate:
    changes: dict[str, Any]  # fields changed from the given profile
    profile: Profile
    device_used_bytes: int
    tokens_per_s: float
    step_s: float
    margin_bytes: int  # budget - device used
    notes: tuple[str, ...] = ()
    useful_tokens_per_s: float = 0.0  # real (non-pad) tokens per second over the dataset's plan

    @property
    def score(self) -> float:
        """What the search ranks by: real tokens/s where the dataset says, else tokens/s."""
        return self.useful_tokens_per_s or self.tokens_per_s

    def to_dict(self) -> dict[str, Any]:
        return {"changes": dict(self.changes), "profile": self.profile.to_dict(),
                "device_used_bytes": self.device_used_bytes, "tokens_per_s": self.tokens_per_s,
                "step_s": self.step_s, "margin_bytes": self.margin_bytes, "notes": list(self.notes),
                "useful_tokens_per_s": self.useful_tokens_per_s}


@dataclass(frozen=True)
class FastestResult:
    budget_bytes: int
    gpu: str
    candidates: tuple[Candidate, ...]
    searched: int  # estimates made
    elapsed_s: float
    expected_error: float  # the speed calibration's median error
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["candidates"] = [c.to_dict() for c in self.candidates]
        d["notes"] = list(self.notes)
        d["goal"] = "fastest"
        best = self.candidates[0] if self.candidates else None
        d["fits"] = best is not None
        d["tokens_per_s"] = best.tokens_per_s if best else 0.0
        d["device_used_bytes"] = best.device_used_bytes if best else 0
        return d


@dataclass(frozen=True)
class GpuFit:
    gpu: str
    name: str
    memory_bytes: int
    fits: bool
    device_used_bytes: int
    tokens_per_s: float
    step_s: float
    margin_bytes: int
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _precisions(profile: Profile, gpu) -> list[str]:
    half = "bf16" if gpu.bf16 else "fp16"
    out = ["fp32", f"{half}-amp"]
    if gpu.bf16 and profile.mode == "train":
        out.append("bf16")
    elif profile.mode != "train":
        out.append(half)  # inference in pure half precision is the usual serving setting
    return out


def _checkpointing(profile: Profile) -> list[dict[str, Any]]:
    if profile.mode != "train" or "checkpointing" not in FIELDS_BY_NAME:
        return [{}]
    out = [{"checkpointing": False}, {"checkpointing": True}]
    if "checkpoint_every" in FIELDS_BY_NAME:
        out[1]["checkpoint_every"] = 1
        if profile.checkpointing and profile.checkpoint_every > 1:  # the profile's own k as well
            out.append({"checkpointing": True, "checkpoint_every": profile.checkpoint_every})
    return out


def _resized(profile: Profile, batch: int) -> dict[str, Any]:
    from engine import techniques

    return techniques.resized(profile, {"batch": batch})


def _largest_batch(profile: Profile, budget: int, estimate, should_stop) -> tuple[int, int]:
    """(largest batch whose analytic estimate fits, estimates made). Memory is close to affine in
    the batch: two estimates give the line, a third and fourth confirm the boundary; where the
    line misleads (allocator rounding), ``engine.plan.plan``'s exponential + binary search."""
    from engine.plan import MAX_BATCH, plan

    made = 0

    def used(b: int) -> int:
        nonlocal made
        if should_stop is not None and should_stop():
            raise Cancelled("plan cancelled")
        made += 1
        return estimate(profile.replace(**_resized(profile, b)), method="analytic").device_used_bytes

    u1 = used(1)
    if u1 > budget:
        return 0, made
    u2 = used(2)
    if u2 > budget:
        return 1, made
    slope = max(1, u2 - u1)
    guess = max(2, min(MAX_BATCH, 1 + (budget - u1) // slope))
    for b in (guess, guess - 1, guess - 2):
        if b <= 2:
            return 2, made
        if used(b) <= budget:
            if b == MAX_BATCH or used(b + 1) > budget:
                return b, made
            break  # the line is low here: search properly
    r = plan(profile, budget, "batch", should_stop=should_stop, quick=True)
    return r.value, made + int(r.extra.get("estimates", 0))


def fastest(profile: Profile, budget_bytes: int | None = None, top: int = TOP,
            progress: Callable[[float, str], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> FastestResult:
    """The settings with the highest estimated tokens/s whose estimated device memory fits."""
    from engine import gpus
    from engine.estimate import estimate as full_estimate
    from engine.estimate import speed
    from engine.prepare import prepare

    # The search's ~70 estimates take reserved from the closed form (quick); what it returns is
    # re-estimated in full (reserved replayed in order, ~10 ms each), and a candidate that no
    # longer fits gives way to the next.
    estimate = functools.partial(full_estimate, quick=True)
    started = time.perf_counter()
    if profile.target != "cuda":
        raise BadInput("--goal fastest estimates GPU speed: use --target cuda (and --gpu NAME)")
    gpu = gpus.for_profile(profile)
    if budget_bytes is None:
        if not gpu.memory_bytes:
            raise BadInput("the custom GPU has no memory of its own: give --budget SIZE")
        budget_bytes = gpu.memory_bytes
    if budget_bytes <= 0:
        raise BadInput("the budget must be a positive size (e.g. 24GiB)")
    prepare(profile)
    searched = 0
    seen: dict[tuple, Candidate | None] = {}
    variants: list[dict[str, Any]] = []
    for precision in _precisions(profile, gpu):
        for ck in _checkpointing(profile):
            variants.append({"precision": precision, **ck})
    total = len(variants)

    def check_stop() -> None:
        if should_stop is not None and should_stop():
            raise Cancelled("plan cancelled")

    def consider(p: Profile, changes: dict[str, Any], notes: tuple[str, ...] = ()) -> None:
        nonlocal searched
        key = tuple(sorted(p.non_defaults().items()))
        if key in seen:
            return
        r = estimate(p, method="analytic")
        searched += 1
        if r.device_used_bytes > budget_bytes or not r.tokens_per_s:
            seen[key] = None
            return
        seen[key] = Candidate(changes=changes, profile=p, device_used_bytes=r.device_used_bytes,
                              tokens_per_s=r.tokens_per_s, step_s=r.step_s,
                              margin_bytes=budget_bytes - r.device_used_bytes, notes=notes,
                              useful_tokens_per_s=float(r.extra.get("speed", {}).get(
                                  "useful_tokens_per_s", 0.0)))

    for i, change in enumerate(variants):
        check_stop()
        if progress is not None:
            progress(i / total, f"{change}")
        try:
            base = profile.replace(**change)
            prepare(base)
        except BadInput:
            continue
        notes = ("pure bf16 weights: numerics differ from AMP",) if change["precision"] == "bf16" else ()
        # (a) the largest batch that fits, one pass per step
        one_pass = base.replace(micro_batches=1) if "micro_batches" in FIELDS_BY_NAME else base
        b, n = _largest_batch(one_pass, budget_bytes, estimate, should_stop)
        searched += n
        if b:
            p = one_pass.replace(**_resized(one_pass, b))
            consider(p, {**change, "batch": b, "micro_batches": 1}, notes)
        # (b) the profile's own batch, in the fewest micro-batches that fit
        if profile.mode == "train" and "micro_batches" in FIELDS_BY_NAME:
            m = 1
            while m <= profile.batch:
                p = base.replace(micro_batches=m)
                consider(p, {**change, "micro_batches": m}, notes)
                c = seen.get(tuple(sorted(p.non_defaults().items())))
                if c is not None:
                    break
                m *= 2
    found = sorted((c for c in seen.values() if c is not None), key=lambda c: -c.score)
    # padding: for the best setting, the dataset in token budgets and in length buckets (the
    # same tokens a step at most, so about the same peak), ranked by real tokens per second
    if found and profile.mode == "train" and {"padding", "max_tokens"} <= set(FIELDS_BY_NAME):
        best = found[0]
        bp = best.profile
        tries = [{"padding": "token-budget", "max_tokens": bp.batch * bp.seq}, {"padding": "bucketed"}]
        for change in tries:
            check_stop()
            if bp.padding == change["padding"]:
                continue
            try:
                alt = bp.replace(**change)
                consider(alt, {**best.changes, **change}, best.notes)
            except BadInput:
                continue
        found = sorted((c for c in seen.values() if c is not None), key=lambda c: -c.score)
    # LoRA on: other ranks for the best setting (a smaller rank frees memory for a larger batch)
    rank = getattr(profile, "lora", 0)
    if found and rank and "lora" in FIELDS_BY_NAME:
        best = found[0]
        for r in sorted({8, 16, 64} - {rank}):
            check_stop()
            alt = best.profile.replace(lora=r)
            b, n = _largest_batch(alt, budget_bytes, estimate, should_stop)
            searched += n
            if b:
                consider(alt.replace(**_resized(alt, b)), {**best.changes, "lora": r, "batch": b},
                         best.notes)
        found = sorted((c for c in seen.values() if c is not None), key=lambda c: -c.score)
    found = _confirmed(found, top, budget_bytes, full_estimate)
    notes = []
    if not found:
        notes.append("nothing searched fits the budget (batch 1 with every setting tried)")
    notes.append(f"speeds for {gpu.name}; expected error {speed.calibration().median_error:.0%} "
                 f"median (bench/fit_speed.py)")
    if progress is not None:
        progress(1.0, "done")
    return FastestResult(budget_bytes=int(budget_bytes), gpu=gpu.key, candidates=tuple(found[:top]),
                         searched=searched, elapsed_s=time.perf_counter() - started,
                         expected_error=speed.calibration().median_error, notes=tuple(notes))


def _confirmed(found: list[Candidate], top: int, budget_bytes: int, estimate) -> list[Candidate]:
    """The first ``top`` candidates re-estimated in full (reserved replayed in order). One that
    no longer fits has its batch scaled down to the budget (memory is close to affine in the
    batch: a try or two); it is dropped when even that does not fit."""
    out: list[Candidate] = []
    kept: set[tuple] = set()
    for c in found:
        if len(out) >= top:
            break
        p, changes = c.profile, dict(c.changes)
        r = estimate(p, method="analytic")
        tries = 0
        while r.device_used_bytes > budget_bytes and p.batch > 1 and tries < 4:
            tries += 1
            scale = budget_bytes / r.device_used_bytes * 0.98
            b = max(1, min(p.batch - 1, int(p.batch * scale)))
            p = p.replace(**_resized(p, b))
            changes["batch"] = b
            if getattr(p, "max_tokens", 0):  # a token budget sets the batch's tokens: scale it too
                p = p.replace(max_tokens=max(p.seq, int(p.max_tokens * scale)))
                changes["max_tokens"] = p.max_tokens
            r = estimate(p, method="analytic")
        key = tuple(sorted(p.non_defaults().items()))
        if r.device_used_bytes > budget_bytes or key in kept:
            continue
        kept.add(key)
        out.append(dataclasses.replace(
            c, profile=p, changes=changes, device_used_bytes=r.device_used_bytes,
            margin_bytes=budget_bytes - r.device_used_bytes, tokens_per_s=r.tokens_per_s,
            step_s=r.step_s, useful_tokens_per_s=float(r.extra.get("speed", {}).get(
                "useful_tokens_per_s", 0.0)) or c.useful_tokens_per_s))
    return sorted(out, key=lambda c: -c.score)


def which_gpu(profile: Profile, progress: Callable[[float, str], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> list[GpuFit]:
    """Every catalog GPU (but "custom"): does the profile fit its memory, and how fast would it be."""
    from engine import gpus
    from engine.estimate import estimate

    if profile.target != "cuda":
        raise BadInput("--which-gpu is for CUDA profiles: use --target cuda")
    rows = []
    keys = [k for k in gpus.names() if k != "custom"]
    for i, key in enumerate(keys):
        if should_stop is not None and should_stop():
            raise Cancelled("plan cancelled")
        g = gpus.get(key)
        p = profile.replace(gpu=key)
        note = ""
        if "bf16" in p.precision and not g.bf16:
            p = p.replace(precision=p.precision.replace("bf16", "fp16"))
            note = f"no bf16: estimated with {p.precision}"
        r = estimate(p, method="analytic")
        rows.append(GpuFit(gpu=key, name=g.name, memory_bytes=g.memory_bytes,
                           fits=r.device_used_bytes <= g.memory_bytes,
                           device_used_bytes=r.device_used_bytes, tokens_per_s=r.tokens_per_s,
                           step_s=r.step_s, margin_bytes=g.memory_bytes - r.device_used_bytes,
                           note=note))
        if progress is not None:
            progress((i + 1) / len(keys), g.name)
    return rows


__all__ = ["Candidate", "FastestResult", "GpuFit", "fastest", "which_gpu"]
