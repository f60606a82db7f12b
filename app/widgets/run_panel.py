"""Measured run: Run / Cancel, progress with step counter and elapsed / remaining time, the OOM
banner, tokens/s, and the memory timeline (allocated and reserved after each phase of each step).

The run itself happens in a child process (``engine.measure.process``) driven from a TaskRunner
thread, so an out-of-memory error or a crash cannot take the app down; cancel kills the child.
"""

from __future__ import annotations

import re
import sys
import time

import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (QHBoxLayout, QLabel, QMessageBox, QProgressBar, QPushButton,
                               QVBoxLayout, QWidget)

from app.state import AppState
from app.widgets.common import (byte_unit, center_lines, error_color, legend_text_color, make_plot,
                                stacked_parts, text_item)
from app.worker import TaskRunner
from engine.measure.process import measure_in_child
from engine.units import format_bytes

#: Above this many parameters a CPU run is slow enough to ask first.
BIG_CPU_MODEL_PARAMS = 50_000_000


class RunPanel(QWidget):
    run_finished = Signal(object)  # MeasureResult (OOM included) or None on failure / cancel

    def __init__(self, state: AppState, parent=None) -> None:
        super().__init__(parent)
        self._state = state
        self._runner = TaskRunner("measure", self)
        self._started = 0.0
        self._fraction = 0.0
        self._profile = None
        # the questions before a run (over capacity, a big model on CPU); tests and scripts turn them off
        self.ask_before_slow_runs = True
        self._step_starts: list[float] = []  # monotonic time each "step i/N" message arrived
        self._steps_total = 0

        self.run_button = QPushButton("Run measurement")
        self.run_button.setToolTip("Run the profile's steps for real in a child process (Ctrl+R)")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop the running measurement (Esc)")
        self.cancel_button.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setTextVisible(False)
        self.step_label = QLabel("Not run yet")
        self.time_label = QLabel()
        self.banner = QLabel()
        self.banner.setObjectName("oom_banner")
        self.banner.setStyleSheet("background: #D0342C; color: white; font-weight: bold; padding: 6px;"
                                  " border-radius: 3px;")
        self.banner.hide()
        self.result_label = QLabel()
        self.result_label.setWordWrap(True)
        self.result_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        self.timeline = make_plot(title="Memory timeline", left="memory", bottom="step")
        self.timeline.setMinimumHeight(170)
        item = self.timeline.getPlotItem()
        legend = item.addLegend(offset=(-10, 5), labelTextSize="9pt", labelTextColor=legend_text_color())
        legend.setColumnCount(2)  # one row at the top right, above the curves (see the y range)
        self._allocated_curve = item.plot([], [], pen=pg.mkPen("#4C72B0", width=2), symbol="o",
                                          symbolSize=5, symbolBrush="#4C72B0", name="allocated")
        self._reserved_curve = item.plot([], [], pen=pg.mkPen("#DD8452", width=2, style=Qt.PenStyle.DashLine),
                                         symbol="s", symbolSize=4, symbolBrush="#DD8452", symbolPen=None,
                                         name="reserved / RSS")
        # generation: the KV cache's bytes after each new token (its growth over the decode)
        self._cache_curve = item.plot([], [], pen=pg.mkPen("#64B5CD", width=2), symbol="d",
                                      symbolSize=4, symbolBrush="#64B5CD", symbolPen=None,
                                      name="KV cache")
        self._oom_line = pg.InfiniteLine(angle=90, pen=pg.mkPen("#D0342C", width=2),
                                         label="out of memory", labelOpts={"position": 0.85, "color": "#D0342C",
                                                                           "anchors": [(1, 0.5), (1, 0.5)]})
        item.addItem(self._oom_line)
        self._oom_line.hide()
        self._phase_peak_curve = item.plot([], [], pen=None, symbol="t1", symbolSize=8, symbolBrush="#4C72B0",
                                           symbolPen=None)  # explained by the peak line's label
        self._peak_line = pg.InfiniteLine(angle=0, pen=pg.mkPen("#4C72B0", width=1, style=Qt.PenStyle.DotLine),
                                          label="peak allocated", labelOpts={"position": 0.02, "color": "#4C72B0",
                                                                             "anchors": [(0, 1), (0, 1)]})
        item.addItem(self._peak_line)
        self._peak_line.hide()
        item.getAxis("bottom").enableAutoSIPrefix(False)
        self._timeline_hint = text_item(anchor=(0.5, 0.5))
        center_lines(self._timeline_hint, ["Run a measurement to see", "allocated and reserved memory",
                                           "after each phase of each step"])
        item.addItem(self._timeline_hint)
        self._show_timeline_hint(True)

        self._clock = QTimer(self)
        self._clock.setInterval(250)
        self._clock.timeout.connect(self._on_clock)

        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(self.progress, 1)
        info = QHBoxLayout()
        info.addWidget(self.step_label, 1)
        info.addWidget(self.time_label)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(buttons)
        layout.addLayout(info)
        layout.addWidget(self.banner)
        layout.addWidget(self.result_label)
        layout.addWidget(self.timeline, 1)

        self.run_button.clicked.connect(self._on_run_clicked)
        self.cancel_button.clicked.connect(self.cancel)
        self._runner.progress_changed.connect(self._on_progress)
        self._runner.result_ready.connect(self._on_result)
        self._runner.failed.connect(self._on_failed)
        self._runner.status_changed.connect(self._on_status)
        self._runner.running_changed.connect(self._on_running_changed)
        state.measured_changed.connect(self._on_measured_changed)
        # the estimated tokens/s beside the measured ones follows the estimate
        state.estimate_changed.connect(lambda _e: self._on_measured_changed(state.current.measured))
        self._on_measured_changed(state.current.measured)

    # ----- public -------------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self._runner.is_running

    def start(self) -> bool:
        """Start measuring the selected profile (cancelling a running measurement first)."""
        profile = self._state.profile
        if not self._preflight(profile):
            return False
        self._runner.cancel()
        self._profile = profile
        self._started = time.monotonic()
        self._fraction = 0.0
        self._step_starts, self._steps_total = [], profile.steps
        self.banner.hide()
        self.result_label.setText("")
        self.progress.setValue(0)
        self.step_label.setText(f"Starting {profile.name} on {profile.target}…")
        self._runner.start(lambda progress, should_stop:
                           measure_in_child(profile, progress=progress, should_stop=should_stop),
                           context=profile)
        return True

    def cancel(self) -> None:
        if self._runner.is_running:
            self._runner.cancel()

    def shutdown(self) -> None:
        self._runner.shutdown()

    # ----- private ------------------------------------------------------------------------
    def _preflight(self, profile) -> bool:
        if profile.target == "cuda":
            torch = sys.modules.get("torch")
            if torch is not None and not torch.cuda.is_available():
                self._state.show_message(
                    "warning", "This machine has no CUDA GPU: switch the target to CPU to measure here, "
                               "or run `headroom measure PROFILE.json` on the GPU machine.")
                return False
        est = self._state.current.estimate
        if not self.ask_before_slow_runs or est is None:
            return True
        capacity, where = self._state.capacity_for(profile)
        need = sum(stacked_parts(est, cpu=profile.target == "cpu").values())  # the estimate bar's top
        if capacity and need > capacity:
            answer = QMessageBox.question(
                self, "Estimate exceeds the capacity",
                f"The estimate for {profile.name!r} is {format_bytes(need)}, more than the "
                f"{format_bytes(capacity)} of {where}. The run will likely end out of memory"
                + (" (the CPU run stops at the simulated capacity)" if where == "simulated capacity" else
                   " or make this machine swap" if where == "this machine's RAM" else "")
                + ". Run anyway?")
            if answer != QMessageBox.StandardButton.Yes:
                self._state.show_message("info", f"Run of {profile.name!r} not started: its estimate "
                                                 f"({format_bytes(need)}) exceeds {format_bytes(capacity)}")
                return False
        if profile.target == "cpu" and est.params > BIG_CPU_MODEL_PARAMS:
            answer = QMessageBox.question(
                self, "Slow run on CPU",
                f"{profile.model} has {est.params / 1e6:,.0f} M parameters; {profile.steps} steps of "
                f"batch {profile.batch} × {profile.seq} tokens on this CPU may take minutes. Run anyway?")
            return answer == QMessageBox.StandardButton.Yes
        return True

    def _on_run_clicked(self) -> None:
        self.start()

    def _on_running_changed(self, running: bool) -> None:
        self.cancel_button.setEnabled(running)
        self.run_button.setText("Restart measurement" if running else "Run measurement")
        if running:
            self._clock.start()
        else:
            self._clock.stop()

    def _run_prefix(self) -> str:
        """Names the running profile when the panel shows another one (or the same one edited)."""
        if self._profile is not None and self._profile != self._state.profile:
            return f"Measuring {self._profile.name!r} (not the profile shown) · "
        return ""

    def _on_progress(self, fraction: float, message: str) -> None:
        self._fraction = max(0.0, min(1.0, fraction))
        self.progress.setValue(int(self._fraction * 1000))
        m = re.search(r"step\s+(\d+)\s*(?:/|of)\s*(\d+)", message or "")
        if m:
            step = int(m.group(1))
            while len(self._step_starts) < step:  # when each step started, for the time left
                self._step_starts.append(time.monotonic())
            self._steps_total = int(m.group(2))
        self.step_label.setText(self._run_prefix() + (message or ""))
        self._on_clock()

    def seconds_left(self, now: float | None = None) -> float | None:
        """Time left from the steps that finished after the warm-up step, or None before there is
        one (loading, building and the first step, which includes warm-up, predict nothing)."""
        starts = self._step_starts
        if len(starts) < 3:
            return None
        now = time.monotonic() if now is None else now
        per_step = (starts[-1] - starts[1]) / (len(starts) - 2)
        remaining = self._steps_total - len(starts)  # steps not started yet
        current = max(0.0, per_step - (now - starts[-1]))  # the rest of the one running
        return remaining * per_step + current

    def _on_clock(self) -> None:
        elapsed = time.monotonic() - self._started
        text = f"elapsed {elapsed:.1f} s"
        left = self.seconds_left()
        if left is not None and self._fraction < 1.0:
            text += f" · ~{left:.0f} s left"
        self.time_label.setText(text)

    def _on_status(self, status: str) -> None:
        if status == "cancelled":
            self.step_label.setText("Cancelled")
            self.progress.setValue(0)
            self.run_finished.emit(None)

    def _on_result(self, result) -> None:
        self.progress.setValue(1000)
        profile = self._runner.context
        self._state.set_measured(profile, result)
        if all(e.profile != profile for e in self._state.entries):
            # the profile was edited while it ran: the numbers belong to settings no profile has now
            self.step_label.setText(f"Not run yet (the run of {profile.name!r} finished for settings since edited)")
            self._state.show_message("warning", f"The run of {profile.name!r} finished, but its settings were "
                                                "edited meanwhile: run it again to see measured bars.")
        self.run_finished.emit(result)

    def _on_failed(self, message: str) -> None:
        self.progress.setValue(0)
        self.step_label.setText("Run failed")
        self.result_label.setText(f"<span style='color:{error_color()}'>{message}</span>")
        self._state.set_measured(self._runner.context, None, error=message)
        self._state.show_message("error", f"Measured run failed: {message}")
        self.run_finished.emit(None)

    def _show_timeline_hint(self, show: bool) -> None:
        item = self.timeline.getPlotItem()
        self._timeline_hint.setVisible(show)
        if show:
            item.getAxis("bottom").setTicks(None)
            item.setXRange(0, 1, padding=0)
            item.setYRange(0, 1, padding=0)
            self._timeline_hint.setPos(0.5, 0.5)
            item.getAxis("left").setStyle(showValues=False)
            item.getAxis("bottom").setStyle(showValues=False)
        else:
            item.getAxis("left").setStyle(showValues=True)
            item.getAxis("bottom").setStyle(showValues=True)
            item.enableAutoRange()

    def _on_measured_changed(self, result) -> None:
        self._oom_line.hide()
        self._peak_line.hide()
        if result is None:
            self._phase_peak_curve.setData([], [])
            self._allocated_curve.setData([], [])
            self._reserved_curve.setData([], [])
            self._cache_curve.setData([], [])
            self._show_timeline_hint(True)
            if self._runner.is_running:
                if self._profile != self._state.profile:  # the run is another profile's
                    self.step_label.setText(self._run_prefix().rstrip(" ·"))
            else:  # this profile's own state: nothing of another profile's run stays on screen
                self.banner.hide()
                self.progress.setValue(0)
                self.time_label.setText("")
                error = self._state.current.measure_error
                self.step_label.setText("Run failed" if error else "Not run yet")
                est = self._state.current.estimate
                hint = (f"estimated {est.tokens_per_s:,.0f} tokens/s · step {est.step_s * 1000:,.0f} ms "
                        f"for {est.gpu}" if est is not None and getattr(est, "tokens_per_s", 0) else "")
                self.result_label.setText(f"<span style='color:{error_color()}'>{error}</span>"
                                          if error else hint)
            return
        self.time_label.setText(f"took {result.elapsed_s:.1f} s")
        self.progress.setValue(1000)
        if result.oom:
            phase = f" ({result.oom_phase})" if result.oom_phase else ""
            self.banner.setText(f"Out of memory at step {result.oom_step}{phase}")
            self.banner.show()
            self.step_label.setText("Out of memory")
        else:
            self.banner.hide()
            self.step_label.setText(f"Done: {result.steps} steps on {result.device_name or result.device}")
        lines = [f"Peak allocated <b>{format_bytes(result.peak_allocated_bytes)}</b> · reserved "
                 f"{format_bytes(result.peak_reserved_bytes)}"
                 + (f" · device used {format_bytes(result.device_used_bytes)}" if result.device_used_bytes else "")]
        growth = result.extra.get("cache_growth_bytes")  # a generation run
        if growth is not None and not result.oom:
            per_seq = result.extra.get("decode_tokens_per_s_per_sequence", 0.0)
            lines.append(f"KV cache <b>{format_bytes(result.kv_cache_bytes)}</b> · first token "
                         f"<b>{result.time_to_first_token_s * 1000:,.0f} ms</b> · prefill "
                         f"{result.prefill_tokens_per_s:,.0f} tokens/s · decode "
                         f"<b>{result.decode_tokens_per_s:,.0f}</b> tokens/s ({per_seq:,.1f} per "
                         f"sequence)")
        elif not result.oom:
            lines.append(f"<b>{result.tokens_per_s:,.0f}</b> tokens/s ({result.useful_tokens_per_s:,.0f} "
                         f"without padding) · step {result.step_time_s * 1000:,.0f} ms")
            est = self._state.current.estimate
            if est is not None and getattr(est, "tokens_per_s", 0):
                diff = 100.0 * (result.tokens_per_s - est.tokens_per_s) / est.tokens_per_s
                lines.append(f"estimated {est.tokens_per_s:,.0f} tokens/s · step "
                             f"{est.step_s * 1000:,.0f} ms for {est.gpu} (measured {diff:+.0f}%)")
        self.result_label.setText("<br>".join(lines))
        points = list(result.timeline)
        if points:
            self._show_timeline_hint(False)
            peak = int(result.peak_allocated_bytes)
            # the headline's peak happens inside a phase, above the points sampled at phase ends
            top = max([peak] + [max(p.allocated_bytes, p.reserved_bytes) for p in points])
            unit, scale = byte_unit(top)
            xs = []
            per_step: dict[int, int] = {}
            for p in points:
                per_step[p.step] = per_step.get(p.step, 0) + 1
            seen: dict[int, int] = {}
            for p in points:  # spread a step's phases over [step, step + 1)
                k = seen.get(p.step, 0)
                seen[p.step] = k + 1
                xs.append(p.step + k / max(1, per_step[p.step]))
            self._allocated_curve.setData(xs, [p.allocated_bytes / scale for p in points])
            self._reserved_curve.setData(xs, [p.reserved_bytes / scale for p in points])
            # each phase's own peak (the measure's phase_peaks), drawn where its end point is
            x_of = {(p.step, p.phase): x for x, p in zip(xs, points)}
            phase_peaks = [(x_of[(st, ph)], b) for st, ph, b in result.extra.get("phase_peaks", ())
                           if (st, ph) in x_of]
            self._phase_peak_curve.setData([x for x, _ in phase_peaks], [b / scale for _, b in phase_peaks])
            growth = list(result.extra.get("cache_growth_bytes") or ())[:len(points)]
            self._cache_curve.setData(xs[:len(growth)], [b / scale for b in growth])
            self._peak_line.setVisible(peak > 0)  # first: a hidden line's label ignores changes
            self._peak_line.label.setFormat(f"peak allocated {format_bytes(peak)}")
            self._peak_line.setValue(peak / scale)
            self._peak_line.label.valueChanged()  # the same value again still shows the new text
            item = self.timeline.getPlotItem()
            item.setLabel("left", f"memory ({unit})")
            # major ticks: the steps; minor ticks: each point's phase (F forward, B backward, ...)
            major = [(float(step), f"step {step}") for step in sorted(per_step)]
            if growth:  # generation: one point per new token; label every k-th token
                every = max(1, len(per_step) // 8)
                major = [(float(s), f"token {s + 1}") for s in sorted(per_step) if s % every == 0]
            minor = [(x, p.phase[:1].upper()) for x, p in zip(xs, points)
                     if x != int(x) and len(points) <= 48]
            item.getAxis("bottom").setTicks([major, minor])
            phases = sorted({p.phase for p in points}, key=[q.phase for q in points].index)
            item.setLabel("bottom", "step · phases " + ", ".join(f"{ph[:1].upper()} = {ph}" for ph in phases))
            x_end = max(max(xs) + 0.2, min(xs) + 1.0)
            if result.oom:  # where it stopped: after the last recorded point, in the failing phase
                x_oom = max(xs) + 0.5 / max(1, per_step.get(points[-1].step, 1))
                self._oom_line.setValue(x_oom)
                self._oom_line.label.setFormat(f"out of memory ({result.oom_phase})" if result.oom_phase
                                               else "out of memory")
                self._oom_line.show()
                x_end = max(x_end, x_oom + 0.6)
            else:
                self._oom_line.hide()
            item.setXRange(min(xs) - 0.3, x_end, padding=0)
            item.setYRange(0, top / scale * 1.3, padding=0)
        else:
            self._allocated_curve.setData([], [])
            self._reserved_curve.setData([], [])
            self._phase_peak_curve.setData([], [])
            self._cache_curve.setData([], [])
            self._show_timeline_hint(True)
