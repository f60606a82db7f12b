"""The desktop app, driven as a user would (pytest-qt, offscreen)."""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pyqtgraph")

from PySide6.QtCore import QTimer  # noqa: E402

from app.state import AppState  # noqa: E402
from app.widgets.common import stacked_parts  # noqa: E402
from engine.profile import Profile  # noqa: E402
from engine.results import EstimateResult, LayerBytes, MeasureResult, TimelinePoint  # noqa: E402

# The offscreen platform says this once per shown window; it is not a problem of the app.
pytestmark = pytest.mark.qt_log_ignore("This plugin does not support propagateSizeHints")

MiB = 1024**2
GiB = 1024**3


def fake_estimate(total_gib: float = 10.0, params: int = 1_000_000) -> EstimateResult:
    b = int(total_gib * GiB)
    breakdown = {"weights": b // 5, "gradients": b // 5, "optimizer": 2 * b // 5, "activations": b // 10,
                 "temporaries": b // 10}
    allocated = sum(breakdown.values())
    return EstimateResult(method="analytic", peak_allocated_bytes=allocated,
                          peak_reserved_bytes=allocated + 256 * MiB,
                          device_used_bytes=allocated + 756 * MiB, breakdown=breakdown, params=params,
                          layers=(LayerBytes("h.0", 10, 40, 400), LayerBytes("h.1", 10, 40, 400)),
                          peak_phase="backward")


def fake_measured(total_gib: float = 10.5, oom: bool = False) -> MeasureResult:
    b = int(total_gib * GiB)
    return MeasureResult(device="cuda", device_name="Fake GPU", peak_allocated_bytes=b,
                         peak_reserved_bytes=b + 300 * MiB, device_used_bytes=b + 800 * MiB,
                         breakdown={"weights": b // 5, "gradients": b // 5, "optimizer": 2 * b // 5,
                                    "activations": b // 5},
                         step_time_s=0.1, tokens_per_s=5000.0, useful_tokens_per_s=4000.0,
                         real_tokens=800, padded_tokens=1000, steps=3, params=1_000_000, oom=oom,
                         oom_step=1 if oom else -1, oom_phase="backward" if oom else "",
                         timeline=(TimelinePoint(0, "forward", b // 2, b), TimelinePoint(0, "backward", b, b)))


@pytest.fixture
def window(qtbot):
    from app.main_window import MainWindow

    w = MainWindow(Profile(name="tiny", model="tiny-gpt2", target="cpu", batch=2, seq=32, steps=2))
    qtbot.addWidget(w)
    w.show()
    w.run_panel.ask_before_slow_runs = False
    yield w
    w.shutdown()


def need_estimate():
    """Skip unless engine.estimate.estimate is there (the package exists before the function)."""
    mod = pytest.importorskip("engine.estimate")
    if not hasattr(mod, "estimate"):
        pytest.skip("engine.estimate.estimate is not available yet")


def wait_idle(qtbot, w, timeout=60000):
    """Until the model facts and dataset statistics workers are done."""
    qtbot.waitUntil(lambda: not (w.model_panel._runner.is_running or w.dataset_panel._runner.is_running
                                 or w.estimator._runner.is_running or w.estimator._timer.isActive()),
                    timeout=timeout)


# ----- the worker -------------------------------------------------------------------------------
def test_worker_reports_result_failure_and_cancel(qtbot):
    from app.worker import TaskRunner
    from engine.errors import BadInput

    runner = TaskRunner("test")
    try:
        with qtbot.waitSignal(runner.result_ready, timeout=30000) as blocker:
            runner.start(lambda progress, should_stop: 41 + 1)
        assert blocker.args == [42]

        def bad(progress, should_stop):
            raise BadInput("no such thing")

        with qtbot.waitSignal(runner.failed, timeout=5000) as blocker:
            runner.start(bad)
        assert blocker.args == ["no such thing"]

        def boom(progress, should_stop):
            raise RuntimeError("kaputt")

        with qtbot.waitSignal(runner.failed, timeout=5000) as blocker:
            runner.start(boom)
        assert "kaputt" in blocker.args[0]

        def slow(progress, should_stop):
            while not should_stop():
                time.sleep(0.01)
            return "late"

        results = []
        runner.result_ready.connect(results.append)
        runner.start(slow)
        with qtbot.waitSignal(runner.status_changed, timeout=5000) as blocker:
            runner.cancel()
        assert blocker.args == ["cancelled"]
        qtbot.wait(100)
        assert results == [] and not runner.is_running
    finally:
        runner.shutdown()


# ----- estimate view with known numbers (independent of the estimator) ---------------------------
def test_estimate_view_bars_status_and_difference(qtbot, window):
    w = window
    state = w.state
    state.update(target="cuda")  # CUDA bars stack allocator overhead and context too
    state.set_capacity(24 * GiB, "RTX 4090 (24 GiB)")
    est = fake_estimate(10.0)
    state.set_estimate(state.profile, est)
    view = w.estimate_view
    assert view.status.text().startswith("Fits")
    assert "#2E9E44" in view.status.styleSheet()
    heights = {cat: bar.opts["height"][0] for cat, bar in view._bars.items()}
    assert sum(heights.values()) * GiB == pytest.approx(sum(stacked_parts(est).values()), rel=1e-6)
    state.set_estimate(state.profile, fake_estimate(22.5))
    assert view.status.text().startswith("Tight")
    state.set_estimate(state.profile, fake_estimate(30.0))
    assert view.status.text().startswith("Does not fit")
    assert "#D0342C" in view.status.styleSheet()

    state.set_estimate(state.profile, est)
    state.set_measured(state.profile, fake_measured(10.5))
    assert view._bars["weights"].opts["height"][1] > 0
    assert "+5.0%</b> versus the estimate" in view.summary.text()
    assert "+5.0% vs estimate" in view._totals[1].toPlainText()
    assert not view._not_measured.isVisible()
    assert view.layers_button.isEnabled()

    state.set_measured(state.profile, fake_measured(10.5, oom=True))
    assert w.run_panel.banner.isVisibleTo(w.run_panel)
    assert w.run_panel.banner.text() == "Out of memory at step 1 (backward)"


# ----- live estimate -----------------------------------------------------------------------------
def test_choose_preset_change_batch_estimate_moves(qtbot, window):
    need_estimate()
    w = window
    items = w.model_panel.presets.findItems("tiny-llama", pytest.importorskip("PySide6.QtCore").Qt.MatchFlag.MatchExactly)
    with qtbot.waitSignal(w.state.estimate_changed, timeout=30000,
                          check_params_cb=lambda r: r is not None and w.state.profile.model == "tiny-llama"):
        w.model_panel.presets.setCurrentItem(items[0])
    assert w.state.profile.model == "tiny-llama"
    before = w.state.current.estimate.peak_allocated_bytes
    with qtbot.waitSignal(w.state.estimate_changed, timeout=30000,
                          check_params_cb=lambda r: r is not None and w.state.profile.batch == 16):
        w.techniques.batch.setValue(16)
    after = w.state.current.estimate.peak_allocated_bytes
    assert after > before
    assert w.estimate_view.status.text().startswith(("Fits", "Tight", "Does not fit"))


def test_bad_edit_shows_message_not_dialog(qtbot, window):
    w = window
    w.techniques.micro_batches.setValue(5)  # more micro-batches than the batch of 2
    assert w.message.isVisibleTo(w) and "micro_batches" in w.message.text()
    assert w.state.profile.micro_batches == 1
    assert w.techniques.micro_batches.value() == 1


# ----- measured runs -----------------------------------------------------------------------------
def test_measure_tiny_gpt2_on_cpu_event_loop_stays_responsive(qtbot, window):
    pytest.importorskip("engine.measure_process")
    w = window
    wait_idle(qtbot, w)
    gaps = []
    last = [time.perf_counter()]

    def tick():
        now = time.perf_counter()
        gaps.append(now - last[0])
        last[0] = now

    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(tick)
    timer.start()
    progress = []
    w.run_panel._runner.progress_changed.connect(lambda f, m: progress.append(f))
    with qtbot.waitSignal(w.run_panel.run_finished, timeout=120000) as blocker:
        w.run_action.trigger()
    timer.stop()
    result = blocker.args[0]
    assert result is not None, w.run_panel.result_label.text()
    assert not result.oom and result.steps == 2
    assert w.state.current.measured is result
    assert w.estimate_view._bars["weights"].opts["height"][1] > 0  # measured bar drawn
    assert "tokens/s" in w.run_panel.result_label.text()
    assert progress, "no progress was reported"
    xs, _ys = w.run_panel._allocated_curve.getData()
    assert len(xs) == len(result.timeline) > 0
    worst = max(gaps)
    assert worst < 0.050, f"event loop stalled {worst * 1000:.0f} ms (of {len(gaps)} ticks)"


def test_cancel_a_run(qtbot, window):
    pytest.importorskip("engine.measure_process")
    w = window
    w.state.update(steps=50, batch=4, seq=64)
    assert w.run_panel.start()
    qtbot.waitUntil(lambda: w.run_panel.cancel_button.isEnabled(), timeout=5000)
    qtbot.wait(300)
    w.cancel_action.trigger()
    assert w.run_panel.step_label.text() == "Cancelled"
    assert not w.run_panel.is_running
    assert w.state.current.measured is None
    # the worker thread is free again: a new run can start (and is cancelled at once)
    assert w.run_panel.start()
    w.run_panel.cancel()
    assert not w.run_panel.is_running


# ----- profiles ----------------------------------------------------------------------------------
def test_duplicate_and_compare(qtbot, window):
    w = window
    w.duplicate_action.trigger()
    assert w.state.names() == ["tiny", "tiny copy"]
    assert w.state.current_index == 1
    assert w.profiles.list.currentRow() == 1
    w.techniques.batch.setValue(8)
    assert w.state.entries[0].profile.batch == 2 and w.state.profile.batch == 8
    # compare view with known results
    for entry, gib in zip(w.state.entries, (1.0, 3.0)):
        w.state.set_estimate(entry.profile, fake_estimate(gib))
    w.state.set_measured(w.state.profile, fake_measured(3.2))
    w.tabs.setCurrentWidget(w.compare_view)
    rows = w.compare_view.rows()
    assert [r["name"] for r in rows] == ["tiny", "tiny copy"]
    charts = w.compare_view.charts
    assert len(charts._est_bars["weights"].opts["height"]) == 2
    assert charts._meas_bars["weights"].opts["height"][1] > 0
    assert list(charts._speed_bars.opts["height"]) == [0.0, 5000.0]
    assert len(charts._front_points.data) == 1


def test_compare_estimates_every_profile(qtbot, window):
    need_estimate()
    w = window
    w.duplicate_action.trigger()
    w.techniques.seq.setValue(64)
    w.tabs.setCurrentWidget(w.compare_view)
    qtbot.waitUntil(lambda: len(w.compare_view.rows()) == 2, timeout=30000)
    rows = w.compare_view.rows()
    assert rows[1]["estimate_peak_allocated_bytes"] > rows[0]["estimate_peak_allocated_bytes"]


def test_compare_export_png_and_csv(qtbot, window, tmp_path):
    w = window
    w.state.set_estimate(w.state.profile, fake_estimate(2.0))
    w.state.set_measured(w.state.profile, fake_measured(2.1))
    png, csv = tmp_path / "cmp.png", tmp_path / "cmp.csv"
    assert w.compare_view.export_png(str(png)) and w.compare_view.export_csv(str(csv))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = csv.read_text()
    assert text.splitlines()[0].startswith("name,") and "tiny" in text


def test_save_and_reload_profile(qtbot, window, tmp_path):
    w = window
    w.techniques.checkpointing.setChecked(True)
    w.techniques.precision.setCurrentIndex(w.techniques.precision.findData("bf16-amp"))
    path = tmp_path / "saved.json"
    w.state.save_file(path)
    assert json.loads(path.read_text())["checkpointing"] is True
    assert w.profiles.load_path(str(path))
    assert w.state.names() == ["tiny", "tiny 2"]
    loaded = w.state.profile
    assert loaded.checkpointing and loaded.precision == "bf16-amp" and loaded.model == "tiny-gpt2"
    assert w.techniques.checkpointing.isChecked()
    # a broken file is a message, not a crash
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    assert not w.profiles.load_path(str(bad))
    assert "not valid JSON" in w.message.text()
    # autosave: a fresh state reads the same profiles back
    w.state.save_all()
    again = AppState()
    assert again.names() == ["tiny", "tiny 2"]
    assert again.entries[1].profile == loaded


def test_broken_model_folder_shows_message_and_app_stays_usable(qtbot, window, tmp_path):
    w = window
    wait_idle(qtbot, w)
    folder = tmp_path / "broken-model"
    folder.mkdir()
    (folder / "config.json").write_text("{ this is not json")
    w.model_panel.open_folder(folder)
    qtbot.waitUntil(lambda: w.model_panel.error.isVisibleTo(w.model_panel), timeout=10000)
    assert "not valid JSON" in w.model_panel.error.text()
    assert "not valid JSON" in w.message.text()
    # choose a preset again: facts come back, the error goes
    item = w.model_panel.presets.findItems("tiny-gpt2", pytest.importorskip("PySide6.QtCore").Qt.MatchFlag.MatchExactly)[0]
    with qtbot.waitSignal(w.model_panel.facts_changed, timeout=20000,
                          check_params_cb=lambda f: f is not None):
        w.model_panel.presets.setCurrentItem(item)
    assert not w.model_panel.error.isVisibleTo(w.model_panel)
    assert "layers" in w.model_panel.facts.text()


def test_export_script(qtbot, window, tmp_path):
    w = window
    if not w.export_action.isEnabled():
        assert "not available" in w.export_action.toolTip()
        pytest.skip("engine.export is not available yet")
    out = tmp_path / "train.py"
    wait_idle(qtbot, w)  # the live estimate must not replace the known one below
    w.state.set_estimate(w.state.profile, fake_estimate(1.0))
    with qtbot.waitSignal(w.export_finished, timeout=30000) as blocker:
        assert w.export_script_to(str(out))
    assert blocker.args == [str(out), True], w.message.text()
    text = out.read_text()
    assert "import torch" in text
    assert "Estimated peak allocated memory: 1024.00 MiB" in text  # the app passes its estimate on
    assert w.message.text() == f"Wrote {out}"
    summary = tmp_path / "summary.md"
    with qtbot.waitSignal(w.export_finished, timeout=30000) as blocker:
        assert w.export_summary_to(str(summary))
    assert blocker.args[1] and summary.read_text().startswith("# tiny")
    # a folder that does not exist: a message, not a crash
    with qtbot.waitSignal(w.export_finished, timeout=30000) as blocker:
        w.export_script_to(str(tmp_path / "missing" / "deeper" / "x.py"))
    if not blocker.args[1]:
        assert "failed" in w.message.text()


def test_render_compare_png_for_cli(qtbot, tmp_path):
    from app.compare_png import render_compare_png
    from engine.compare import compare_row

    rows = [compare_row(Profile(name="a"), fake_estimate(4.0), fake_measured(4.2)),
            compare_row(Profile(name="b", batch=16), fake_estimate(8.0), None)]
    out = tmp_path / "c.png"
    render_compare_png(rows, str(out))
    from PySide6.QtGui import QImage

    image = QImage(str(out))
    assert image.width() == 1400 and image.height() == 900
