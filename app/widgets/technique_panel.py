"""Technique panel: the run's settings, then every registered technique (``engine.techniques``) as a
group of controls built from its declared ``Control``s, with the engine's own explanation (tooltip
and a side note). Edits go to the AppState at once; the estimate is debounced downstream. Nothing
here names a technique: a new technique module brings its controls with it."""

from __future__ import annotations

import html
import re
from typing import Any, Callable

from PySide6.QtCore import Qt
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QGroupBox,
                               QScrollArea, QSpinBox, QVBoxLayout, QWidget)

from app.state import AppState
from app.widgets.common import NoteLabel
from engine.profile import TASKS
from engine.techniques.base import Control, Technique, defaults_changes, registry

_TASK_LABELS = {"auto": "auto (from the model)", "causal-lm": "causal LM", "masked-lm": "masked LM",
                "classification": "sequence classification"}


def first_sentence(text: str) -> str:
    """The explanation's first sentence (what the side note shows until "more" is clicked)."""
    m = re.match(r"(.+?[.!?])(?:\s+(?=[A-Z'\"(])|$)", text.strip(), re.S)
    return m.group(1) if m else text.strip()


class ExplainNote(NoteLabel):
    """A technique's explanation: the first sentence, and the whole text one click ("more") away.

    The whole text is also the group's tooltip.
    """

    def __init__(self, text: str = "", parent=None) -> None:
        self._full = None
        super().__init__("", parent)
        self._full = ""
        self.expanded = False
        self.setTextFormat(Qt.TextFormat.RichText)
        self.setTextInteractionFlags(Qt.TextInteractionFlag.LinksAccessibleByMouse
                                     | Qt.TextInteractionFlag.LinksAccessibleByKeyboard)
        self.linkActivated.connect(self._on_link)
        self.set_explanation(text)

    @property
    def full_text(self) -> str:
        return self._full

    def set_explanation(self, text: str) -> None:
        self._full = text
        self._render()

    def on_theme_changed(self) -> None:
        super().on_theme_changed()
        if getattr(self, "_full", None) is not None:
            self._render()  # rich text keeps the old link colour until it is set again

    def set_expanded(self, on: bool) -> None:
        self.expanded = on
        self._render()

    def _on_link(self, link: str) -> None:
        self.set_expanded(link == "more")

    def _render(self) -> None:
        # an explicit colour: QLabel's rich text draws links in plain #0000FF otherwise (unreadable on dark)
        link_color = self.palette().color(QPalette.ColorRole.Link).name()
        paragraphs = [p.strip() for p in self._full.split("\n\n") if p.strip()]
        shorts = [first_sentence(p) for p in paragraphs]
        whole = shorts == paragraphs
        if self.expanded or whole:
            body = "<br><br>".join(html.escape(p) for p in paragraphs)
            link = "" if whole else f" <a href='less' style='color:{link_color}'>less</a>"
        else:
            body = "<br>".join(html.escape(p) for p in shorts)
            link = f" <a href='more' style='color:{link_color}'>more…</a>"
        self.setText(body + link)


def _spin(low: int, high: int, step: int = 1, special: str = "") -> QSpinBox:
    box = QSpinBox()
    box.setRange(low, high)
    box.setSingleStep(step)
    box.setKeyboardTracking(False)  # commit on Enter / focus out, not on every keystroke
    box.setAccelerated(True)
    if special:
        box.setSpecialValueText(special)
    return box


def _combo(items: dict[str, str]) -> QComboBox:
    box = QComboBox()
    # long labels must not widen the panel past its column (the popup still shows them whole)
    box.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    box.setMinimumContentsLength(14)
    for value, label in items.items():
        box.addItem(label, value)
    return box


def _optimizer_labels() -> dict[str, str]:
    """Every optimizer; one that cannot run here says so (it can still be estimated)."""
    from engine.optimizers import LABELS, OPTIMIZERS, unavailable

    return {n: LABELS[n] + (" (estimate only here)" if unavailable(n, quick=True) else "")
            for n in OPTIMIZERS}


def _optimizer_tooltip() -> str:
    from engine.optimizers import OPTIMIZERS, unavailable

    why = [unavailable(n, quick=True) for n in OPTIMIZERS]
    lines = ["The optimizer and its state: AdamW keeps two states per trained parameter, 8-bit AdamW "
             "a quarter of that, SGD with momentum and Lion one, Adafactor factored second moments."]
    return "\n".join(lines + sorted({w for w in why if w}))


