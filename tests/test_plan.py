"""Plan: the largest batch / sequence whose estimate fits a budget; the Pareto front."""

import json

import pytest

from engine.errors import BadInput, Cancelled
from engine.estimate import estimate
from engine.plan import MAX_BATCH, pareto_front, plan
from engine.profile import Profile

GiB = 1 << 30


@pytest.mark.parametrize("vary", ["batch", "seq"])
def test_plan_finds_the_boundary(vary):
    p = Profile(model="tiny-gpt2", batch=4, seq=128)
    r = plan(p, budget_bytes=2 * GiB, vary=vary)
    assert r.fits and r.value >= 1
    assert r.estimate.device_used_bytes <= 2 * GiB
    if r.next_value:
        assert r.next_value == r.value + 1
        assert r.next_estimate.device_used_bytes > 2 * GiB
    else:
        assert r.value == r.limit
    values = [v for v, _ in r.curve]
    used = [u for _, u in r.curve]
    # monotone, up to one small 2 MiB segment: reserved comes from an allocator replay, in which
    # a larger shape can pack its small blocks into one segment fewer
    assert values == sorted(values)
    assert all(b >= a - (2 << 20) for a, b in zip(used, used[1:]))
    assert r.extra["estimates"] < 40


def test_plan_seq_stops_at_the_position_limit():
    r = plan(Profile(model="tiny-gpt2", batch=1, seq=64), budget_bytes=64 * GiB, vary="seq")
    assert r.value == 1024 and r.next_value == 0 and not r.next_estimate


def test_plan_budget_too_small_and_bad_input():
    r = plan(Profile(model="tiny-gpt2"), budget_bytes=1 << 20, vary="batch")
    assert not r.fits and r.value == 0 and r.next_value == 1
    with pytest.raises(BadInput):
        plan(Profile(model="tiny-gpt2"), budget_bytes=GiB, vary="width")
    with pytest.raises(BadInput):
        plan(Profile(model="tiny-gpt2"), budget_bytes=0)
    with pytest.raises(Cancelled):
        plan(Profile(model="tiny-gpt2"), budget_bytes=GiB, should_stop=lambda: True)


def test_plan_result_to_dict_is_json():
    r = plan(Profile(model="tiny-gpt2", seq=64), budget_bytes=GiB)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["value"] == r.value and d["vary"] == "batch" and d["limit"] == MAX_BATCH
    for key in ("peak_allocated_bytes", "peak_reserved_bytes", "device_used_bytes", "breakdown",
                "elapsed_s", "curve"):
        assert key in d


def test_plan_value_agrees_with_estimate():
    p = Profile(model="tiny-llama", seq=256, micro_batches=2, batch=2)
    r = plan(p, budget_bytes=int(1.5 * GiB), vary="batch")
    again = estimate(p.replace(batch=r.value), "analytic")
    assert again.device_used_bytes == r.estimate.device_used_bytes


def test_plan_traced_check_steps_down_if_needed():
    p = Profile(model="tiny-gpt2", seq=128)
    r = plan(p, budget_bytes=GiB, vary="batch", method="traced")
    assert r.method == "traced"
    assert estimate(p.replace(batch=r.value), "traced").device_used_bytes <= GiB


def test_pareto_front():
    pts = [(10, 5), (8, 5), (12, 9), (9, 1), (20, 9), (15, 12)]
    assert pareto_front(pts) == [(8, 5), (12, 9), (15, 12)]
    assert pareto_front([]) == []
    objs = [{"m": 3, "t": 1}, {"m": 1, "t": 2}]
    assert pareto_front(objs, memory=lambda o: o["m"], throughput=lambda o: o["t"]) == [objs[1]]
