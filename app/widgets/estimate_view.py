"""Estimated versus measured at a glance: two stacked bars (memory by category) against the GPU's
capacity line, the fit status, the difference in percent, notes, and the per-layer table."""

from __future__ import annotations

import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import (QApplication, QDialog, QDialogButtonBox, QHBoxLayout, QHeaderView, QLabel,
                               QPushButton, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)

from app.estimator import EstimateController
from app.state import AppState
from app.widgets.common import (CATEGORIES, CATEGORY_COLORS, CATEGORY_LABELS, STATUS_COLORS, byte_unit,
                                center_lines, follow_theme, legend_text_color, make_plot, note_label,
                                stacked_parts, text_item)
from engine.units import format_bytes

LOGITS_ROW = "logits + loss"  # engine.estimate.analytic.LOGITS_ROW: not an activation kept for backward

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


class _NumberItem(QTableWidgetItem):
    """A right-aligned cell shown formatted and sorted by its number."""

    def __init__(self, text: str, value: float) -> None:
        super().__init__(text)
        self.value = value
        self.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)

    def __lt__(self, other) -> bool:  # noqa: D105 - Qt sorting hook
        if isinstance(other, _NumberItem):
            return self.value < other.value
        return super().__lt__(other)


class LayerDialog(QDialog):
    """Per-layer parameters, weight bytes and activation bytes of an estimate (sortable)."""

    def __init__(self, result, parent=None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Per-layer breakdown")
        self.resize(700, 560)
        layers = list(result.layers)
        total_act = sum(layer.activation_bytes for layer in layers) or 1
        table = QTableWidget(len(layers), 5)
        table.setHorizontalHeaderLabels(["Module", "Parameters", "Weights", "Activations", "Share"])
        table.horizontalHeaderItem(4).setToolTip("Share of all the layers' activation bytes")
        for row, layer in enumerate(layers):
            name = _NumberItem(layer.name, row)  # sorts in model order
            name.setTextAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter)
            table.setItem(row, 0, name)
            table.setItem(row, 1, _NumberItem(f"{layer.params:,}", layer.params))
            table.setItem(row, 2, _NumberItem(format_bytes(layer.weight_bytes), layer.weight_bytes))
            table.setItem(row, 3, _NumberItem(format_bytes(layer.activation_bytes), layer.activation_bytes))
            share = layer.activation_bytes / total_act
            table.setItem(row, 4, _NumberItem(f"{100 * share:.1f}%", share))
        table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        for col in range(1, 5):
            table.horizontalHeader().setSectionResizeMode(col, QHeaderView.ResizeMode.ResizeToContents)
        table.horizontalHeader().setSortIndicator(0, Qt.SortOrder.AscendingOrder)
        table.setSortingEnabled(True)
        table.verticalHeader().hide()
        table.setCurrentCell(-1, -1)
        self.table = table
        params = sum(x.params for x in layers)
        weights = sum(x.weight_bytes for x in layers)
        logits = sum(x.activation_bytes for x in layers if x.name == LOGITS_ROW)
        kept = sum(x.activation_bytes for x in layers) - logits
        est_weights = int(dict(result.breakdown).get("weights", 0))
        self.totals = (params, weights, kept, logits)
        note = note_label(
            f"{result.method.capitalize()} estimate · {len(layers)} rows, from the embeddings to the logits · "
            f"total {params:,} parameters (the model's {result.params:,}), {format_bytes(weights)} of weights "
            f"(the estimate's {format_bytes(est_weights)}; the embeddings row takes the buffers), "
            f"{format_bytes(kept)} of activations kept for backward at the end of the forward, and "
            f"{format_bytes(logits)} of logits and loss tensors at the loss (temporaries in the bars). "
            "Click a column header to sort.")
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(note)
        layout.addWidget(table)
        layout.addWidget(buttons)