class TechniquePanel(QScrollArea):
    """All run settings and techniques, grouped; one explanation per technique group."""

    def __init__(self, state: AppState, parent=None) -> None:
        super().__init__(parent)
        self._state = state
        self._updating = False
        self.groups: dict[str, QGroupBox] = {}
        #: panel group -> its techniques, in registry order
        self._techniques: dict[str, list[Technique]] = {}
        #: control name -> (its technique, its declaration, its widget)
        self._controls: dict[str, tuple[Technique, Control, QWidget]] = {}
        inner = QWidget()
        self._layout = QVBoxLayout(inner)
        self._layout.setContentsMargins(4, 4, 4, 4)
        self.setWidget(inner)
        self.setWidgetResizable(True)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setMinimumWidth(300)

        # --- the run itself -----------------------------------------------------------------
        self.mode = _combo({"train": "Training step", "infer": "Inference (forward only)",
                            "generate": "Generation (prefill + decode, KV cache)"})
        self.task = _combo({t: _TASK_LABELS.get(t, t) for t in TASKS})
        self.task.setToolTip("The model head: auto picks causal-lm for decoders, masked-lm for encoders")
        self.batch = _spin(1, 65536)
        self.seq = _spin(1, 1 << 20, 64)
        self.optimizer = _combo(_optimizer_labels())
        self.optimizer.setToolTip(_optimizer_tooltip())
        self.steps = _spin(1, 1000)
        self.steps.setToolTip("Steps of a measured run; the first is warm-up and excluded from timings")
        self.seed = _spin(0, 2**31 - 1)
        self.seed.setToolTip("Seed for data order, initialisation and sampling")
        self._add_group("run", "Run", [("Mode", self.mode), ("Head", self.task), ("Batch size", self.batch),
                                        ("Sequence length", self.seq), ("Optimizer", self.optimizer),
                                        ("Measured steps", self.steps), ("Seed", self.seed)])
        # --- techniques, from the registry ----------------------------------------------------
        for technique in registry():
            self._techniques.setdefault(technique.group_key, []).append(technique)
        for key, members in self._techniques.items():
            rows = []
            for technique in members:
                for control in technique.controls:
                    widget = _widget_for(control)
                    setattr(self, control.name, widget)  # stable names: tests and styles use them
                    self._controls[control.name] = (technique, control, widget)
                    rows.append((control.label, widget))
            note = ExplainNote(self._group_text(key, state.profile))
            note.setObjectName(f"explain_{key}")
            self._add_group(key, members[0].title, rows, note)
        self._layout.addStretch(1)

        self._connect()
        state.profile_changed.connect(self._on_profile_changed)
        self._on_profile_changed(state.profile)

    # ----- building -------------------------------------------------------------------------
    def notes(self) -> dict[str, ExplainNote]:
        """Technique group -> its side note."""
        return {key: box.findChild(ExplainNote, f"explain_{key}") for key, box in self.groups.items()
                if box.findChild(ExplainNote, f"explain_{key}") is not None}

    def _group_text(self, key: str, profile) -> str:
        """The group's explanation for this profile: each member's fitting paragraph."""
        texts = [t.explanations.get(t.explanation_key(profile), "") for t in self._techniques[key]]
        return "\n\n".join(x for x in texts if x)

    def _add_group(self, key: str, title: str, rows: list[tuple[str, QWidget]],
                   note: "ExplainNote | None" = None) -> None:
        box = QGroupBox(title)
        form = QFormLayout(box)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        for label, widget in rows:
            if label:
                form.addRow(label, widget)
            else:
                form.addRow(widget)
        if note is not None:
            box.setToolTip(f"<p>{html.escape(note.full_text)}</p>")
            form.addRow(note)
        self.groups[key] = box
        self._layout.addWidget(box)

    def _connect(self) -> None:
        def edit(signal, fn: Callable[[], dict[str, Any]]) -> None:
            signal.connect(lambda *_: self._on_edited(fn()))

        edit(self.mode.currentIndexChanged, lambda: {"mode": self.mode.currentData(), **self._mode_fixes()})
        edit(self.task.currentIndexChanged, lambda: {"task": self.task.currentData()})
        edit(self.seed.valueChanged, lambda: {"seed": self.seed.value()})
        edit(self.batch.valueChanged, lambda: {"batch": self.batch.value()})
        edit(self.seq.valueChanged, lambda: {"seq": self.seq.value()})
        edit(self.optimizer.currentIndexChanged, lambda: {"optimizer": self.optimizer.currentData()})
        edit(self.steps.valueChanged, lambda: {"steps": self.steps.value()})
        for name, (technique, control, widget) in self._controls.items():
            for signal in _edit_signals(control, widget):
                signal.connect(lambda *_, t=technique, c=control: self._on_edited(c.changes(self._values(t))))

    def _values(self, technique: Technique) -> dict[str, Any]:
        """The current values of a technique's controls, by control name."""
        return {c.name: _widget_value(c, self._controls[c.name][2]) for c in technique.controls}

    # ----- values ---------------------------------------------------------------------------
    def _mode_fixes(self) -> dict[str, Any]:
        """Switching mode turns off what the other mode cannot do, instead of refusing the switch."""
        return defaults_changes(self._state.profile, self.mode.currentData())

    def _on_edited(self, changes: dict[str, Any]) -> None:
        if self._updating:
            return
        if not self._state.update(**changes):
            self._on_profile_changed(self._state.profile)  # put the widgets back to what holds

    def _on_profile_changed(self, p) -> None:
        self._updating = True
        try:
            _set_widget_value(self.mode, "combo", p.mode)
            _set_widget_value(self.task, "combo", p.task)
            self.seed.setValue(p.seed)
            self.batch.setValue(p.batch)
            self.seq.setValue(p.seq)
            _set_widget_value(self.optimizer, "combo", p.optimizer)
            self.steps.setValue(p.steps)
            for technique, control, widget in self._controls.values():
                value = control.value_for(p)
                if value is not None:
                    _set_widget_value(widget, control.kind, value)
                widget.setEnabled(bool(control.enabled_when(p)))
            for key, members in self._techniques.items():
                self.groups[key].setVisible(_group_shown(members, p.mode))
            for key, box in self.groups.items():
                note = box.findChild(ExplainNote, f"explain_{key}")
                text = self._group_text(key, p) if note is not None else ""
                if note is not None and text and text != note.full_text:
                    note.set_explanation(text)
                    box.setToolTip(f"<p>{html.escape(text)}</p>")
        finally:
            self._updating = False


