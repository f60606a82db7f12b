"""Shared pieces of the views: category colours and labels, byte units, plot styling."""

from __future__ import annotations

import weakref
from typing import Any

import pyqtgraph as pg
import shiboken6
from PySide6.QtCore import QEvent, QObject, QPointF, QSize, Qt
from PySide6.QtGui import QColor, QPalette, QValidator, QWheelEvent
from PySide6.QtWidgets import (QAbstractScrollArea, QAbstractSpinBox, QApplication, QComboBox, QDoubleSpinBox, QFrame, QLabel,
                               QScrollArea, QWidget)

from engine.results import MemoryCategory

#: Stacking order of the memory bars (bottom to top) and their colours (colour-blind friendly).
CATEGORIES: tuple[str, ...] = tuple(c.value for c in MemoryCategory)
CATEGORY_LABELS = {
    "weights": "Weights", "gradients": "Gradients", "optimizer": "Optimizer states",
    "activations": "Activations", "temporaries": "Temporaries", "kv_cache": "KV cache",
    "allocator_overhead": "Allocator overhead", "cuda_context": "CUDA context",
}
CATEGORY_COLORS = {
    "weights": "#4C72B0", "gradients": "#DD8452", "optimizer": "#55A868", "activations": "#C44E52",
    "temporaries": "#8172B3", "kv_cache": "#64B5CD", "allocator_overhead": "#B8A27A", "cuda_context": "#8C8C8C",
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
        "weights", "gradients", "optimizer", "activations", "temporaries", "kv_cache"))
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
    """Scrolls its widget sideways when the area is narrower than the widget's minimum width, and
    downwards when it is shorter than the widget needs at that width (wrapped notes included).

    Otherwise the widget gets exactly the area's size, as in a plain splitter
    (``QScrollArea.setWidgetResizable`` would give word-wrapped layouts their taller preferred
    height). So wherever the widget fits, it looks exactly as it would without the scroll area;
    where it does not, nothing overlaps: it scrolls.
    """

    def __init__(self, widget: QWidget, parent=None) -> None:
        super().__init__(parent)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
        self.setWidgetResizable(False)
        self.setWidget(widget)
        # draw nothing of its own: the tab page's background shows through, as without the area
        self.viewport().setAutoFillBackground(False)
        widget.setAutoFillBackground(False)
        widget.installEventFilter(self)  # its content changed (a longer note): fit again

    def minimumSizeHint(self) -> QSize:  # noqa: N802 - Qt override
        # narrow as needed, but as tall as the widget's own minimum (a splitter keeps giving it
        # that); only wrapped text beyond it scrolls
        inner = self.widget()
        return QSize(120, inner.minimumSizeHint().height() if inner is not None else 120)

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt override
        return self.widget().sizeHint() if self.widget() is not None else super().sizeHint()

    def resizeEvent(self, event) -> None:  # noqa: N802 - Qt override
        super().resizeEvent(event)
        self._fit()

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 - Qt override
        if obj is self.widget() and event.type() == QEvent.Type.LayoutRequest:
            self._fit()
        return False

    def _fit(self) -> None:
        inner = self.widget()
        if inner is None:
            return
        bar_w = self.verticalScrollBar().sizeHint().width()
        bar_h = self.horizontalScrollBar().sizeHint().height()
        need_w = inner.minimumSizeHint().width()
        width, height = self.width(), self.height()
        wide = width < need_w
        if wide:
            height -= bar_h
        need_h = minimum_height_for_width(inner, max(width, need_w))
        if height < need_h:  # a vertical bar takes width: measure again without it
            width -= bar_w
            if not wide and width < need_w:
                height -= bar_h
            need_h = minimum_height_for_width(inner, max(width, need_w))
        new = QSize(max(width, need_w), max(height, need_h))
        if inner.size() != new:
            inner.resize(new)


def minimum_height_for_width(widget: QWidget, width: int) -> int:
    """The height ``widget``'s layout needs at ``width`` (wrapped labels at their line count);
    splitters and fixed-size parents ask only ``minimumSizeHint``, which a wrapped label keeps at
    one line."""
    layout = widget.layout()
    if layout is None:
        return widget.minimumSizeHint().height()
    if layout.hasHeightForWidth():
        return max(layout.totalMinimumSize().height(), layout.totalMinimumHeightForWidth(width))
    return layout.totalMinimumSize().height()


class KeepsWrappedHeight(QObject):
    """Keeps a panel's minimum height at what its layout needs for its current width, so that a
    splitter gives a panel with wrapped text (model facts, GPU notes) its lines instead of letting
    the rows overlap. Install with ``keep_wrapped_height(widget)``."""

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 - Qt override
        if event.type() in (QEvent.Type.Resize, QEvent.Type.LayoutRequest):
            need = minimum_height_for_width(obj, obj.width())
            if need != obj.minimumHeight():
                obj.setMinimumHeight(need)
        return False


def keep_wrapped_height(widget: QWidget) -> None:
    keeper = KeepsWrappedHeight(widget)
    widget.installEventFilter(keeper)
    widget.setMinimumHeight(minimum_height_for_width(widget, widget.width()))


