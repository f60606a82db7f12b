"""Compare profiles: memory by category (estimated and measured bars per profile, grouped),
tokens/s, and memory versus throughput with the Pareto front; export as PNG and CSV.

``CompareCharts`` draws a list of comparison rows (``engine.compare.compare_row`` dicts) and is
also what ``headroom compare --png`` renders offscreen. ``CompareView`` feeds it from the AppState.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtGui import QFontMetrics
from PySide6.QtWidgets import (QFileDialog, QGridLayout, QHBoxLayout, QLabel, QMenu, QPushButton,
                               QToolButton, QVBoxLayout, QWidget)

from app.state import AppState
from app.widgets.common import (CATEGORIES, CATEGORY_COLORS, CATEGORY_LABELS, byte_unit, legend_text_color,
                                make_plot,
                                note_label, text_item)
from app.worker import TaskRunner
from engine.estimate import estimate

_EST_OFFSET, _MEAS_OFFSET, _WIDTH = -0.2, 0.2, 0.36


def row_parts(row: dict[str, Any], which: str) -> dict[str, int]:
    """Bytes per category of a comparison row's estimate ('estimate') or measurement ('measured')."""
    parts = {c: 0 for c in CATEGORIES}
    breakdown = row.get(f"{which}_breakdown") or {}
    if which == "estimate" and not breakdown:
        breakdown = {c: row.get(f"estimate_{c}_bytes") or 0 for c in CATEGORIES}
    for k, v in breakdown.items():
        if k in parts and v:
            parts[k] = max(0, int(v))
    allocated = row.get(f"{which}_peak_allocated_bytes") or 0
    reserved = row.get(f"{which}_peak_reserved_bytes") or 0
    used = row.get(f"{which}_device_used_bytes") or 0
    if allocated and not any(parts.values()):
        parts["activations"] = int(allocated)
    if reserved and row.get("target", "cuda") != "cpu":
        parts["allocator_overhead"] = max(0, int(reserved) - int(allocated))
        if used:
            parts["cuda_context"] = max(0, int(used) - int(reserved))
    return parts


