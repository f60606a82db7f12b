"""Technique panel: every technique of DESIGN.md as a group of switches and parameters, each with
the engine's own explanation (tooltip and a side note). Edits go to the AppState at once; the
estimate is debounced downstream."""

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
from engine import models
from engine.profile import MAX_SPLIT_FLOOR_MIB, PADDINGS, PRECISIONS, TASKS, TEACHER_PRECISIONS
from engine.techniques.explanations import explanations

_PRECISION_LABELS = {"fp32": "fp32 (off)", "fp16-amp": "fp16 autocast + GradScaler",
                     "bf16-amp": "bf16 autocast", "fp16": "pure fp16 weights", "bf16": "pure bf16 weights"}
_TASK_LABELS = {"auto": "auto (from the model)", "causal-lm": "causal LM", "masked-lm": "masked LM",
                "classification": "sequence classification"}
_TEACHER_PRECISION_LABELS = {"auto": "auto (student's half dtype on GPU)", "fp32": "fp32",
                             "bf16": "bf16", "fp16": "fp16"}
#: Panel group -> the engine's explanation keys (several: one paragraph each).
_EXPLANATION_KEYS = {"amp": ("amp",), "checkpointing": ("checkpointing",), "pruning": ("pruning",),
                     "chunking": ("micro_batching", "chunked_input", "ffn_chunking"),
                     "attention": ("local_attention",), "geglu": ("geglu",),
                     "distillation": ("distillation",), "allocator": ("memory_pool",)}
#: Padding strategy (Profile.padding) -> the engine's explanation key; the padding note follows it.
_PADDING_KEYS = {"fixed": "fixed_padding", "dynamic": "dynamic_padding", "bucketed": "bucketing",
                 "token-budget": "token_budget"}


def _group_explanations() -> dict[str, str]:
    """Panel group -> the engine's own text (the engine's keys are in the result too)."""
    texts = explanations()
    found = dict(texts)
    for group, keys in _EXPLANATION_KEYS.items():
        found[group] = "\n\n".join(texts[key] for key in keys)
    found["padding"] = texts[_PADDING_KEYS["fixed"]]  # until the profile's padding is shown
    return found


_PADDING_LABELS = {"fixed": "Fixed: pad every text to seq", "dynamic": "Dynamic: pad to the batch's longest",
                   "bucketed": "Length bucketing", "token-budget": "Token budget per batch"}


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