def _group_shown(members: list[Technique], mode: str) -> bool:
    """Generation's group only in generate mode; in generate mode, no group whose every field
    belongs to other modes (distillation). Training and inference keep every other group."""
    fields = [f for t in members for f in t.fields]
    if not fields or not all(f.modes is not None and mode not in f.modes for f in fields):
        return True
    return not (mode == "generate" or any("generate" in f.modes for f in fields))


# ----- controls -> widgets --------------------------------------------------------------------
def _choices(control: Control) -> dict[Any, str]:
    choices = control.choices() if callable(control.choices) else control.choices
    return dict(choices or {})


def _widget_for(control: Control) -> QWidget:
    kind = control.kind
    if kind == "check":
        widget: QWidget = QCheckBox(control.text)
    elif kind == "combo":
        widget = _combo(_choices(control))
    elif kind == "spin":
        widget = _spin(int(control.low), int(control.high), int(control.step), control.special)
        if control.suffix:
            widget.setSuffix(control.suffix)
    elif kind == "float":
        widget = QDoubleSpinBox()
        widget.setRange(control.low, control.high)
        widget.setSingleStep(control.step)
        widget.setDecimals(control.decimals)
        widget.setKeyboardTracking(False)
        if control.suffix:
            widget.setSuffix(control.suffix)
    elif kind == "text":  # a name or a path: an editable list
        widget = QComboBox()
        widget.setEditable(True)
        widget.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        widget.setMinimumContentsLength(14)
        widget.addItems([str(v) for v in _choices(control)])
        if control.placeholder:
            widget.lineEdit().setPlaceholderText(control.placeholder)
    else:
        raise ValueError(f"control {control.name}: unknown kind {kind!r}")
    if control.initial is not None:
        _set_widget_value(widget, kind, control.initial)
    if control.tooltip:
        widget.setToolTip(control.tooltip)
    return widget


def _edit_signals(control: Control, widget: QWidget) -> list:
    kind = control.kind
    if kind == "check":
        return [widget.toggled]
    if kind == "combo":
        return [widget.currentIndexChanged]
    if kind == "text":  # committed on choosing or on Enter / focus out, not per keystroke
        return [widget.activated, widget.lineEdit().editingFinished]
    return [widget.valueChanged]


def _widget_value(control: Control, widget: QWidget) -> Any:
    kind = control.kind
    if kind == "check":
        return widget.isChecked()
    if kind == "combo":
        return widget.currentData()
    if kind == "text":
        return widget.currentText()
    return widget.value()


def _set_widget_value(widget: QWidget, kind: str, value: Any) -> None:
    if kind == "check":
        widget.setChecked(bool(value))
    elif kind == "combo":
        i = widget.findData(value)
        if i >= 0:
            widget.setCurrentIndex(i)
    elif kind == "text":
        widget.setCurrentText(str(value))
    else:
        widget.setValue(value)
