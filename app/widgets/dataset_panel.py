"""Dataset panel: the built-in sample or a file, its text column, and the token-length histogram
of the profile's model tokenizer (computed off the GUI thread, cached)."""

from __future__ import annotations

import csv
import html
import json
from pathlib import Path

import pyqtgraph as pg
from PySide6.QtCore import Signal
from PySide6.QtWidgets import (QComboBox, QFileDialog, QGroupBox, QHBoxLayout, QLabel, QPushButton,
                               QVBoxLayout)

from app.state import AppState
from app.widgets.common import error_color, make_plot, note_label
from app.worker import TaskRunner

_AUTO = "(find it)"


def peek_columns(path: str) -> list[str]:
    """Column names of a .csv/.tsv/.jsonl/.parquet file (first row only); [] for .txt or on error."""
    p = Path(path)
    suffix = p.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            with p.open(encoding="utf-8", newline="") as fh:
                row = next(csv.reader(fh, delimiter="\t" if suffix == ".tsv" else ","), [])
            return [c for c in row if c]
        if suffix in (".jsonl", ".ndjson"):
            with p.open(encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        obj = json.loads(line)
                        return [k for k, v in obj.items()] if isinstance(obj, dict) else []
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(str(p)).names)
    except Exception:  # noqa: BLE001 - the engine reports bad files properly when it reads them
        return []
    return []


def _stats_job(profile, progress, should_stop):
    """(LengthStats of the dataset, LengthStats for display with the tail folded at p99).

    The same steps as ``engine.data.dataset_stats``; the display histogram folds the heavy tail into
    its last bin so the bulk of the distribution is not squeezed into one bar.
    """
    from engine import data

    texts = data.load_texts(profile.dataset, profile.text_column,
                            progress=lambda f, m: progress(0.3 * f, m), should_stop=should_stop)
    tok = data.tokenizer_for(profile)
    ids = data.tokenize(texts, tok, progress=lambda f, m: progress(0.3 + 0.7 * f, m),
                        should_stop=should_stop)
    lengths = [len(x) for x in ids]
    stats = data.length_stats(lengths)
    cap = max(1, int(stats.p99), profile.seq)
    shown = data.length_stats([min(n, cap) for n in lengths], bins=40)
    return stats, shown, tuple(lengths), data.tokenizer_info(profile)


def fit_summary(lengths, seq: int) -> str:
    """What a sequence length of ``seq`` does to these texts: truncated share, padding waste."""
    if not lengths or seq <= 0:
        return ""
    n = len(lengths)
    truncated = sum(1 for x in lengths if x > seq)
    kept = sum(min(x, seq) for x in lengths)
    waste = 1.0 - kept / (n * seq)
    return (f"At seq {seq}: {100.0 * truncated / n:.1f}% of texts are truncated; fixed padding "
            f"wastes {100.0 * waste:.0f}% of the tokens on padding.")


def _stats_key(profile) -> tuple:
    return (profile.dataset, profile.text_column, profile.model, profile.trust_remote_code)


