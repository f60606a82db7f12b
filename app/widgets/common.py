"""Shared pieces of the views: category colours and labels, byte units, plot styling."""

from __future__ import annotations

import weakref
from typing import Any

import pyqtgraph as pg
import shiboken6
from PySide6.QtCore import QSize, Qt
from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import QApplication, QFrame, QLabel, QScrollArea, QWidget

from engine.results import MemoryCategory

#: Stacking order of the memory bars (bottom to top) and their colours (colour-blind friendly).
CATEGORIES: tuple[str, ...] = tuple(c.value for c in MemoryCategory)
CATEGORY_LABELS = {
    "weights": "Weights", "gradients": "Gradients", "optimizer": "Optimizer states",
    "activations": "Activations", "temporaries": "Temporaries",
    "allocator_overhead": "Allocator overhead", "cuda_context": "CUDA context",
}
CATEGORY_COLORS = {
    "weights": "#4C72B0", "gradients": "#DD8452", "optimizer": "#55A868", "activations": "#C44E52",
    "temporaries": "#8172B3", "allocator_overhead": "#B8A27A", "cuda_context": "#8C8C8C",
}
STATUS_COLORS = {"fits": "#2E9E44", "tight": "#D99A00", "over": "#D0342C", "": "#888888"}

GiB, MiB, KiB = 1024**3, 1024**2, 1024


def byte_unit(max_bytes: float) -> tuple[str, float]:
    """The binary unit that shows ``max_bytes`` with a readable number: ('GiB', 2**30), ..."""
    for name, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if max_bytes >= size:
            return name, float(size)
    return "B", 1.0


def stacked_parts(result: Any, cpu: bool | None = None) -> dict[str, int]:
    """Bytes per category for a stacked bar: the allocated breakdown plus allocator overhead
    (reserved - allocated) and CUDA context (device used - reserved), never negative.

    CPU runs have neither a caching allocator nor a CUDA context (their "reserved" is process RSS
    growth), so for them (``cpu``, or a result whose ``device`` is "cpu") only live bytes stack.
    """
    parts = {c: 0 for c in CATEGORIES}
    if result is None:
        return parts
    for key, value in dict(getattr(result, "breakdown", {}) or {}).items():
        if key in parts:
            parts[key] = max(0, int(value))
    allocated = int(getattr(result, "peak_allocated_bytes", 0) or 0)
    reserved = int(getattr(result, "peak_reserved_bytes", 0) or 0)
    used = int(getattr(result, "device_used_bytes", 0) or 0)
    known = sum(parts[c.value] for c in MemoryCategory if c.value in (
        "weights", "gradients", "optimizer", "activations", "temporaries"))
    if known == 0 and allocated:  # no breakdown (e.g. an OOM run): one undivided bar
        parts["activations"] = allocated
    if cpu is None:
        cpu = getattr(result, "device", "") == "cpu"
    if cpu:
        return parts
    parts["allocator_overhead"] = max(0, reserved - allocated) if reserved else 0
    parts["cuda_context"] = max(0, used - reserved) if used and reserved else 0
    return parts


def legend_text_color() -> str:
    app = QApplication.instance()
    pal = app.palette() if app is not None else QPalette()
    return pal.color(QPalette.ColorRole.Text).name()


def is_dark() -> bool:
    app = QApplication.instance()
    if app is None:
        return False
    return app.palette().color(QPalette.ColorRole.Window).lightness() < 128


def error_color() -> str:
    """Red text readable on the current window background (lighter on dark palettes)."""
    return "#FF7B72" if is_dark() else "#B3261E"


def style_plot(plot: pg.PlotWidget) -> None:
    """Background and axis colours from the application palette (light or dark)."""
    app = QApplication.instance()
    pal = app.palette() if app is not None else QPalette()
    plot.setBackground(pal.color(QPalette.ColorRole.Base))
    fg = pal.color(QPalette.ColorRole.Text)
    for name in ("left", "bottom"):
        axis = plot.getPlotItem().getAxis(name)
        axis.setPen(pg.mkPen(fg))
        axis.setTextPen(pg.mkPen(fg))
    title = plot.getPlotItem().titleLabel
    if title is not None and title.text:
        title.setText(title.text, color=fg.name())
    legend = plot.getPlotItem().legend
    if legend is not None:
        legend.setLabelTextColor(fg)
        for _sample, label in legend.items:  # existing labels keep their colour otherwise
            label.setText(label.text, color=fg.name())
    for item in plot.getPlotItem().items:
        if isinstance(item, pg.TextItem) and getattr(item, "follows_palette", False):
            item.setColor(fg)


