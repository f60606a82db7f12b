"""Behaviour and numbers do not change: the estimates and CPU measures of a dozen varied profiles
equal the ones recorded before the technique registry refactor (``tests/baseline_numbers.py``
recorded them; rerun it only when a change of numbers is intended and explained)."""

from __future__ import annotations

import json

import pytest

import baseline_numbers as baseline

RECORDED = json.loads(baseline.FIXTURE.read_text(encoding="utf-8"))


def test_the_fixture_covers_every_profile():
    assert sorted(RECORDED) == sorted(baseline.PROFILES)
    assert all(RECORDED[n]["profile"] == baseline.PROFILES[n] for n in RECORDED)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(baseline.PROFILES))
def test_numbers_are_unchanged(name):
    now = baseline.compute(name)
    for part in ("analytic", "traced", "measure"):
        assert now.get(part) == RECORDED[name].get(part), f"{name}: {part} changed"