class DatasetPanel(QGroupBox):
    stats_changed = Signal(object)  # LengthStats | None

    def __init__(self, state: AppState, parent=None) -> None:
        super().__init__("Dataset", parent)
        self._state = state
        self._cache: dict[tuple, object] = {}
        self._runner = TaskRunner("dataset-stats", self)
        self._runner.result_ready.connect(self._on_stats_ready)
        self._runner.failed.connect(self._on_stats_failed)

        self.source = QLabel()
        self.source.setWordWrap(True)
        self.builtin_button = QPushButton("Built-in sample")
        self.builtin_button.setToolTip("Thousands of real texts (Python's own docstrings and help "
                                       "topics) with a heavy-tailed length distribution")
        self.open_button = QPushButton("Open file…")
        self.open_button.setToolTip(".txt (a text per line or paragraph), .csv/.tsv, .jsonl, .parquet")
        self.column = QComboBox()
        self.column.setToolTip("Which column holds the text (files with columns only)")
        self.stats = QLabel("…")
        self.stats.setWordWrap(True)
        self.plot = make_plot(left="texts", bottom="tokens per text")
        self.plot.setMinimumHeight(130)
        self.plot.getPlotItem().getAxis("left").setWidth(38)
        self._bars = pg.BarGraphItem(x0=[0], x1=[1], height=[0], brush="#4C72B0", pen=None)
        self._seq_line = pg.InfiniteLine(angle=90, pen=pg.mkPen("#D0342C", width=2, style=pg.QtCore.Qt.PenStyle.DashLine),
                                         label="seq", labelOpts={"position": 0.9, "color": "#D0342C"})
        self.plot.addItem(self._bars)
        self.plot.addItem(self._seq_line)

        buttons = QHBoxLayout()
        buttons.addWidget(self.builtin_button)
        buttons.addWidget(self.open_button)
        col = QHBoxLayout()
        col.addWidget(QLabel("Text column"))
        col.addWidget(self.column, 1)
        layout = QVBoxLayout(self)
        layout.addWidget(self.source)
        layout.addLayout(buttons)
        layout.addLayout(col)
        layout.addWidget(self.plot, 1)
        layout.addWidget(self.stats)
        layout.addWidget(note_label("Red line: the profile's sequence length (longer texts are "
                                    "truncated, shorter ones padded)."))

        self.builtin_button.clicked.connect(self._on_builtin_clicked)
        self.open_button.clicked.connect(self._on_open_clicked)
        self.column.activated.connect(self._on_column_chosen)
        state.profile_changed.connect(self._on_profile_changed)
        self._on_profile_changed(state.profile)

    # ----- public -------------------------------------------------------------------------
    def open_file(self, path: str | Path) -> bool:
        path = Path(path)
        if not path.is_file():
            self._state.show_message("error", f"dataset file not found: {path}")
            return False
        if self._state.update(dataset=str(path), text_column=""):
            self._state.remember_file("dataset", path)
            return True
        return False

    def shutdown(self) -> None:
        self._runner.shutdown()

    # ----- private ------------------------------------------------------------------------
    def _on_builtin_clicked(self) -> None:
        self._state.update(dataset="builtin", text_column="")

    def _on_open_clicked(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open a dataset", "",
                                              "Text data (*.txt *.csv *.tsv *.jsonl *.ndjson *.parquet)")
        if path:
            self.open_file(path)

    def _on_column_chosen(self, index: int) -> None:
        text = self.column.itemText(index)
        self._state.update(text_column="" if text == _AUTO else text)

    def _on_profile_changed(self, profile) -> None:
        self._seq_line.setValue(profile.seq)
        self._seq_line.label.setFormat(f"seq {profile.seq}")
        if profile.dataset == "builtin":
            self.source.setText("<b>Built-in sample</b> (Python docstrings and help topics)")
            columns: list[str] = []
        else:
            self.source.setText(f"<b>{Path(profile.dataset).name}</b><br><small>{profile.dataset}</small>")
            columns = peek_columns(profile.dataset)
        self.column.blockSignals(True)
        self.column.clear()
        self.column.addItem(_AUTO)
        self.column.addItems(columns)
        if profile.text_column and profile.text_column in columns:
            self.column.setCurrentText(profile.text_column)
        self.column.setEnabled(bool(columns))
        self.column.blockSignals(False)
        key = _stats_key(profile)
        if key in self._cache:
            self._show(self._cache[key])
            return
        self.stats.setText("<i>Tokenizing…</i>")
        self._runner.start(lambda progress, should_stop, p=profile:
                           _stats_job(p, progress, should_stop), context=key)

    def _on_stats_ready(self, result) -> None:
        key = self._runner.context
        self._cache[key] = result
        if key == _stats_key(self._state.profile):
            self._show(result)

    def _on_stats_failed(self, message: str) -> None:
        self.stats.setText(f"<span style='color:{error_color()}'>{message}</span>")
        self._bars.setOpts(x0=[0], x1=[1], height=[0])
        self.stats_changed.emit(None)
        if self._runner.context == _stats_key(self._state.profile):
            self._state.show_message("error", f"Dataset: {message}")

    def _show(self, result) -> None:
        stats, shown, lengths, tokenizer = result
        edges = list(shown.histogram_edges)
        counts = list(shown.histogram_counts)
        if counts:
            self._bars.setOpts(x0=edges[:-1], x1=edges[1:], height=counts)
        self.stats.setText(
            f"<b>{stats.count:,}</b> texts · mean <b>{stats.mean:.0f}</b> · median {stats.median:.0f} · "
            f"p90 {stats.p90:.0f} · p99 {stats.p99:.0f} · max {stats.max:,} tokens"
            + (f"<br><small>The last bar holds every text of {edges[-1]:.0f} tokens or more.</small>"
               if edges and stats.max > edges[-1] else "")
            + f"<br>{fit_summary(lengths, self._state.profile.seq)}"
            + f"<br><small>Tokenized with {html.escape(tokenizer['name'])}"
            + (" (the model has none of its own)" if tokenizer["source"] == "fallback" else "")
            + ".</small>")
        self.plot.getPlotItem().setXRange(0, max(edges[-1] if edges else 1,
                                                 self._state.profile.seq * 1.05), padding=0.02)
        self.stats_changed.emit(stats)