def pareto_indices(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated by another (less memory AND more tokens/s), by memory."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


class _NoEstimate:
    method = ""
    peak_allocated_bytes = peak_reserved_bytes = device_used_bytes = 0
    breakdown: dict[str, int] = {}


_NO_ESTIMATE = _NoEstimate()


class CompareCharts(QWidget):
    """Three plots over comparison rows; items are created once per profile count."""

    def __init__(self, rows: Sequence[dict[str, Any]] = (), parent=None) -> None:
        super().__init__(parent)
        self.memory_plot = make_plot(title="Peak memory by category: estimated (left) vs measured (right)")
        self.speed_plot = make_plot(title="Throughput: estimated (left) vs measured (right)",
                                    left="tokens/s")
        self.scatter_plot = make_plot(title="Memory vs throughput (Pareto front)",
                                      left="tokens/s", bottom="peak memory")
        self.scatter_plot.setMouseEnabled(x=False, y=False)
        mem = self.memory_plot.getPlotItem()
        legend = mem.addLegend(offset=(-10, 10), labelTextSize="10pt", labelTextColor=legend_text_color())
        self._est_bars: dict[str, pg.BarGraphItem] = {}
        self._meas_bars: dict[str, pg.BarGraphItem] = {}
        for cat in CATEGORIES:
            est = pg.BarGraphItem(x=[], height=[], y0=[], width=_WIDTH, brush=CATEGORY_COLORS[cat],
                                  pen=pg.mkPen("#00000040"))
            light = pg.mkColor(CATEGORY_COLORS[cat])
            light.setAlpha(140)  # measured: lighter fill, dark outline
            meas = pg.BarGraphItem(x=[], height=[], y0=[], width=_WIDTH, brush=pg.mkBrush(light),
                                   pen=pg.mkPen("#202020", width=1.5))
            mem.addItem(est)
            mem.addItem(meas)
            legend.addItem(est, CATEGORY_LABELS[cat])
            self._est_bars[cat], self._meas_bars[cat] = est, meas
        self._speed_bars = pg.BarGraphItem(x=[], height=[], width=0.4, brush="#55A868",
                                           pen=pg.mkPen("#202020", width=1.5))
        est_green = pg.mkColor("#55A868")
        est_green.setAlpha(110)  # estimated: lighter fill, no outline
        self._est_speed_bars = pg.BarGraphItem(x=[], height=[], width=0.4, brush=pg.mkBrush(est_green),
                                               pen=None)
        self.speed_plot.addItem(self._est_speed_bars)
        self.speed_plot.addItem(self._speed_bars)
        sc = self.scatter_plot.getPlotItem()
        self._front_curve = sc.plot([], [], pen=pg.mkPen("#2E9E44", width=2, style=Qt.PenStyle.DashLine))
        self._points = pg.ScatterPlotItem(size=11, brush=pg.mkBrush("#4C72B0"), pen=pg.mkPen("w"),
                                          hoverable=True, tip=self._point_tip)
        self._front_points = pg.ScatterPlotItem(size=15, brush=pg.mkBrush("#2E9E44"), pen=pg.mkPen("k"),
                                                hoverable=True, tip=self._point_tip)
        # estimated points (hollow) under the measured ones: the plot works before any run
        self._est_points = pg.ScatterPlotItem(size=11, brush=pg.mkBrush(None),
                                              pen=pg.mkPen("#4C72B0", width=2), hoverable=True,
                                              tip=self._est_point_tip)
        sc.addItem(self._est_points)
        sc.addItem(self._front_points)
        sc.addItem(self._points)  # on top: every point stays visible, the front ones ringed green
        self._labels: list[pg.TextItem] = []
        self._diff_labels: list[pg.TextItem] = []
        self.empty_note = note_label()

        grid = QGridLayout(self)
        grid.setContentsMargins(0, 0, 0, 0)
        grid.addWidget(self.memory_plot, 0, 0, 1, 2)
        grid.addWidget(self.speed_plot, 1, 0)
        grid.addWidget(self.scatter_plot, 1, 1)
        grid.addWidget(self.empty_note, 2, 0, 1, 2)
        grid.setRowStretch(0, 3)
        grid.setRowStretch(1, 2)
        self.rows: list[dict[str, Any]] = []
        self.set_rows(rows)

    def set_rows(self, rows: Sequence[dict[str, Any]]) -> None:
        self.rows = list(rows)
        n = len(self.rows)
        est_parts = [row_parts(r, "estimate") for r in self.rows]
        meas_parts = [row_parts(r, "measured") for r in self.rows]
        top = max([sum(p.values()) for p in est_parts + meas_parts] + [1])
        unit, scale = byte_unit(top)
        self._unit = unit
        xs = list(range(n))
        est_bottom, meas_bottom = [0.0] * n, [0.0] * n
        for cat in CATEGORIES:
            eh = [p[cat] / scale for p in est_parts]
            mh = [p[cat] / scale for p in meas_parts]
            self._est_bars[cat].setOpts(x=[x + _EST_OFFSET for x in xs], height=eh, y0=list(est_bottom),
                                        width=_WIDTH)
            self._meas_bars[cat].setOpts(x=[x + _MEAS_OFFSET for x in xs], height=mh, y0=list(meas_bottom),
                                         width=_WIDTH)
            est_bottom = [a + b for a, b in zip(est_bottom, eh)]
            meas_bottom = [a + b for a, b in zip(meas_bottom, mh)]
        mem = self.memory_plot.getPlotItem()
        mem.setLabel("left", f"memory ({unit})")
        mem.setXRange(-0.7, max(n, 1) - 0.3 + (1.2 if n else 0), padding=0)
        mem.setYRange(0, top / scale * 1.12, padding=0)
        for label in self._diff_labels:
            self.memory_plot.removeItem(label)
        self._diff_labels = []
        for i, r in enumerate(self.rows):  # measured relative to estimated, above the measured bar
            est, meas = r.get("estimate_peak_allocated_bytes"), r.get("measured_peak_allocated_bytes")
            if r.get("oom"):
                text = "OOM"
            elif est and meas:
                text = f"{100.0 * (meas - est) / est:+.0f}%"
            else:
                continue
            label = text_item(text, anchor=(0.5, 1.0))
            label.setPos(i + _MEAS_OFFSET, meas_bottom[i] + top / scale * 0.01)
            self.memory_plot.addItem(label)
            self._diff_labels.append(label)

        speeds = [float(r.get("tokens_per_s") or 0.0) for r in self.rows]
        est_speeds = [float(r.get("estimate_tokens_per_s") or 0.0) for r in self.rows]
        self._speed_bars.setOpts(x=[x + 0.21 for x in xs], height=speeds, width=0.4)
        self._est_speed_bars.setOpts(x=[x - 0.21 for x in xs], height=est_speeds, width=0.4)
        sp = self.speed_plot.getPlotItem()
        sp.setXRange(-0.7, max(n, 1) - 0.3, padding=0)
        sp.setYRange(0, max(speeds + est_speeds + [1]) * 1.1, padding=0)
        self._apply_ticks()

        for label in self._labels:
            self.scatter_plot.removeItem(label)
        self._labels = []
        estimated = [(i, r) for i, r in enumerate(self.rows) if r.get("estimate_tokens_per_s")]
        self._est_point_rows = [r for _i, r in estimated]
        self._est_points.setData(
            [(r.get("estimate_peak_allocated_bytes") or 0) / scale for _i, r in estimated],
            [float(r["estimate_tokens_per_s"]) for _i, r in estimated],
            data=list(range(len(estimated))))
        # each profile's best-known point: measured where it ran, else estimated
        measured = [(i, r) for i, r in enumerate(self.rows)
                    if r.get("tokens_per_s") or r.get("estimate_tokens_per_s")]
        pts = []
        for i, r in measured:
            if r.get("tokens_per_s"):
                memory = r.get("measured_peak_allocated_bytes") or r.get("estimate_peak_allocated_bytes") or 0
                pts.append((memory / scale, float(r["tokens_per_s"])))
            else:
                pts.append(((r.get("estimate_peak_allocated_bytes") or 0) / scale,
                            float(r["estimate_tokens_per_s"])))
        self._point_rows = [r for _i, r in measured]
        real = [k for k, (_i, r) in enumerate(measured) if r.get("tokens_per_s")]
        self._points.setData([pts[k][0] for k in real], [pts[k][1] for k in real], data=real)
        front = pareto_indices(pts)
        self.front_names = [measured[k][1].get("name", "") for k in front]
        fx = [pts[k][0] for k in front]
        fy = [pts[k][1] for k in front]
        self._front_points.setData(fx, fy, data=front)
        self._front_curve.setData(fx, fy)
        sc = self.scatter_plot.getPlotItem()
        sc.setLabel("bottom", f"peak allocated ({unit}); hollow: estimated, filled: measured")
        if pts:
            x_top, y_top = max(p[0] for p in pts) * 1.25, max(p[1] for p in pts) * 1.25
            sc.setXRange(0, x_top, padding=0)
            sc.setYRange(0, y_top, padding=0)
            # numbers, as on the bar charts' axes; points closer than a marker share one label
            groups: list[list[int]] = []
            for k, (x, y) in enumerate(pts):
                for g in groups:
                    gx, gy = pts[g[0]]
                    if abs(x - gx) < 0.04 * x_top and abs(y - gy) < 0.06 * y_top:
                        g.append(k)
                        break
                else:
                    groups.append([k])
            for g in groups:
                label = text_item(", ".join(str(measured[k][0] + 1) for k in g), anchor=(-0.3, 1.0))
                label.setPos(*pts[g[0]])
                self.scatter_plot.addItem(label)
                self._labels.append(label)
        missing = [r.get("name", "") for r in self.rows if not r.get("tokens_per_s")]
        pareto = ("Green: the Pareto front (" + ", ".join(self.front_names) + "): no other profile uses "
                  "less memory and runs faster (measured where run, else estimated)."
                  if self.front_names else "")
        gpus_for = sorted({r.get("estimate_gpu") for r in self.rows if r.get("estimate_gpu")})
        if gpus_for:
            pareto += " Estimated speeds are for " + ", ".join(gpus_for) + "."
        by_method: dict[str, list[str]] = {}
        for i, r in enumerate(self.rows):
            if r.get("estimate_method"):
                by_method.setdefault(r["estimate_method"], []).append(str(i + 1))
        self.estimators_text = ("Estimates: " + "; ".join(
            f"{m} ({', '.join(nums)})" for m, nums in sorted(by_method.items(), key=lambda x: x[0] != "traced"))
            + ". " if by_method else "")
        self.empty_note.setText(
            self.estimators_text
            + ("Not measured yet: " + ", ".join(missing) + ". Select a profile and run it to add "
             "measured bars, throughput and a point on the Pareto plot. " if missing else "")
            + "Measured bars have a dark outline; the percentage above them is measured versus "
              "estimated. " + pareto)

    def _point_tip(self, x, y, data) -> str:
        rows = getattr(self, "_point_rows", [])
        name = rows[int(data)].get("name", "") if 0 <= int(data) < len(rows) else ""
        return f"{name}\n{y:,.0f} tokens/s · {x:,.2f} {getattr(self, '_unit', '')} peak allocated"

    def _est_point_tip(self, x, y, data) -> str:
        rows = getattr(self, "_est_point_rows", [])
        r = rows[int(data)] if 0 <= int(data) < len(rows) else {}
        return (f"{r.get('name', '')} (estimated for {r.get('estimate_gpu') or 'the GPU'})\n"
                f"{y:,.0f} tokens/s · {x:,.2f} {getattr(self, '_unit', '')} peak allocated")

    def _apply_ticks(self) -> None:
        """Profile names under the bars, numbered, wrapped and cut to the room each bar has."""
        for plot, room_px in ((self.memory_plot, self.memory_plot.width() - 60),
                              (self.speed_plot, self.speed_plot.width() - 60)):
            x0, x1 = plot.getPlotItem().viewRange()[0]
            per_bar = max(40.0, room_px * 1.0 / max(1e-9, (x1 - x0)))  # pixels per unit of x
            chars = max(6, int(per_bar / 7.5))
            ticks = [(i, self._tick(r, i, chars)) for i, r in enumerate(self.rows)]
            axis = plot.getPlotItem().getAxis("bottom")
            axis.setTicks([ticks])
            lines = max([t.count("\n") + 1 for _x, t in ticks] + [1])
            axis.setHeight(QFontMetrics(axis.font()).lineSpacing() * lines + 14)  # room for both lines

    def resizeEvent(self, event) -> None:  # noqa: N802 - Qt override
        super().resizeEvent(event)
        self._apply_ticks()

    @staticmethod
    def _tick(row: dict[str, Any], index: int, chars: int = 24) -> str:
        """``"1. name"`` on up to two lines of ``chars`` characters (cut with … beyond)."""
        text = f"{index + 1}. {row.get('name', '')}"
        if len(text) <= chars:
            return text
        space, hyphen = text.rfind(" ", 0, chars + 1), text.rfind("-", 0, chars)
        if hyphen > space:  # break after a hyphen, keeping it on the first line
            first = text[:hyphen + 1]
        else:
            first = text[:space] if space > 3 else text[:chars]
        rest = text[len(first):].strip()
        if len(rest) > chars:
            rest = rest[:chars - 1] + "…"
        return first + "\n" + rest


def _best_estimate(profile, should_stop) -> tuple:
    """(profile, estimate, error): the traced estimate (closer to a real run), else the analytic
    one where the trace fails, else the error's first line."""
    error = ""
    for method in ("traced", "analytic"):
        try:
            return profile, estimate(profile, method=method, should_stop=should_stop), ""
        except Exception as exc:  # noqa: BLE001 - one bad profile must not hide the others
            error = error or (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            from engine.errors import BadInput, Cancelled

            if isinstance(exc, (BadInput, Cancelled)):
                break  # the analytic estimate refuses the same profile; a cancel ends the job
    return profile, None, error


def _hidden_names(state: AppState) -> list[str]:
    raw = state.settings.value("compare/hidden", "[]")
    try:
        names = json.loads(raw) if isinstance(raw, str) else []
    except ValueError:
        names = []
    return [n for n in names if isinstance(n, str)]


class CompareView(QWidget):
    def __init__(self, state: AppState, parent=None) -> None:
        super().__init__(parent)
        self._state = state
        self._runner = TaskRunner("compare-estimates", self)
        self._runner.result_ready.connect(self._on_estimates_ready)
        self._runner.failed.connect(self._on_estimates_failed)
        self.charts = CompareCharts()
        self.hidden: set[str] = set(_hidden_names(state))  # profiles left out of the comparison
        self.choose_button = QToolButton()
        self.choose_button.setText("Profiles")
        self.choose_button.setToolTip("Choose which profiles the comparison shows")
        self.choose_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        self.choose_menu = QMenu(self.choose_button)
        self.choose_menu.aboutToShow.connect(self._fill_choose_menu)
        self.choose_button.setMenu(self.choose_menu)
        self.refresh_button = QPushButton("Refresh")
        self.refresh_button.setToolTip("Estimate the profiles that have no estimate yet and redraw")
        self.png_button = QPushButton("Export PNG…")
        self.csv_button = QPushButton("Export CSV…")
        self.info = QLabel()
        self.info.setWordWrap(True)  # a long status wraps instead of setting the window's minimum width
        bar = QHBoxLayout()
        bar.addWidget(self.info, 1)
        bar.addWidget(self.choose_button)
        bar.addWidget(self.refresh_button)
        bar.addWidget(self.png_button)
        bar.addWidget(self.csv_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(bar)
        layout.addWidget(self.charts, 1)
        self.refresh_button.clicked.connect(self.refresh)
        self.png_button.clicked.connect(self._on_png_clicked)
        self.csv_button.clicked.connect(self._on_csv_clicked)
        state.profile_renamed.connect(self._on_profile_renamed)
        state.profiles_changed.connect(self.refresh)
        state.estimate_changed.connect(lambda _r: self._schedule_redraw())
        state.measured_changed.connect(lambda _r: self._schedule_redraw())
        self._dirty = True

    # ----- public -------------------------------------------------------------------------
    def refresh(self) -> None:
        """Estimate (traced, else analytic) every profile without a traced estimate yet (off the GUI
        thread), then redraw."""
        missing = [e.profile for e in self._state.entries if e.profile.name not in self.hidden
                   and (e.estimate is None or e.estimate.method != "traced")]
        if not missing:
            self._redraw()
            return
        self.info.setText(f"Estimating {len(missing)} profile(s)…")

        def job(progress, should_stop):
            out = []
            for i, p in enumerate(missing):
                if should_stop():
                    break
                progress(i / len(missing), p.name)
                out.append(_best_estimate(p, should_stop))
            return out

        self._runner.start(job)

    def rows(self) -> list[dict[str, Any]]:
        """Comparison rows of every profile with an estimate or a measured run."""
        from engine.compare import compare_row

        rows = []
        for e in self._state.entries:
            if (e.estimate is None and e.measured is None) or e.profile.name in self.hidden:
                continue
            row = compare_row(e.profile, e.estimate or _NO_ESTIMATE, e.measured)
            if e.estimate is None:  # measured only: no estimated numbers rather than zeros
                for key in list(row):
                    if key.startswith("estimate_"):
                        row[key] = None
            row["target"] = e.profile.target
            rows.append(row)
        return rows

    def export_png(self, path: str) -> bool:
        from app.compare_png import render_compare_png

        return self._export(lambda: render_compare_png(self.rows(), path), path)

    def export_csv(self, path: str) -> bool:
        from engine.compare import write_csv

        return self._export(lambda: write_csv(self.rows(), path), path)

    def _export(self, write, path: str) -> bool:
        if not self.rows():
            self._state.show_message("warning", "Nothing to compare yet: no profile has an estimate.")
            return False
        try:
            write()
        except Exception as exc:  # noqa: BLE001 - a full disk or a bad folder is a message
            self._state.show_message("error", f"Could not write {path}: {str(exc).splitlines()[0]}")
            return False
        self._state.show_message("info", f"Wrote {path}")
        return True

    def shutdown(self) -> None:
        self._runner.shutdown()

    def set_shown(self, name: str, shown: bool) -> None:
        """Show or leave out one profile (remembered in QSettings)."""
        (self.hidden.discard if shown else self.hidden.add)(name)
        self._state.settings.setValue("compare/hidden", json.dumps(sorted(self.hidden)))
        self.refresh()

    # ----- private ------------------------------------------------------------------------
    def _fill_choose_menu(self) -> None:
        self.choose_menu.clear()
        for name in self._state.names():
            action = self.choose_menu.addAction(name)
            action.setCheckable(True)
            action.setChecked(name not in self.hidden)
            action.toggled.connect(lambda on, n=name: self.set_shown(n, on))
        self.choose_menu.addSeparator()
        self.choose_menu.addAction("Show all", self._show_all)

    def _on_profile_renamed(self, old: str, new: str) -> None:
        """A left-out profile stays left out under its new name (the choice is kept by name)."""
        if old in self.hidden:
            self.hidden.discard(old)
            self.hidden.add(new)
            self._state.settings.setValue("compare/hidden", json.dumps(sorted(self.hidden)))

    def _show_all(self) -> None:
        self.hidden.clear()
        self._state.settings.setValue("compare/hidden", "[]")
        self.refresh()

    def _schedule_redraw(self) -> None:
        """Redraw now if shown, else when next shown (keeps result handling light on the GUI thread)."""
        if self.isVisible():
            self._redraw()
        else:
            self._dirty = True

    def showEvent(self, event) -> None:  # noqa: N802 - Qt override
        if self._dirty:
            self._redraw()
        super().showEvent(event)

    def _on_estimates_ready(self, results) -> None:
        errors = []
        for profile, result, error in results:
            if result is not None:
                self._state.set_estimate(profile, result)
            elif error:
                errors.append(f"{profile.name}: {error}")
        self.info.setText("; ".join(errors))
        self._redraw()

    def _on_estimates_failed(self, message: str) -> None:
        self.info.setText(message)

    def _redraw(self) -> None:
        self._dirty = False
        rows = self.rows()
        self.charts.set_rows(rows)
        missing = sum(1 for e in self._state.entries if e.estimate is None and e.profile.name not in self.hidden)
        if missing and not self._runner.is_running:
            self.info.setText(f"{missing} profile(s) without an estimate yet (Refresh)")
        enabled = bool(rows)
        self.png_button.setEnabled(enabled)
        self.csv_button.setEnabled(enabled)

    def _on_png_clicked(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export comparison as PNG", "comparison.png", "PNG (*.png)")
        if path:
            self.export_png(path)

    def _on_csv_clicked(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export comparison as CSV", "comparison.csv", "CSV (*.csv)")
        if path:
            self.export_csv(path)
