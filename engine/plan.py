"""Searches over the estimator: the largest batch (or sequence) that fits a memory budget, and the
Pareto front of (memory, throughput) points for comparing profiles.

    result = plan(profile, budget_bytes=24 * 2**30, vary="batch")
    result.value            # largest batch whose estimated device_used_bytes fits the budget
    result.curve            # (value, device_used_bytes) points for plotting

The search is exponential (1, 2, 4, ...) until an estimate no longer fits, then binary between the
last fit and the first miss; memory is monotone in batch and sequence length, so this finds the
boundary with O(log n) estimates. The analytic estimator is used by default (milliseconds per
point); ``method="traced"`` or ``"auto"`` re-checks the boundary with that estimator.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.errors import BadInput, Cancelled
from engine.profile import Profile
from engine.results import EstimateResult

VARIES = ("batch", "seq", "context")  # batch, seq and the techniques' plan axes (generation's context)
#: Upper bound of a batch search (a guard against a budget no estimate reaches).
MAX_BATCH = 1 << 16
#: Upper bound of a sequence search for models without a position limit (or windowed inference).
MAX_SEQ = 1 << 20


@dataclass(frozen=True)
class PlanResult:
    vary: str  # "batch" | "seq"
    budget_bytes: int  # the device memory budget searched against
    value: int  # largest value whose estimate fits (0: not even 1 fits)
    fits: bool  # value >= 1
    limit: int  # largest value searched (model positions for seq, MAX_BATCH for batch)
    estimate: EstimateResult | None  # estimate at ``value``
    next_value: int  # the next value searched that does not fit (0 if the limit fits)
    next_estimate: EstimateResult | None  # estimate at ``next_value``
    curve: tuple[tuple[int, int], ...] = ()  # (value, device_used_bytes), sorted by value
    method: str = "analytic"  # estimator used for the search
    notes: tuple[str, ...] = ()
    elapsed_s: float = 0.0  # wall time of the search
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["estimate"] = self.estimate.to_dict() if self.estimate else None
        d["next_estimate"] = self.next_estimate.to_dict() if self.next_estimate else None
        d["curve"] = [list(p) for p in self.curve]
        d["notes"] = list(self.notes)
        # Flat headline numbers, as `headroom plan --json` consumers read them.
        est = self.estimate
        d["peak_allocated_bytes"] = est.peak_allocated_bytes if est else 0
        d["peak_reserved_bytes"] = est.peak_reserved_bytes if est else 0
        d["device_used_bytes"] = est.device_used_bytes if est else 0
        d["breakdown"] = dict(est.breakdown) if est else {}
        return d


def _limit(profile: Profile, vary: str) -> int:
    if vary == "batch":
        return MAX_BATCH
    from engine import techniques
    from engine.prepare import prepare

    axis = techniques.plan_axis(vary)
    if axis is not None:  # e.g. the prompt: the positions less the new tokens
        return int(prepare(profile).max_positions or MAX_SEQ) - axis.offset(profile)

    prepared = prepare(profile)
    if any(techniques.get(name).forward_tokens for name in prepared.active):
        return MAX_SEQ  # inputs in windows: any length fits the positions
    return int(prepared.max_positions or MAX_SEQ)


def _with_value(profile: Profile, vary: str, value: int) -> Profile:
    """The profile at ``vary = value``, with the techniques' settings that follow it (each
    technique's ``resize``: micro-batches within the batch, a token budget of at least seq)."""
    from engine import techniques

    axis = techniques.plan_axis(vary)
    if axis is not None:
        return profile.replace(**{axis.field: value})
    return profile.replace(**techniques.resized(profile, {vary: value}))