def text_item(text: str = "", anchor=(0.5, 1.0), color: str | None = None) -> pg.TextItem:
    """A plot text; without ``color`` it follows the palette's text colour (light and dark)."""
    item = pg.TextItem(text, anchor=anchor, color=color or legend_text_color())
    item.follows_palette = color is None
    return item


def center_lines(item: pg.TextItem, lines: list[str]) -> None:
    """Show ``lines`` centred under each other (a plain TextItem left-aligns its lines)."""
    import html

    item.setHtml("<div align='center'>" + "<br>".join(html.escape(x) for x in lines) + "</div>")
    text = item.textItem
    text.setTextWidth(-1)
    text.setTextWidth(text.boundingRect().width())  # alignment needs a width to centre within
    item.updateTextPos()


def make_plot(title: str = "", left: str = "", bottom: str = "") -> pg.PlotWidget:
    plot = pg.PlotWidget()
    item = plot.getPlotItem()
    item.setMenuEnabled(False)
    item.hideButtons()
    plot.setMouseEnabled(x=False, y=False)
    if title:
        item.setTitle(title, size="11pt")
    if left:
        item.setLabel("left", left)
    if bottom:
        item.setLabel("bottom", bottom)
    item.showGrid(x=False, y=True, alpha=0.25)
    style_plot(plot)
    follow_theme(plot)
    return plot


class NoteLabel(QLabel):
    """A small, wrapped, muted explanation label that stays readable when the palette changes."""

    def __init__(self, text: str = "", parent=None) -> None:
        super().__init__(text, parent)
        self.setWordWrap(True)
        self.setObjectName("note")
        font = self.font()
        font.setPointSizeF(max(7.5, font.pointSizeF() * 0.9))
        self.setFont(font)
        self.on_theme_changed()
        follow_theme(self)

    def on_theme_changed(self) -> None:
        app = QApplication.instance()
        pal = QPalette(app.palette() if app is not None else self.palette())
        color = pal.color(QPalette.ColorRole.WindowText)
        color.setAlphaF(0.72)
        pal.setColor(QPalette.ColorRole.WindowText, color)
        self.setPalette(pal)


def note_label(text: str = "") -> QLabel:
    """A small, wrapped, muted explanation label."""
    return NoteLabel(text)


# Widgets that restyle themselves when the palette changes. An explicit list, not a walk over
# QApplication.allWidgets(): that walk wraps every C++ widget, including ones being torn down, and a
# CI run died with a segmentation fault inside it.
_themed: list[weakref.ref] = []


def follow_theme(widget: QWidget) -> None:
    """Restyle ``widget`` on every palette change (``style_plot`` for a plot, then ``on_theme_changed``)."""
    _themed.append(weakref.ref(widget))


def _alive(widget) -> bool:
    return widget is not None and shiboken6.isValid(widget)


def restyle_all() -> None:
    """After a palette change: every widget registered with ``follow_theme`` that is still alive."""
    _themed[:] = [ref for ref in _themed if _alive(ref())]
    for ref in list(_themed):
        widget = ref()
        if not _alive(widget):  # destroyed by an earlier widget's restyle
            continue
        if isinstance(widget, pg.PlotWidget):
            style_plot(widget)
        hook = getattr(widget, "on_theme_changed", None)
        if callable(hook):
            hook()


def color(name: str) -> QColor:
    return QColor(name)


class HorizontalScrollArea(QScrollArea):
    """Scrolls its widget sideways when the area is narrower than the widget's minimum width.

    Vertically nothing changes: the widget always gets the area's height, as in a plain splitter
    (``QScrollArea.setWidgetResizable`` would give word-wrapped layouts their taller preferred
    height). So wherever the widget fits, it looks exactly as it would without the scroll area.
    """

    def __init__(self, widget: QWidget, parent=None) -> None:
        super().__init__(parent)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setWidgetResizable(False)
        self.setWidget(widget)
        # draw nothing of its own: the tab page's background shows through, as without the area
        self.viewport().setAutoFillBackground(False)
        widget.setAutoFillBackground(False)

    def minimumSizeHint(self) -> QSize:  # noqa: N802 - Qt override
        # narrow as needed, but as tall as the widget needs (a splitter keeps giving it that)
        inner = self.widget()
        return QSize(120, inner.minimumSizeHint().height() if inner is not None else 120)

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt override
        return self.widget().sizeHint() if self.widget() is not None else super().sizeHint()

    def resizeEvent(self, event) -> None:  # noqa: N802 - Qt override
        super().resizeEvent(event)
        self._fit()

    def _fit(self) -> None:
        inner = self.widget()
        if inner is None:
            return
        need = inner.minimumSizeHint().width()
        bar = self.horizontalScrollBar().sizeHint().height() if self.width() < need else 0
        inner.resize(max(self.width(), need), max(0, self.height() - bar))
