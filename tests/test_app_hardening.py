"""The app's guards against silent surprises (issue 13, "In the app"): the run that will not fit
asks first, the wheel scrolls instead of changing settings, the per-layer table adds up, the
layout holds at 1366x768 and 1024x768, and the estimate's notes say what a technique does not do."""

from __future__ import annotations

import dataclasses
import time

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pyqtgraph")

from PySide6.QtCore import QEvent, QPoint, QPointF, Qt  # noqa: E402
from PySide6.QtGui import QWheelEvent  # noqa: E402
from PySide6.QtWidgets import (QAbstractScrollArea, QApplication, QComboBox, QLabel, QMessageBox,  # noqa: E402
                               QSplitterHandle, QWidget)

from engine.profile import Profile  # noqa: E402
from app_helpers import tiny_main_window, wait_idle  # noqa: E402
from engine.results import EstimateResult, LayerBytes, MeasureResult, TimelinePoint  # noqa: E402

pytestmark = pytest.mark.qt_log_ignore("This plugin does not support")

MiB, GiB = 1024**2, 1024**3


def estimate_of(total: int) -> EstimateResult:
    breakdown = {"weights": total // 2, "gradients": total // 4, "optimizer": total // 4,
                 "activations": 0, "temporaries": 0}
    allocated = sum(breakdown.values())
    return EstimateResult(method="analytic", peak_allocated_bytes=allocated, peak_reserved_bytes=allocated,
                          device_used_bytes=allocated, breakdown=breakdown, params=1000,
                          layers=(LayerBytes("h.0", 10, 40, 400),))