def plan(profile: Profile, budget_bytes: int, vary: str = "batch",
         progress: Callable[[float, str], None] | None = None,
         should_stop: Callable[[], bool] | None = None, method: str = "analytic",
         quick: bool = False) -> PlanResult:
    """Largest ``vary`` (batch or seq) whose estimated device memory fits ``budget_bytes``.
    ``quick``: reserved from the closed form (~1 ms an estimate instead of ~10: for a caller
    that re-estimates what it keeps, as ``plan_search.fastest`` does)."""
    from engine.estimate import estimate

    started = time.perf_counter()
    from engine import techniques

    allowed = techniques.plan_varies(profile.mode)
    axis = techniques.plan_axis(vary)
    if vary not in allowed:
        raise BadInput(f"vary must be {' or '.join(allowed)} in {profile.mode} mode; got {vary!r}")
    if budget_bytes <= 0:
        raise BadInput("the budget must be a positive size (e.g. 24GiB)")
    limit = _limit(profile, vary)
    cache: dict[int, EstimateResult] = {}

    def est(value: int) -> EstimateResult:
        if should_stop is not None and should_stop():
            raise Cancelled("plan cancelled")
        if value not in cache:
            cache[value] = estimate(_with_value(profile, vary, value), method="analytic",
                                    quick=quick)
            if progress is not None:
                progress(min(0.95, len(cache) / 40), f"{vary}={value}: "
                         f"{cache[value].device_used_bytes / 2**30:.2f} GiB")
        return cache[value]

    def fits(value: int) -> bool:
        return est(value).device_used_bytes <= budget_bytes

    # Exponential phase.
    lo, hi = 0, 0  # lo: largest known fit, hi: smallest known miss (0 = none yet)
    value = 1
    while value <= limit:
        if fits(value):
            lo = value
            value *= 2
        else:
            hi = value
            break
    if lo and not hi and lo < limit:  # the doubling overshot the limit: try the limit itself
        if fits(limit):
            lo = limit
        else:
            hi = limit
    lo, hi = _bisect(lo, hi, fits)  # binary phase
    notes: list[str] = []
    used_method = "analytic"
    if method in ("traced", "auto") and lo:
        # Re-check the boundary with the more accurate estimator, stepping down if needed.
        used_method = method

        def fits_exact(v: int) -> bool:
            r = estimate(_with_value(profile, vary, v), method=method)
            cache[v] = r
            return r.device_used_bytes <= budget_bytes

        if not fits_exact(lo):
            lo, hi = _bisect(0, lo, fits_exact)
        elif hi and fits_exact(hi) and profile.mode == "generate":
            lo, hi = _search_up(hi, limit, fits_exact)  # the boundary is the exact estimator's
        elif hi and fits_exact(hi):
            notes.append(f"{method} estimate fits at {hi} too; the analytic search stopped there")
    if not lo:
        notes.append(f"even {vary}=1 needs more than the budget")
    if not hi:
        notes.append(f"{vary} reached its limit ({limit}) within the budget")
    # a plan axis reports its own value (context: prompt + new tokens; the search ran over the prompt)
    shift = axis.offset(profile) if axis is not None else 0
    curve = tuple(sorted((v + shift, r.device_used_bytes) for v, r in cache.items()))
    extra: dict[str, Any] = {"estimates": len(cache)}
    if axis is not None:
        extra.update({axis.field: lo, axis.offset_field: shift})
    result = PlanResult(
        vary=vary, budget_bytes=int(budget_bytes), value=lo + shift if lo else 0, fits=lo >= 1,
        limit=limit + shift, estimate=cache.get(lo), next_value=hi + shift if hi else 0,
        next_estimate=cache.get(hi) if hi else None,
        curve=curve, method=used_method, notes=tuple(notes),
        elapsed_s=time.perf_counter() - started, extra=extra)
    if progress is not None:
        progress(1.0, f"largest {vary}: {lo}")
    return result


def _search_up(lo: int, limit: int, fits: Callable[[int], bool]) -> tuple[int, int]:
    """(largest fit, smallest miss or 0) above a known fit ``lo``: doubling, then bisection."""
    hi = 0
    while lo < limit:
        value = min(lo * 2, limit)
        if fits(value):
            lo = value
        else:
            hi = value
            break
    return _bisect(lo, hi, fits)


def _bisect(lo: int, hi: int, fits: Callable[[int], bool]) -> tuple[int, int]:
    """(largest fit, smallest miss) between a known fit ``lo`` (0: none) and a known miss ``hi``
    (0: none, then nothing to search)."""
    while hi and hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi


def pareto_front(points: Iterable[Any], memory: Callable[[Any], float] | None = None,
                 throughput: Callable[[Any], float] | None = None) -> list[Any]:
    """The points no other point beats on both memory (lower) and throughput (higher).

    ``points`` are (memory, throughput) pairs, or any objects with ``memory``/``throughput``
    key functions given. Returned sorted by memory, ascending (throughput then ascends too).
    """
    mem = memory or (lambda p: p[0])
    thr = throughput or (lambda p: p[1])
    items: Sequence[Any] = list(points)
    ordered = sorted(items, key=lambda p: (mem(p), -thr(p)))
    front: list[Any] = []
    best = float("-inf")
    for p in ordered:
        if thr(p) > best:
            front.append(p)
            best = thr(p)
    return front


__all__ = ["VARIES", "PlanResult", "pareto_front", "plan"]
