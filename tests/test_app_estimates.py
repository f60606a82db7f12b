"""The live estimate as a user sees it: analytic at once, traced after it without a click, an edit
cancels a traced estimate that is running (pytest-qt, offscreen)."""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pyqtgraph")

from app_helpers import wait_idle  # noqa: E402

pytestmark = pytest.mark.qt_log_ignore("This plugin does not support propagateSizeHints")


def test_headline_switches_from_analytic_to_traced_without_a_click(qtbot, window):
    w = window
    wait_idle(qtbot, w)
    seen = []  # (method, headline, estimator line) each time an estimate is drawn
    w.state.estimate_changed.connect(lambda r: r is not None and seen.append(
        (r.method, w.estimate_view.status.text(), w.estimate_view.method_label.text())))
    w.techniques.batch.setValue(3)  # one edit, then nothing: no click, no checkbox
    qtbot.waitUntil(lambda: w.state.current.estimate is not None and w.state.current.estimate.method == "traced"
                    and w.state.current.estimate_for == w.state.profile, timeout=30000)
    wait_idle(qtbot, w)
    methods = [m for m, _s, _l in seen]
    assert methods == ["analytic", "traced"]
    assert seen[0][1].endswith("· analytic (refining…)") and "refining" in seen[0][2]
    assert w.estimate_view.status.text().endswith("· traced")
    assert w.estimate_view.method_label.text().startswith("Estimator: traced")
    ticks = w.estimate_view.plot.getPlotItem().getAxis("bottom")._tickLevels[0]
    assert ticks[0][1] == "Estimated (traced)"
    assert not hasattr(w.estimate_view, "traced") and not hasattr(w, "traced_action")  # the checkbox is gone
    # the traced number is the engine's for exactly this profile
    from engine.estimate import estimate

    assert w.state.current.estimate.peak_allocated_bytes == \
        estimate(w.state.profile, method="traced").peak_allocated_bytes


def test_an_edit_during_a_traced_estimate_cancels_it(qtbot, window, monkeypatch):
    import app.estimator as live
    from engine.estimate import estimate as real_estimate

    w = window
    wait_idle(qtbot, w)
    started, stopped, release = threading.Event(), threading.Event(), threading.Event()

    def estimate(profile, method="auto", progress=None, should_stop=None):
        if method == "traced" and profile.batch == 3:  # the first edit's trace: slow until cancelled
            started.set()
            while not should_stop():
                if release.wait(0.01):
                    break
            else:
                stopped.set()
        return real_estimate(profile, method=method, progress=progress, should_stop=should_stop)

    monkeypatch.setattr(live, "estimate", estimate)
    shown = []
    w.state.estimate_changed.connect(lambda r: r is not None and shown.append((r.method, w.state.profile.batch)))
    w.techniques.batch.setValue(3)
    qtbot.waitUntil(started.is_set, timeout=30000)  # its analytic number is shown, the trace runs
    assert shown == [("analytic", 3)] and w.estimator.pending
    w.techniques.batch.setValue(4)  # the edit
    qtbot.waitUntil(stopped.is_set, timeout=5000)  # the running trace saw should_stop turn True
    release.set()
    qtbot.waitUntil(lambda: w.state.current.estimate is not None and w.state.current.estimate.method == "traced",
                    timeout=30000)
    wait_idle(qtbot, w)
    assert ("traced", 3) not in shown  # the stale result never reached the view
    assert shown[-2:] == [("analytic", 4), ("traced", 4)]
    assert w.state.current.estimate_for.batch == 4


def test_a_failed_trace_keeps_the_analytic_number_and_says_why(qtbot, window, monkeypatch):
    import app.estimator as live
    from engine.estimate import estimate as real_estimate

    def estimate(profile, method="auto", progress=None, should_stop=None):
        if method == "traced":
            raise RuntimeError("no trace today")
        return real_estimate(profile, method=method, progress=progress, should_stop=should_stop)

    w = window
    wait_idle(qtbot, w)
    monkeypatch.setattr(live, "estimate", estimate)
    w.techniques.batch.setValue(5)
    qtbot.waitUntil(lambda: w.state.current.estimate_for == w.state.profile and not w.estimator.pending,
                    timeout=30000)
    assert w.state.current.estimate.method == "analytic"
    assert w.estimate_view.status.text().endswith("· analytic")
    assert "traced estimate failed: RuntimeError: no trace today" in w.estimate_view.method_label.text()
