"""The app in generation mode: the mode combo, the generation controls shown only there, the KV
cache as its own bar category, its growth in the run panel's timeline, compare rows."""

from __future__ import annotations

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pyqtgraph")

from app_helpers import wait_idle  # noqa: E402

pytestmark = pytest.mark.qt_log_ignore("This plugin does not support propagateSizeHints")


def test_generation_mode_controls_bars_and_timeline(qtbot, window):
    from engine.compare import compare_row
    from engine.estimate import estimate
    from engine.measure import run_measure

    w = window
    panel = w.techniques
    assert not panel.groups["generation"].isVisibleTo(panel)
    panel.mode.setCurrentIndex(panel.mode.findData("generate"))
    assert w.state.profile.mode == "generate"
    assert panel.groups["generation"].isVisibleTo(panel)
    assert panel.prompt_len.isEnabled() and panel.prompt_len.specialValueText() == "from dataset"
    assert not panel.groups["distillation"].isVisibleTo(panel)  # training only
    panel.new_tokens.setValue(6)
    panel.cache.setCurrentIndex(panel.cache.findData("static"))
    profile = w.state.profile
    assert (profile.new_tokens, profile.cache) == (6, "static")
    wait_idle(qtbot, w)

    est = estimate(profile, method="traced")
    measured = run_measure(profile)
    w.state.set_estimate(profile, est)
    w.state.set_measured(profile, measured)
    bars = w.estimate_view._bars["kv_cache"].opts["height"]
    assert bars[0] > 0 and bars[1] > 0  # estimate and measured bars both carry the cache
    assert "KV cache" in w.run_panel.result_label.text()
    assert "decode" in w.run_panel.result_label.text()
    xs, ys = w.run_panel._cache_curve.getData()
    assert len(xs) == len(measured.timeline) == 6 and len(set(ys)) == 1  # static: flat
    assert "sequences" in w.estimate_view.summary.text()
    row = compare_row(profile, est, measured)
    assert row["estimate_kv_cache_total_bytes"] == row["measured_kv_cache_bytes"] > 0
    assert row["decode_tokens_per_s"] > 0

    panel.mode.setCurrentIndex(panel.mode.findData("train"))
    assert w.state.profile.mode == "train" and w.state.profile.new_tokens == 128  # back to default
    assert not panel.groups["generation"].isVisibleTo(panel)
    assert panel.groups["distillation"].isVisibleTo(panel)
