"""Estimated versus measured at a glance: two stacked bars (memory by category) against the GPU's
capacity line, the fit status, the difference in percent, notes, and the per-layer table."""

from __future__ import annotations

import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import (QCheckBox, QDialog, QDialogButtonBox, QHBoxLayout, QHeaderView, QLabel,
                               QPushButton, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)

from app.estimator import EstimateController
from app.state import AppState
from app.widgets.common import (CATEGORIES, CATEGORY_COLORS, CATEGORY_LABELS, STATUS_COLORS, byte_unit,
                                legend_text_color, make_plot, note_label, stacked_parts)
from engine.units import format_bytes

_TIGHT_MARGIN = 0.10


def fit_status(total_bytes: int, capacity_bytes: int) -> str:
    """'fits' (more than 10% free), 'tight' (within 10%), 'over' (above capacity)."""
    if not capacity_bytes or not total_bytes:
        return ""
    if total_bytes > capacity_bytes:
        return "over"
    if total_bytes > capacity_bytes * (1 - _TIGHT_MARGIN):
        return "tight"
    return "fits"


_STATUS_TEXT = {"fits": "Fits", "tight": "Tight fit (within 10% of capacity)", "over": "Does not fit"}


class LayerDialog(QDialog):
    """Per-layer parameters, weight bytes and activation bytes of an estimate."""

    def __init__(self, result, parent=None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Per-layer breakdown")
        self.resize(640, 520)
        table = QTableWidget(len(result.layers), 4)
        table.setHorizontalHeaderLabels(["Module", "Parameters", "Weights", "Activations"])
        for row, layer in enumerate(result.layers):
            values = [layer.name, f"{layer.params:,}", format_bytes(layer.weight_bytes),
                      format_bytes(layer.activation_bytes)]
            for col, text in enumerate(values):
                item = QTableWidgetItem(text)
                if col:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                table.setItem(row, col, item)
        table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table = table
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(table)
        layout.addWidget(buttons)


class EstimateView(QWidget):
    def __init__(self, state: AppState, controller: EstimateController, parent=None) -> None:
        super().__init__(parent)
        self._state = state
        self._controller = controller
        self._estimate = None
        self._measured = None

        self.status = QLabel()
        self.status.setObjectName("fit_status")
        font = self.status.font()
        font.setPointSizeF(font.pointSizeF() * 1.35)
        font.setBold(True)
        self.status.setFont(font)
        self.summary = QLabel()
        self.summary.setWordWrap(True)
        self.summary.setTextFormat(Qt.TextFormat.RichText)
        self.notes = note_label()
        self.engine_state = note_label()
        self.traced = QCheckBox("Traced estimate (FakeTensor step: slower, closer)")
        self.layers_button = QPushButton("Per-layer breakdown…")
        self.layers_button.setEnabled(False)

        self.plot = make_plot(left="memory")
        self.plot.setMinimumHeight(260)
        item = self.plot.getPlotItem()
        item.getAxis("bottom").setTicks([[(0, "Estimated"), (1, "Measured")]])
        item.setXRange(-0.6, 2.5, padding=0)  # the legend sits in the empty room on the right
        self.legend = item.addLegend(offset=(-10, 10), labelTextSize="10pt",
                                     labelTextColor=legend_text_color())
        self._bars: dict[str, pg.BarGraphItem] = {}
        for cat in CATEGORIES:
            bar = pg.BarGraphItem(x=[0, 1], height=[0, 0], y0=[0, 0], width=0.6,
                                  brush=CATEGORY_COLORS[cat], pen=pg.mkPen("#00000040"))
            self._bars[cat] = bar
            item.addItem(bar)
            self.legend.addItem(bar, CATEGORY_LABELS[cat])
        self._capacity_line = pg.InfiniteLine(angle=0, pen=pg.mkPen("#D0342C", width=2, style=Qt.PenStyle.DashLine))
        item.addItem(self._capacity_line)
        self._capacity_label = pg.TextItem(color="#D0342C", anchor=(0, 1))
        item.addItem(self._capacity_label)
        self._totals = [pg.TextItem(anchor=(0.5, 1.0), color=legend_text_color()),
                        pg.TextItem(anchor=(0.5, 1.0), color=legend_text_color())]
        for text in self._totals:
            item.addItem(text)

        self.status.setWordWrap(True)
        options = QHBoxLayout()
        options.addWidget(self.traced, 1)
        options.addWidget(self.layers_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.status)
        layout.addWidget(self.summary)
        layout.addWidget(self.plot, 1)
        layout.addLayout(options)
        layout.addWidget(self.notes)
        layout.addWidget(self.engine_state)

        self.traced.toggled.connect(self._on_traced_toggled)
        self.layers_button.clicked.connect(self._on_layers_clicked)
        state.estimate_changed.connect(self._on_estimate_changed)
        state.measured_changed.connect(self._on_measured_changed)
        state.capacity_changed.connect(lambda _c: self._redraw())
        state.profile_changed.connect(lambda _p: self._redraw())
        controller.status_changed.connect(self._on_engine_status)
        self._estimate = state.current.estimate
        self._measured = state.current.measured
        if not controller.available:
            self._on_engine_status("The estimator (engine.estimate) is not available yet in this build.")
        self._redraw()

    # ----- handlers -----------------------------------------------------------------------
    def _on_traced_toggled(self, on: bool) -> None:
        self._controller.set_traced(on)

    def _on_layers_clicked(self) -> None:
        if self._estimate is not None and self._estimate.layers:
            dialog = LayerDialog(self._estimate, self)
            dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
            dialog.open()
            self._layer_dialog = dialog

    def _on_estimate_changed(self, result) -> None:
        self._estimate = result
        self._redraw()

    def _on_measured_changed(self, result) -> None:
        self._measured = result
        self._redraw()

    def _on_engine_status(self, text: str) -> None:
        self.engine_state.setText(text)

    # ----- drawing ------------------------------------------------------------------------
    def _redraw(self) -> None:
        est, meas = self._estimate, self._measured
        capacity = self._state.capacity_bytes
        cpu = self._state.profile.target == "cpu"
        parts = [stacked_parts(est, cpu=cpu), stacked_parts(meas)]
        totals = [sum(p.values()) for p in parts]
        unit, scale = byte_unit(max(totals + [1]))
        show_capacity = capacity and capacity <= 3 * max(totals + [1])
        top = max(totals + [capacity if show_capacity else 0, 1])
        bottoms = [0.0, 0.0]
        for cat in CATEGORIES:
            heights = [parts[0][cat] / scale, parts[1][cat] / scale]
            self._bars[cat].setOpts(x=[0, 1], height=heights, y0=list(bottoms), width=0.6)
            bottoms = [bottoms[0] + heights[0], bottoms[1] + heights[1]]
        item = self.plot.getPlotItem()
        item.setLabel("left", f"memory ({unit})")
        item.setYRange(0, top / scale * 1.12, padding=0)
        if capacity:
            cap_text = f"{self._state.gpu_name}: {format_bytes(capacity)}"
            if show_capacity:
                self._capacity_line.setValue(capacity / scale)
                self._capacity_label.setText(cap_text)
                self._capacity_label.setPos(-0.55, capacity / scale)
                self._capacity_line.show()
                self._capacity_label.show()
            else:
                self._capacity_line.hide()
                self._capacity_label.hide()
        labels = ["Estimated", "Measured"]
        for i, (text, total) in enumerate(zip(self._totals, totals)):
            text.setText(format_bytes(total) if total else "")
            text.setPos(i, total / scale + top / scale * 0.01)
        if meas is not None and getattr(meas, "oom", False):
            labels[1] = "Measured (OOM)"
        item.getAxis("bottom").setTicks([[(0, labels[0]), (1, labels[1])]])

        status = fit_status(totals[0], capacity) if est is not None else ""
        if est is None:
            self.status.setText("No estimate")
            self.status.setStyleSheet(f"color: {STATUS_COLORS['']}")
        else:
            free = capacity - totals[0]
            where = (f"{format_bytes(free)} free of {format_bytes(capacity)}" if free >= 0
                     else f"{format_bytes(-free)} over {format_bytes(capacity)}")
            self.status.setText(f"{_STATUS_TEXT[status]} — {where}")
            self.status.setStyleSheet(f"color: {STATUS_COLORS[status]}")
        self.summary.setText(self._summary_html(est, meas, capacity, show_capacity))
        notes = list(getattr(est, "notes", ()) or ()) + list(getattr(meas, "notes", ()) or ())
        self.notes.setText("\n".join(f"• {n}" for n in notes))
        self.layers_button.setEnabled(bool(est is not None and est.layers))

    def _summary_html(self, est, meas, capacity: int, capacity_on_scale: bool) -> str:
        if est is None:
            return ""
        p = self._state.profile
        parts = [f"<b>{p.model}</b> · {p.mode} · batch {p.batch} × seq {p.seq} · {p.precision} · "
                 f"target {p.target}",
                 f"Estimate ({est.method}): peak allocated <b>{format_bytes(est.peak_allocated_bytes)}</b>, "
                 f"reserved {format_bytes(est.peak_reserved_bytes)}, device used "
                 f"<b>{format_bytes(est.device_used_bytes)}</b>"
                 + (f" · peak in {est.peak_phase}" if est.peak_phase else "")]
        if meas is not None and not meas.oom and meas.peak_allocated_bytes:
            diff = 100.0 * (est.peak_allocated_bytes - meas.peak_allocated_bytes) / meas.peak_allocated_bytes
            parts.append(f"Measured on {meas.device_name or meas.device}: peak allocated "
                         f"<b>{format_bytes(meas.peak_allocated_bytes)}</b> — estimate is "
                         f"<b>{diff:+.1f}%</b> off · {meas.tokens_per_s:,.0f} tokens/s")
        if capacity and not capacity_on_scale:
            parts.append(f"Capacity line ({format_bytes(capacity)}) is far above the bars and not drawn.")
        return "<br>".join(parts)