class WheelGuard(QObject):
    """App-wide event filter: the mouse wheel over a combo box or spin box that does not have
    focus scrolls the panel around it instead of silently changing the setting.

    It sees every widget (an application event filter), so controls made later by any panel are
    covered: each combo and spin box gets ``Qt.StrongFocus`` when it is polished (the default
    ``WheelFocus`` would let the wheel itself take focus), and an unfocused one passes the wheel on
    (ignored events propagate to the parent, up to the scroll area).
    """

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 - Qt override
        kind = event.type()
        if kind == QEvent.Type.Polish and isinstance(obj, (QComboBox, QAbstractSpinBox)):
            obj.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
            if isinstance(obj, QComboBox) and not getattr(obj, "_headroom_fits_text", False):
                obj._headroom_fits_text = True
                obj.currentTextChanged.connect(lambda _t, box=obj: fit_current_text(box))
                fit_current_text(obj)
        elif kind == QEvent.Type.Wheel and isinstance(obj, (QComboBox, QAbstractSpinBox)) \
                and not obj.hasFocus():
            area = _scroll_area_around(obj)
            if area is None:
                event.ignore()  # nothing to scroll: the setting stays as it is
                return True
            # to the scroll area's viewport directly: Qt hands ignored wheel events to the parents
            # only when they come from the window system, not when sent by code
            pos = area.viewport().mapFromGlobal(event.globalPosition().toPoint())
            forwarded = QWheelEvent(QPointF(pos), event.globalPosition(), event.pixelDelta(),
                                    event.angleDelta(), event.buttons(), event.modifiers(), event.phase(),
                                    event.inverted())
            QApplication.sendEvent(area.viewport(), forwarded)
            event.accept()
            return True
        return False


def _scroll_area_around(widget: QWidget) -> "QAbstractScrollArea | None":
    parent = widget.parentWidget()
    while parent is not None:
        if isinstance(parent, QAbstractScrollArea) and not isinstance(parent, QComboBox):
            return parent
        parent = parent.parentWidget()
    return None


def fit_current_text(box: QComboBox) -> None:
    """At least as wide as the chosen item's text, so it is never cut (a combo sized for a
    minimum number of characters would elide "Fixed: pad every text to seq"); the popup already
    shows every item whole."""
    if not shiboken6.isValid(box) or box.isEditable():
        return
    from PySide6.QtWidgets import QStyle, QStyleOptionComboBox

    opt = QStyleOptionComboBox()
    box.initStyleOption(opt)
    fm = box.fontMetrics()
    text = QSize(fm.horizontalAdvance(box.currentText()) + 4, fm.height())
    if not box.itemIcon(box.currentIndex()).isNull():
        text.setWidth(text.width() + box.iconSize().width() + 4)
    need = box.style().sizeFromContents(QStyle.ContentsType.CT_ComboBox, opt, text, box).width()
    box.setMinimumWidth(need)


def install_wheel_guard(app: QApplication | None = None) -> WheelGuard:
    """Install the one ``WheelGuard`` on the application (again: the same one)."""
    app = app or QApplication.instance()
    guard = getattr(app, "_headroom_wheel_guard", None)
    if guard is None:
        guard = WheelGuard(app)
        app.installEventFilter(guard)
        app._headroom_wheel_guard = guard
        for widget in app.allWidgets():  # widgets polished before the guard was there
            if isinstance(widget, (QComboBox, QAbstractSpinBox)) and widget.testAttribute(
                    Qt.WidgetAttribute.WA_WState_Polished):
                guard.eventFilter(widget, QEvent(QEvent.Type.Polish))
    return guard


class ByteSizeSpinBox(QDoubleSpinBox):
    """A memory size that reads and shows binary units: type "2 GiB", "512 MiB" or "1.5g"; a bare
    number is in MiB. ``value()`` is MiB; the minimum shows ``specialValueText`` (e.g. "off")."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setDecimals(0)
        self.setRange(0.0, 1024.0 * 1024)
        self.setSingleStep(64)

    def _parse(self, text: str) -> float | None:
        from engine.errors import BadInput
        from engine.profile import parse_bytes

        text = text.strip()
        special = self.specialValueText()
        if special and text == special:
            return self.minimum()
        if not text:
            return None
        try:
            float(text)
            return float(text)  # bare number: MiB, the box's unit
        except ValueError:
            pass
        try:
            return parse_bytes(text) / MiB
        except (BadInput, ValueError, OverflowError):
            return None

    def validate(self, text: str, pos: int):  # noqa: D102 - Qt override
        value = self._parse(text)
        if value is not None and self.minimum() <= value <= self.maximum():
            return QValidator.State.Acceptable, text, pos
        return QValidator.State.Intermediate, text, pos  # still typing ("2 G")

    def valueFromText(self, text: str) -> float:  # noqa: N802 - Qt override
        value = self._parse(text)
        return self.value() if value is None else value

    def textFromValue(self, value: float) -> str:  # noqa: N802 - Qt override
        from engine.units import format_bytes

        if value >= 1024 and value % 1024 == 0:
            return f"{value / 1024:.0f} GiB"
        return f"{value:.0f} MiB" if value < 1024 else format_bytes(value * MiB)