class TechniquePanel(QScrollArea):
    """All run settings and techniques, grouped; one explanation per technique."""

    def __init__(self, state: AppState, parent=None) -> None:
        super().__init__(parent)
        self._state = state
        self._updating = False
        self._explanations = _group_explanations()
        self.groups: dict[str, QGroupBox] = {}
        inner = QWidget()
        self._layout = QVBoxLayout(inner)
        self._layout.setContentsMargins(4, 4, 4, 4)
        self.setWidget(inner)
        self.setWidgetResizable(True)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setMinimumWidth(300)

        # --- the run itself -----------------------------------------------------------------
        self.mode = _combo({"train": "Training step", "infer": "Inference (forward only)"})
        self.task = _combo({t: _TASK_LABELS.get(t, t) for t in TASKS})
        self.task.setToolTip("The model head: auto picks causal-lm for decoders, masked-lm for encoders")
        self.batch = _spin(1, 65536)
        self.seq = _spin(1, 1 << 20, 64)
        self.optimizer = _combo({"adamw": "AdamW", "sgd": "SGD"})
        self.steps = _spin(1, 1000)
        self.steps.setToolTip("Steps of a measured run; the first is warm-up and excluded from timings")
        self.seed = _spin(0, 2**31 - 1)
        self.seed.setToolTip("Seed for data order, initialisation and sampling")
        self._group("run", "Run", None, [("Mode", self.mode), ("Head", self.task), ("Batch size", self.batch),
                                          ("Sequence length", self.seq), ("Optimizer", self.optimizer),
                                          ("Measured steps", self.steps), ("Seed", self.seed)])
        # --- techniques ---------------------------------------------------------------------
        self.padding = _combo({k: _PADDING_LABELS[k] for k in PADDINGS})
        self.pad_multiple = _spin(1, 1024, 8, "off")
        self.pad_multiple.setMinimum(1)
        self.max_tokens = _spin(0, 1 << 24, 512, "batch × seq")
        self._group("padding", "Padding and batching", "padding",
                    [("Strategy", self.padding), ("Pad to multiple of", self.pad_multiple),
                     ("Tokens per batch", self.max_tokens)])
        self.precision = _combo({k: _PRECISION_LABELS[k] for k in PRECISIONS})
        self._group("amp", "Mixed precision (AMP)", "amp", [("Precision", self.precision)])
        self.checkpointing = QCheckBox("Recompute activations in backward")
        self.checkpoint_every = _spin(1, 128)
        self._group("checkpointing", "Gradient checkpointing", "checkpointing",
                    [("", self.checkpointing), ("Every k-th layer", self.checkpoint_every)])
        self.prune_kind = _combo({"": "off", "unstructured": "Unstructured L1 (masks only)",
                                  "heads": "Structured: attention heads", "ffn": "Structured: FFN neurons"})
        self.prune_fraction = QDoubleSpinBox()
        self.prune_fraction.setRange(0.0, 0.95)
        self.prune_fraction.setSingleStep(0.05)
        self.prune_fraction.setDecimals(2)
        self.prune_fraction.setKeyboardTracking(False)
        self._group("pruning", "Pruning", "pruning",
                    [("Kind", self.prune_kind), ("Fraction removed", self.prune_fraction)])
        self.micro_batches = _spin(1, 4096, 1)
        self.chunk_input = _spin(0, 1 << 20, 128, "off")
        self.ffn_chunks = _spin(1, 1024, 1)
        self._group("chunking", "Chunking", "chunking",
                    [("Micro-batches (training)", self.micro_batches),
                     ("Input windows (inference)", self.chunk_input),
                     ("Feed-forward chunks", self.ffn_chunks)])
        self.attn = _combo({"sdpa": "Dense SDPA", "eager": "Dense eager", "local": "Sliding window (local)"})
        self.window = _spin(1, 1 << 20, 64)
        self.window.setValue(256)
        self._group("attention", "Sparse / local attention", "attention",
                    [("Attention", self.attn), ("Window W", self.window)])
        self.geglu = QCheckBox("Gated GeGLU MLP (matched parameters)")
        self._group("geglu", "GeGLU", "geglu", [("", self.geglu)])
        self.teacher = QComboBox()
        self.teacher.setEditable(True)
        self.teacher.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.teacher.setMinimumContentsLength(14)
        self.teacher.addItem("")
        self.teacher.addItems(models.list_presets())
        self.teacher.lineEdit().setPlaceholderText("off (no teacher)")
        self.teacher_precision = _combo({k: _TEACHER_PRECISION_LABELS[k] for k in TEACHER_PRECISIONS})
        self.teacher_precision.setToolTip(
            "The frozen teacher's weight dtype. auto: bf16/fp16 on a GPU when the student computes in "
            "that precision, else the student's weight dtype. bf16/fp16 halve the teacher's weights "
            "and (outside autocast) its forward's activations and logits. Needs a teacher.")
        self._group("distillation", "Knowledge distillation", "distillation",
                    [("Teacher", self.teacher), ("Teacher precision", self.teacher_precision)])
        self.alloc = _combo({"default": "Default caching allocator", "expandable": "Expandable segments",
                             "pool": "Pre-reserved pool"})
        self.pool_gib = QDoubleSpinBox()
        self.pool_gib.setRange(0.25, 1024)
        self.pool_gib.setSuffix(" GiB")
        self.pool_gib.setKeyboardTracking(False)
        self.pool_gib.setValue(4.0)
        self.max_split = _spin(MAX_SPLIT_FLOOR_MIB, 1 << 20, 64, "off")
        self.max_split.setSuffix(" MiB")
        self.max_split.setToolTip(
            "PYTORCH_CUDA_ALLOC_CONF max_split_size_mb: cached blocks this large or larger are never "
            f"split, nor given to smaller tensors (off: no limit; PyTorch needs more than "
            f"{MAX_SPLIT_FLOOR_MIB} MiB). Less fragmentation of big blocks, possibly more reserved memory.")
        self._group("allocator", "Memory pooling (allocator)", "allocator",
                    [("Allocator", self.alloc), ("Pool size", self.pool_gib),
                     ("Max split size", self.max_split)])
        self._layout.addStretch(1)

        self._connect()
        state.profile_changed.connect(self._on_profile_changed)
        self._on_profile_changed(state.profile)

    # ----- building -------------------------------------------------------------------------
    def notes(self) -> dict[str, ExplainNote]:
        """Technique group -> its side note."""
        return {key: box.findChild(ExplainNote, f"explain_{key}") for key, box in self.groups.items()
                if box.findChild(ExplainNote, f"explain_{key}") is not None}

    def _group(self, key: str, title: str, explain: str | None, rows: list[tuple[str, QWidget]]) -> None:
        box = QGroupBox(title)
        form = QFormLayout(box)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        for label, widget in rows:
            if label:
                form.addRow(label, widget)
            else:
                form.addRow(widget)
        if explain:
            text = self._explanations.get(explain, "")
            box.setToolTip(f"<p>{html.escape(text)}</p>")
            note = ExplainNote(text)
            note.setObjectName(f"explain_{explain}")
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
        edit(self.padding.currentIndexChanged, lambda: {"padding": self.padding.currentData()})
        edit(self.pad_multiple.valueChanged, lambda: {"pad_multiple": self.pad_multiple.value()})
        edit(self.max_tokens.valueChanged, lambda: {"max_tokens": self.max_tokens.value()})
        edit(self.precision.currentIndexChanged, lambda: {"precision": self.precision.currentData()})
        edit(self.checkpointing.toggled, lambda: {"checkpointing": self.checkpointing.isChecked()})
        edit(self.checkpoint_every.valueChanged, lambda: {"checkpoint_every": self.checkpoint_every.value()})
        edit(self.prune_kind.currentIndexChanged, self._prune_value)
        edit(self.prune_fraction.valueChanged, self._prune_value)
        edit(self.micro_batches.valueChanged, lambda: {"micro_batches": self.micro_batches.value()})
        edit(self.chunk_input.valueChanged, lambda: {"chunk_input": self.chunk_input.value()})
        edit(self.ffn_chunks.valueChanged, lambda: {"ffn_chunks": self.ffn_chunks.value()})
        edit(self.attn.currentIndexChanged, self._attn_value)
        edit(self.window.valueChanged, self._attn_value)
        edit(self.geglu.toggled, lambda: {"mlp": "geglu" if self.geglu.isChecked() else "default"})
        self.teacher.activated.connect(lambda *_: self._on_edited(self._teacher_value()))
        self.teacher.lineEdit().editingFinished.connect(lambda: self._on_edited(self._teacher_value()))
        edit(self.teacher_precision.currentIndexChanged,
             lambda: {"teacher_precision": self.teacher_precision.currentData()})
        edit(self.alloc.currentIndexChanged, self._alloc_value)
        edit(self.pool_gib.valueChanged, self._alloc_value)
        edit(self.max_split.valueChanged, self._max_split_value)

    def _show_padding_note(self, padding: str) -> None:
        key = _PADDING_KEYS.get(padding, "")
        text = self._explanations.get(key) or self._explanations.get("padding", "")
        box = self.groups["padding"]
        note = box.findChild(ExplainNote, "explain_padding")
        if note is not None and text and text != note.full_text:
            note.set_explanation(text)
            box.setToolTip(f"<p>{html.escape(text)}</p>")

    # ----- values ---------------------------------------------------------------------------
    def _mode_fixes(self) -> dict[str, Any]:
        """Switching mode turns off what the other mode cannot do, instead of refusing the switch."""
        if self.mode.currentData() == "infer":
            return {"micro_batches": 1, "distill_from": "", "teacher_precision": "auto"}
        return {"chunk_input": 0}

    def _teacher_value(self) -> dict[str, Any]:
        teacher = self.teacher.currentText().strip()
        # no teacher, no teacher precision (the profile refuses one without the other)
        return {"distill_from": teacher} if teacher else {"distill_from": "", "teacher_precision": "auto"}

    def _max_split_value(self) -> dict[str, Any]:
        mib = self.max_split.value()
        return {"alloc_max_split": f"{mib}MiB" if mib > MAX_SPLIT_FLOOR_MIB else ""}

    def _prune_value(self) -> dict[str, Any]:
        kind = self.prune_kind.currentData()
        fraction = self.prune_fraction.value()
        if not kind:
            return {"prune": ""}
        if fraction <= 0:
            fraction = 0.25
        return {"prune": f"{kind}:{fraction:.2f}"}

    def _attn_value(self) -> dict[str, Any]:
        kind = self.attn.currentData()
        return {"attn": f"local:{self.window.value()}" if kind == "local" else kind}

    def _alloc_value(self) -> dict[str, Any]:
        kind = self.alloc.currentData()
        return {"alloc": f"pool:{self.pool_gib.value():g}GiB" if kind == "pool" else kind}

    def _on_edited(self, changes: dict[str, Any]) -> None:
        if self._updating:
            return
        if not self._state.update(**changes):
            self._on_profile_changed(self._state.profile)  # put the widgets back to what holds

    def _on_profile_changed(self, p) -> None:
        self._updating = True
        try:
            def set_combo(box: QComboBox, value: Any) -> None:
                i = box.findData(value)
                if i >= 0:
                    box.setCurrentIndex(i)

            set_combo(self.mode, p.mode)
            set_combo(self.task, p.task)
            self.seed.setValue(p.seed)
            self.batch.setValue(p.batch)
            self.seq.setValue(p.seq)
            set_combo(self.optimizer, p.optimizer)
            self.steps.setValue(p.steps)
            set_combo(self.padding, p.padding)
            self._show_padding_note(p.padding)
            self.pad_multiple.setValue(p.pad_multiple)
            self.max_tokens.setValue(p.max_tokens)
            self.max_tokens.setEnabled(p.padding == "token-budget")
            self.pad_multiple.setEnabled(p.padding != "fixed")
            set_combo(self.precision, p.precision)
            self.checkpointing.setChecked(p.checkpointing)
            self.checkpoint_every.setValue(p.checkpoint_every)
            self.checkpoint_every.setEnabled(p.checkpointing)
            set_combo(self.prune_kind, p.prune_kind)
            if p.prune:
                self.prune_fraction.setValue(p.prune_fraction)
            self.prune_fraction.setEnabled(bool(p.prune))
            self.micro_batches.setValue(p.micro_batches)
            self.chunk_input.setValue(p.chunk_input)
            self.micro_batches.setEnabled(p.mode == "train")
            self.chunk_input.setEnabled(p.mode == "infer")
            self.ffn_chunks.setValue(p.ffn_chunks)
            set_combo(self.attn, "local" if p.local_window else p.attn)
            if p.local_window:
                self.window.setValue(p.local_window)
            self.window.setEnabled(bool(p.local_window))
            self.geglu.setChecked(p.mlp == "geglu")
            self.teacher.setCurrentText(p.distill_from)
            self.teacher.setEnabled(p.mode == "train")
            set_combo(self.teacher_precision, p.teacher_precision)
            self.teacher_precision.setEnabled(p.mode == "train" and bool(p.distill_from))
            set_combo(self.alloc, "pool" if p.alloc.lower().startswith("pool:") else p.alloc)
            if p.alloc_pool_bytes:
                self.pool_gib.setValue(p.alloc_pool_bytes / 1024**3)
            self.pool_gib.setEnabled(p.alloc_pool_bytes > 0)
            self.max_split.setValue(p.alloc_max_split_mib or MAX_SPLIT_FLOOR_MIB)
            self.checkpointing.setEnabled(p.mode == "train")
        finally:
            self._updating = False