class EstimateView(QWidget):
    layers_button_enabled_changed = Signal(bool)  # a per-layer breakdown is (not) available

    def __init__(self, state: AppState, controller: EstimateController, parent=None) -> None:
        super().__init__(parent)
        follow_theme(self)
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
        self.method_label = QLabel()  # which estimator the headline comes from
        self.method_label.setObjectName("estimate_method")
        self.method_label.setWordWrap(True)
        self.layers_button = QPushButton("Per-layer breakdown…")
        self.layers_button.setEnabled(False)

        self.plot = make_plot(left="memory")
        self.plot.setMinimumHeight(260)
        item = self.plot.getPlotItem()
        item.getAxis("bottom").setTicks([[(0, "Estimated"), (1, "Measured")]])
        item.setXRange(-0.6, 2.5, padding=0)  # the legend sits in the room on the right (_fit_legend)
        self.legend = item.addLegend(offset=(-10, 10), labelTextSize="9pt",
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
        self._capacity_label = pg.TextItem(color="#D0342C", anchor=(0, 1))  # filled: readable over bars
        item.addItem(self._capacity_label)
        self._totals = [text_item(), text_item()]
        for text in self._totals:
            item.addItem(text)
        self._not_measured = text_item(anchor=(0.5, 1.0))
        center_lines(self._not_measured, ["not measured", "yet (Ctrl+R)"])
        item.addItem(self._not_measured)

        self.status.setWordWrap(True)
        options = QHBoxLayout()
        options.addWidget(self.method_label, 1)
        options.addWidget(self.layers_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.status)
        layout.addWidget(self.summary)
        layout.addWidget(self.plot, 1)
        layout.addLayout(options)
        layout.addWidget(self.notes)
        layout.addWidget(self.engine_state)

        item.vb.sigResized.connect(lambda *_: self._fit_legend())
        self.layers_button.clicked.connect(self._on_layers_clicked)
        state.estimate_changed.connect(self._on_estimate_changed)
        state.measured_changed.connect(self._on_measured_changed)
        state.capacity_changed.connect(lambda _c: self._redraw())
        state.profile_changed.connect(lambda _p: self._redraw())
        controller.status_changed.connect(self._on_engine_status)
        controller.pending_changed.connect(lambda _p: self._redraw())
        self._estimate = state.current.estimate
        self._measured = state.current.measured
        self.on_theme_changed()
        self._redraw()

    def _fit_legend(self) -> None:
        """Widen the x range so that the legend, drawn at a fixed pixel size at the top right, has
        room right of the Measured bar at any plot width (it covered the bar in narrow windows)."""
        item = self.plot.getPlotItem()
        width = item.vb.width()
        legend = self.legend.boundingRect().width() + 24
        bars_right = 1.35  # the Measured bar ends at 1.3
        if width <= legend + 40:
            x_max = 2.5
        else:
            x_max = max(2.5, bars_right + legend * (bars_right + 0.6) / (width - legend))
        item.setXRange(-0.6, x_max, padding=0)

    def on_theme_changed(self) -> None:
        base = QApplication.palette().color(QPalette.ColorRole.Base)
        base.setAlpha(210)
        self._capacity_label.fill = pg.mkBrush(base)
        self._capacity_label.update()

    # ----- handlers -----------------------------------------------------------------------
    def _on_layers_clicked(self) -> None:
        self.show_layers()

    def show_layers(self) -> "LayerDialog | None":
        """Open the per-layer breakdown of the current estimate (non-modal)."""
        if self._estimate is None or not self._estimate.layers:
            return None
        dialog = LayerDialog(self._estimate, self)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.open()
        self._layer_dialog = dialog
        return dialog

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
        capacity, capacity_name = self._state.capacity_for()
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
            cap_text = f"{capacity_name}: {format_bytes(capacity)}"
            if show_capacity:
                self._capacity_line.setValue(capacity / scale)
                self._capacity_label.setText(cap_text)
                self._capacity_label.setPos(-0.55, capacity / scale)
                self._capacity_line.show()
                self._capacity_label.show()
            else:
                self._capacity_line.hide()
                self._capacity_label.hide()
        labels = [self.estimate_label(est), "Measured"]
        totals_text = [format_bytes(t) if t else "" for t in totals]
        diff = self._difference(est, meas)
        if diff is not None:
            totals_text[1] += f"\n({diff:+.1f}% vs estimate)"
        for i, (text, total) in enumerate(zip(self._totals, totals)):
            text.setText(totals_text[i])
            text.setPos(i, total / scale + top / scale * 0.01)
        self._not_measured.setVisible(meas is None and est is not None)
        self._not_measured.setPos(1, top / scale * 0.12)
        if meas is not None and getattr(meas, "oom", False):
            labels[1] = "Measured (OOM)"
        labels = self._per_rank_labels(labels, meas)
        item.getAxis("bottom").setTicks([[(0, labels[0]), (1, labels[1])]])

        status = fit_status(totals[0], capacity) if est is not None else ""
        if est is None:
            self.status.setText("No estimate")
            self.status.setStyleSheet(f"color: {STATUS_COLORS['']}")
        else:
            free = capacity - totals[0]
            where = (f"{format_bytes(free)} free of {format_bytes(capacity)}" if free >= 0
                     else f"{format_bytes(-free)} over {format_bytes(capacity)}")
            if capacity_name in ("this machine's RAM", "simulated capacity"):
                where += f" ({capacity_name})"
            self.status.setText(f"{_STATUS_TEXT[status]} — {where} · {self.method_tag(est)}")
            self.status.setStyleSheet(f"color: {STATUS_COLORS[status]}")
        self.summary.setText(self._summary_html(est, meas, capacity, show_capacity))
        self.method_label.setText(self.method_text(est))
        self.method_label.setToolTip("Analytic: formulas, shown at once while you edit. Traced: the "
                                     "measured step run on meta tensors, seconds, closer to a real run; "
                                     "it follows by itself and replaces the analytic number.")
        notes = list(getattr(est, "notes", ()) or ()) + list(getattr(meas, "notes", ()) or ())
        self.notes.setText("\n".join(f"• {n}" for n in notes))
        has_layers = bool(est is not None and est.layers)
        if has_layers != self.layers_button.isEnabled():
            self.layers_button.setEnabled(has_layers)
            self.layers_button_enabled_changed.emit(has_layers)

    def _per_rank_labels(self, labels: list[str], meas) -> list[str]:
        """Data parallel (engine.techniques.sharding): both bars are one rank's memory; the
        measured one is the worst rank's, named, with every rank's peak."""
        profile = self._state.profile
        if profile.shard == "none":
            return labels
        labels = [f"{labels[0]}\nper rank, {profile.gpus} GPUs ({profile.shard})", labels[1]]
        ranks = (getattr(meas, "extra", None) or {}).get("ranks") if meas is not None else None
        if ranks:
            worst = meas.extra.get("worst_rank", 0)
            peaks = ", ".join(f"r{r['rank']} {format_bytes(r['peak_allocated_bytes'])}"
                              for r in ranks[:8])
            labels[1] = f"{labels[1]}\nworst rank {worst} of {len(ranks)}\n{peaks}"
        return labels

    def estimate_label(self, est) -> str:
        """The estimate bar's label: which estimator the number comes from."""
        if est is None:
            return "Estimated"
        if est.method == "traced":
            return "Estimated (traced)"
        return "Estimated (analytic)"

    def method_tag(self, est) -> str:
        """The headline's short word on its estimator: "traced" or "analytic (refining…)"."""
        if est.method == "traced":
            return "traced"
        return "analytic (refining…)" if self._controller.pending else "analytic"

    def method_text(self, est) -> str:
        """One line on where the headline comes from: "traced", "analytic (refining…)" or why the
        analytic one stays."""
        c = self._controller
        if est is None:
            return "Estimator: analytic…" if c.pending else ""
        if est.method == "traced":
            return "Estimator: traced (one step on meta tensors)" + (" · updating…" if c.pending else "")
        if c.pending:
            return "Estimator: analytic (refining…)"
        if c.traced_error:
            return f"Estimator: analytic (the traced estimate failed: {c.traced_error})"
        return "Estimator: analytic"

    @staticmethod
    def _difference(est, meas) -> float | None:
        """Measured peak allocated relative to the estimate, in percent (None if not comparable)."""
        if est is None or meas is None or meas.oom or not est.peak_allocated_bytes:
            return None
        return 100.0 * (meas.peak_allocated_bytes - est.peak_allocated_bytes) / est.peak_allocated_bytes

    def _summary_html(self, est, meas, capacity: int, capacity_on_scale: bool) -> str:
        if est is None:
            return ""
        p = self._state.profile
        shape = f"batch {p.batch} × seq {p.seq}"
        if p.mode == "generate":
            prompt = p.prompt_len or "dataset"
            shape = (f"{p.batch} sequences × ({prompt} prompt + {p.new_tokens} new) · {p.cache} "
                     f"cache {format_bytes(est.kv_cache_bytes)}")
        parts = [f"<b>{p.model}</b> · {p.mode} · {shape} · {p.precision} · "
                 f"target {p.target}",
                 f"Estimate ({est.method}): peak allocated <b>{format_bytes(est.peak_allocated_bytes)}</b>, "
                 f"reserved {format_bytes(est.peak_reserved_bytes)}, device used "
                 f"<b>{format_bytes(est.device_used_bytes)}</b>"
                 + (f" · peak in {est.peak_phase}" if est.peak_phase else "")]
        diff = self._difference(est, meas)
        if diff is not None:
            parts.append(f"Measured on {meas.device_name or meas.device}: peak allocated "
                         f"<b>{format_bytes(meas.peak_allocated_bytes)}</b> — "
                         f"<b>{diff:+.1f}%</b> versus the estimate · {meas.tokens_per_s:,.0f} tokens/s")
        elif meas is not None and meas.oom:
            parts.append(f"Measured: <b>out of memory</b> at step {meas.oom_step}"
                         + (f" ({meas.oom_phase})" if meas.oom_phase else "")
                         + f" after {format_bytes(meas.peak_allocated_bytes)} allocated")
        if capacity and not capacity_on_scale:
            parts.append(f"Capacity line ({format_bytes(capacity)}) is far above the bars and not drawn.")
        return "<br>".join(parts)