def measured_of(peak: int, points: tuple[int, ...]) -> MeasureResult:
    timeline = tuple(TimelinePoint(i // 2, ("forward", "backward")[i % 2], b, b) for i, b in enumerate(points))
    return MeasureResult(device="cpu", device_name="Test CPU", peak_allocated_bytes=peak, peak_reserved_bytes=peak,
                         device_used_bytes=0, breakdown={"weights": peak}, step_time_s=0.1, tokens_per_s=10.0,
                         useful_tokens_per_s=10.0, real_tokens=10, padded_tokens=10, steps=3, params=1000,
                         timeline=timeline, extra={"phase_peaks": [[0, "backward", peak]]})


@pytest.fixture
def window(qtbot):
    w = tiny_main_window(qtbot)
    yield w
    w.shutdown()


# ----- the run guard ------------------------------------------------------------------------------
def test_a_run_whose_estimate_exceeds_the_capacity_asks_first(qtbot, window, monkeypatch):
    w = window
    wait_idle(qtbot, w)
    started, asked = [], []
    monkeypatch.setattr(w.run_panel._runner, "start", lambda *a, **k: started.append(a))
    answer = [QMessageBox.StandardButton.No]

    def question(parent, title, text, *rest):
        asked.append(text)
        return answer[0]

    monkeypatch.setattr(QMessageBox, "question", staticmethod(question))
    w.state.update(memory_cap_bytes=64 * MiB)
    w.state.set_estimate(w.state.profile, estimate_of(200 * MiB))
    assert w.run_panel.start() is False and not started
    assert len(asked) == 1 and "200.00 MiB" in asked[0] and "64.00 MiB" in asked[0]
    assert "simulated capacity" in asked[0]
    answer[0] = QMessageBox.StandardButton.Yes
    assert w.run_panel.start() is True and len(started) == 1 and len(asked) == 2
    # within the capacity: no question
    w.state.set_estimate(w.state.profile, estimate_of(32 * MiB))
    assert w.run_panel.start() is True and len(asked) == 2
    # the machine's RAM is the capacity without a simulated cap
    w.state.update(memory_cap_bytes=0)
    ram, where = w.state.capacity_for()
    w.state.set_estimate(w.state.profile, estimate_of(ram + GiB))
    answer[0] = QMessageBox.StandardButton.No
    assert w.run_panel.start() is False and "RAM" in asked[-1]


# ----- the wheel --------------------------------------------------------------------------------
def wheel(widget: QWidget, steps: int = -1) -> None:
    pos = QPointF(widget.width() / 2, widget.height() / 2)
    event = QWheelEvent(pos, QPointF(widget.mapToGlobal(pos.toPoint())), QPoint(0, 0), QPoint(0, 120 * steps),
                        Qt.MouseButton.NoButton, Qt.KeyboardModifier.NoModifier, Qt.ScrollPhase.NoScrollPhase, False)
    QApplication.sendEvent(widget, event)


def test_the_wheel_scrolls_the_panel_and_changes_a_control_only_with_focus(qtbot, window):
    w = window
    w.resize(1366, 768)
    panel = w.techniques
    combo = panel.findChildren(QComboBox)[0]
    spin = panel.batch
    assert combo.focusPolicy() == Qt.FocusPolicy.StrongFocus and spin.focusPolicy() == Qt.FocusPolicy.StrongFocus
    bar = panel.verticalScrollBar()
    assert bar.maximum() > 0  # the panel is taller than the window: there is something to scroll
    index, batch = combo.currentIndex(), spin.value()
    wheel(combo)
    wheel(spin)
    assert combo.currentIndex() == index and spin.value() == batch
    assert bar.value() > 0  # the wheel went to the panel
    # with focus the control takes the wheel
    w.activateWindow()
    spin.setFocus()
    qtbot.waitUntil(spin.hasFocus, timeout=3000)
    wheel(spin, steps=1)
    assert spin.value() == batch + 1
    # a control made later by any code is covered too
    late = QComboBox(panel.widget())
    late.addItems(["a", "b", "c"])
    late.show()
    qtbot.waitUntil(lambda: late.focusPolicy() == Qt.FocusPolicy.StrongFocus, timeout=3000)
    wheel(late)
    assert late.currentIndex() == 0


# ----- the per-layer table ----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["analytic", "traced"])
def test_per_layer_rows_run_from_the_embeddings_to_the_logits_and_add_up(qtbot, window, method):
    from engine.estimate import estimate

    r = estimate(Profile(model="tiny-gpt2", target="cpu", batch=2, seq=32), method=method)
    names = [x.name for x in r.layers]
    assert names[0] == "embeddings" and names[-2:] == ["final norm + LM head", "logits + loss"]
    assert len(names) == 2 + 3  # tiny-gpt2's two blocks between them
    assert sum(x.params for x in r.layers) == r.params
    assert sum(x.weight_bytes for x in r.layers) == r.breakdown["weights"]
    logits = r.layers[-1].activation_bytes
    assert logits >= 2 * 32 * 8192 * 4  # the fp32 logits of a batch, at least
    if method == "analytic":  # peak at the start of backward: every saved tensor is alive
        assert r.peak_phase == "backward"
        assert sum(x.activation_bytes for x in r.layers[:-1]) == r.breakdown["activations"]
    assert r.layers[-2].activation_bytes > 0  # the final norm and head inputs
    w = window
    wait_idle(qtbot, w)
    w.state.set_estimate(w.state.profile, r)
    dialog = w.estimate_view.show_layers()
    assert dialog.table.rowCount() == len(r.layers)
    params, weights, kept, logits_shown = dialog.totals
    assert (params, weights, logits_shown) == (r.params, r.breakdown["weights"], logits)
    assert f"{r.params:,} parameters" in dialog.findChild(QLabel, "note").text()
    dialog.close()


# ----- layout -----------------------------------------------------------------------------------
def _overlaps(root: QWidget) -> list[str]:
    """Visible sibling widgets (managed by a layout or splitter) whose rectangles intersect."""
    out = []
    for parent in [root] + root.findChildren(QWidget):
        if not parent.isVisible() or isinstance(parent, QAbstractScrollArea) and parent.viewport() is None:
            continue
        if type(parent).__module__.startswith("pyqtgraph"):
            continue  # the plot's own scene items
        kids = [c for c in parent.children() if isinstance(c, QWidget) and c.isVisible() and not c.isWindow()
                and not isinstance(c, QSplitterHandle) and c.width() > 0 and c.height() > 0]
        for i, a in enumerate(kids):
            for b in kids[i + 1:]:
                if a.geometry().intersects(b.geometry()):
                    out.append(f"{type(parent).__name__}: {type(a).__name__}{a.geometry().getRect()} "
                               f"x {type(b).__name__}{b.geometry().getRect()}")
    return out


def _cut_texts(root: QWidget) -> list[str]:
    out = []
    for label in root.findChildren(QLabel):
        if label.isVisible() and not label.wordWrap() and label.text() and label.textFormat() != Qt.TextFormat.RichText:
            if label.width() < label.minimumSizeHint().width():
                out.append(f"label {label.text()!r}: {label.width()} < {label.minimumSizeHint().width()}")
    for box in root.findChildren(QComboBox):
        if box.isVisible() and not box.isEditable() and box.width() < box.minimumWidth():
            out.append(f"combo {box.currentText()!r}: {box.width()} < {box.minimumWidth()}")
    return out


@pytest.mark.parametrize("size", [(1366, 768), (1024, 768)])
def test_layout_holds_at_laptop_sizes(qtbot, window, size):
    w = window
    wait_idle(qtbot, w)
    # the long texts: wrapped facts, several notes, a long chosen combo item
    w.state.update(padding="dynamic", pad_multiple=8)
    long_notes = tuple(f"note {i}: " + "words " * 30 for i in range(4))
    w.state.set_estimate(w.state.profile, dataclasses.replace(estimate_of(200 * MiB), notes=long_notes))
    w.resize(*size)
    qtbot.waitUntil(lambda: (w.width(), w.height()) == size, timeout=5000)
    qtbot.wait(200)
    assert _overlaps(w) == []
    assert _cut_texts(w) == []
    # the views stay whole: no sideways scrolling of the bars, their legend right of the bars
    area = w.estimate_view.parentWidget().parentWidget()
    assert area.horizontalScrollBar().maximum() == 0
    item = w.estimate_view.plot.getPlotItem()
    vb = item.vb
    legend_left = vb.mapSceneToView(w.estimate_view.legend.sceneBoundingRect().topLeft()).x()
    assert legend_left >= 1.3  # the Measured bar ends at 1.3
    assert w.estimate_view.legend.sceneBoundingRect().right() <= vb.sceneBoundingRect().right() + 1
    # the techniques never clip their controls: they scroll if they must
    t = w.techniques
    assert t.widget().width() <= t.viewport().width() or t.horizontalScrollBar().isVisible()


# ----- the target and the run panel -------------------------------------------------------------
def test_cpu_cap_takes_units(qtbot, window):
    box, state = window.target_panel.cpu_cap, window.state
    for text, expected in (("2 GiB", 2 * GiB), ("512 MiB", 512 * MiB), ("1.5GiB", 1536 * MiB), ("300", 300 * MiB)):
        box.lineEdit().selectAll()
        qtbot.keyClicks(box.lineEdit(), text)
        box.interpretText()
        assert state.profile.memory_cap_bytes == expected, text
    assert box.text() == "300 MiB"
    state.update(memory_cap_bytes=4 * GiB)
    assert box.text() == "4 GiB"
    box.setValue(0)
    assert box.text() == "off (RAM)" and state.profile.memory_cap_bytes == 0


def test_run_status_belongs_to_the_profile_and_the_timeline_shows_the_peak(qtbot, window):
    w = window
    wait_idle(qtbot, w)
    panel = w.run_panel
    peak = 30 * MiB
    w.state.set_measured(w.state.profile, measured_of(peak, (10 * MiB, 20 * MiB, 12 * MiB, 22 * MiB)))
    assert panel.step_label.text().startswith("Done: 3 steps")
    # the headline's peak is above every phase-end point; the timeline shows it
    scale = MiB
    assert panel._peak_line.isVisible() and panel._peak_line.value() == pytest.approx(peak / scale)
    assert "30.00 MiB" in panel._peak_line.label.format and "30.00 MiB" in panel._peak_line.label.toPlainText()
    top = panel.timeline.getPlotItem().vb.viewRange()[1][1]
    assert top >= peak / scale
    xs, ys = panel._phase_peak_curve.getData()
    assert list(ys) == [pytest.approx(peak / scale)]
    # another profile that never ran: nothing of the first one's run
    w.duplicate_action.trigger()
    w.state.update(batch=3)
    assert "Done" not in panel.step_label.text() and panel.step_label.text() == "Not run yet"
    assert panel.time_label.text() == "" and panel.progress.value() == 0 and not panel._peak_line.isVisible()
    w.state.select(0)
    assert panel.step_label.text().startswith("Done: 3 steps")


def test_time_left_only_from_steps_after_the_warm_up(qtbot, window):
    panel = window.run_panel
    panel._started, panel._steps_total = time.monotonic(), 5
    panel._step_starts = []
    panel._on_progress(0.3, "building tiny-gpt2 on cpu")
    assert panel.seconds_left() is None and "left" not in panel.time_label.text()
    t0 = 1000.0
    panel._step_starts = [t0, t0 + 10.0]  # the first step (warm-up) took 10 s: predicts nothing
    assert panel.seconds_left(now=t0 + 10.5) is None
    panel._step_starts = [t0, t0 + 10.0, t0 + 12.0]  # the second took 2 s
    assert panel.seconds_left(now=t0 + 12.5) == pytest.approx(2 * 2.0 + 1.5)
    panel._on_progress(0.6, "step 4/5")  # a fourth step starts now
    assert len(panel._step_starts) == 4 and panel.seconds_left() is not None


# ----- notes ------------------------------------------------------------------------------------
def test_notes_say_what_a_technique_does_not_do():
    from engine.estimate import estimate, fragmentation

    base = Profile(model="tiny-gpt2", target="cpu", batch=2, seq=32)
    traced = estimate(base, method="traced")
    assert not any("on CUDA" in n for n in traced.notes)
    assert any(n.startswith("SDPA kernel on CPU") for n in traced.notes)
    assert any(n.startswith("SDPA kernel on CUDA") for n in estimate(base.replace(target="cuda"), method="traced").notes)
    # the --pad-multiple suggestion only where it is not set
    assert "--pad-multiple 64" in fragmentation.analytic_note(base.replace(padding="dynamic"), 12)
    assert "--pad-multiple" not in fragmentation.analytic_note(base.replace(padding="dynamic", pad_multiple=64), 5)
    info = {"distinct_shapes": 5, "plan_batches": 9, "replayed": [[2, 16]], "records": 1}
    assert "--pad-multiple" not in fragmentation.traced_note(info, 10 * MiB, base.replace(padding="dynamic",
                                                                                         pad_multiple=64))

    def notes(**changes):
        return " ".join(estimate(base.replace(**changes), method="analytic").notes)

    assert "already gated" in notes(model="tiny-llama", mlp="geglu")
    assert "already gated" not in notes(mlp="geglu")  # GPT-2's MLP is not: GeGLU changes it
    assert "activations are unchanged" in notes(ffn_chunks=4)
    assert "activations are unchanged" not in notes(ffn_chunks=4, mode="infer")
    assert "as with dense attention" in notes(attn="local:64")
    assert "as with dense attention" not in notes(attn="local:16")


def test_no_display_is_a_hint_not_a_qt_abort(capsys, monkeypatch):
    from app import launch

    assert launch.display_missing({}, "linux")
    assert not launch.display_missing({"DISPLAY": ":0"}, "linux")
    assert not launch.display_missing({"WAYLAND_DISPLAY": "wayland-0"}, "linux")
    assert not launch.display_missing({"QT_QPA_PLATFORM": "offscreen"}, "linux")
    assert not launch.display_missing({}, "darwin")
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(launch.sys, "platform", "linux")
    assert launch.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "offscreen" in err and "Xvfb" in err
