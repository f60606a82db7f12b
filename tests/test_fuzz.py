"""Fuzz of the profile loader and every dataset reader (bench/fuzz_inputs.py's targets), a few
hundred cases in all: every file ends in a value or a one-line BadInput. The benchmark run of
10,000 cases per target is recorded in docs/benchmarks.md."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fuzz_inputs import _TEXT_COLUMNS, TARGETS, run_case

EXAMPLES = int(os.environ.get("HEADROOM_FUZZ_EXAMPLES", "80"))


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzzed_files_end_in_a_value_or_one_line(name):
    if name == "parquet":
        pytest.importorskip("pyarrow")
    target = TARGETS[name]
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="headroom-fuzz-") as tmp:

        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(data=target.contents, text_column=_TEXT_COLUMNS, limit=st.sampled_from([1, 3, 50]))
        def case(data, text_column, limit):
            outcomes.append(run_case(target, Path(tmp), data, text_column, limit))

        case()
    assert set(outcomes) <= {"ok", "refused"} and len(outcomes) >= EXAMPLES // 2
