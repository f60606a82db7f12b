"""Profiles: the list (select, rename in place) and its actions (new, duplicate, rename, delete,
save to / load from a .json file)."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (QFileDialog, QGridLayout, QGroupBox, QListWidget, QListWidgetItem, QMenu,
                               QMessageBox, QPushButton, QVBoxLayout)

from app.state import AppState
from engine.errors import BadInput
from engine.units import format_bytes


class ProfileList(QGroupBox):
    def __init__(self, state: AppState, parent=None) -> None:
        super().__init__("Profiles", parent)
        self._state = state
        self.ask_before_delete = True  # tests and scripts switch the question off
        self.list = QListWidget()
        self.list.setMinimumHeight(56)  # three rows: the window must fit 768 px high
        self.list.setEditTriggers(QListWidget.EditTrigger.DoubleClicked | QListWidget.EditTrigger.EditKeyPressed)
        self.list.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.list.customContextMenuRequested.connect(self._on_context_menu)
        delete = QAction("Delete profile", self.list)
        delete.setShortcut(QKeySequence(QKeySequence.StandardKey.Delete))
        delete.setShortcutContext(Qt.ShortcutContext.WidgetShortcut)  # not while typing elsewhere
        delete.triggered.connect(self.delete_current)
        self.list.addAction(delete)
        self.new_button = QPushButton("New")
        self.new_button.setToolTip("A new profile with the default settings (Ctrl+N)")
        self.duplicate_button = QPushButton("Duplicate")
        self.duplicate_button.setToolTip("Copy the selected profile (Ctrl+D)")
        self.rename_button = QPushButton("Rename")
        self.rename_button.setToolTip("Rename the selected profile (F2, or double-click it)")
        self.delete_button = QPushButton("Delete")
        self.delete_button.setToolTip("Delete the selected profile (Del in the list)")
        self.save_button = QPushButton("Save…")
        self.save_button.setToolTip("Save the selected profile as .json (Ctrl+S)")
        self.load_button = QPushButton("Load…")
        self.load_button.setToolTip("Load a profile .json (Ctrl+O)")
        grid = QGridLayout()
        for i, b in enumerate((self.new_button, self.duplicate_button, self.rename_button,
                               self.delete_button, self.save_button, self.load_button)):
            grid.addWidget(b, i // 3, i % 3)
        layout = QVBoxLayout(self)
        layout.addWidget(self.list, 1)
        layout.addLayout(grid)

        self.new_button.clicked.connect(lambda: self._state.new_profile())
        self.duplicate_button.clicked.connect(lambda: self._state.duplicate())
        self.rename_button.clicked.connect(self._on_rename_clicked)
        self.delete_button.clicked.connect(self.delete_current)
        self.save_button.clicked.connect(lambda: self.save_dialog())
        self.load_button.clicked.connect(lambda: self.load_dialog())
        self.list.currentRowChanged.connect(self._on_row_changed)
        self.list.itemChanged.connect(self._on_item_edited)
        state.profiles_changed.connect(self._on_profiles_changed)
        state.current_changed.connect(self._on_current_changed)
        state.profile_changed.connect(lambda _p: self._refresh_tooltips())
        state.estimate_changed.connect(lambda _r: self._refresh_tooltips())
        state.measured_changed.connect(lambda _r: self._refresh_tooltips())
        self._on_profiles_changed()

    # ----- public -------------------------------------------------------------------------
    def save_dialog(self) -> None:
        name = self._state.profile.name.replace("/", "_") + ".json"
        path, _ = QFileDialog.getSaveFileName(self, "Save profile", name, "Headroom profile (*.json)")
        if path:
            try:
                self._state.save_file(path)
                self._state.show_message("info", f"Saved {path}")
            except (BadInput, OSError) as exc:
                self._state.show_message("error", f"Could not save {path}: {exc}")

    def rename_current(self) -> None:
        self._on_rename_clicked()

    def delete_current(self) -> None:
        if len(self._state.names()) <= 1:
            self._state.show_message("warning", "the last profile cannot be deleted")
            return
        name = self._state.profile.name
        if self.ask_before_delete:
            answer = QMessageBox.question(self, "Delete profile", f"Delete the profile “{name}”?")
            if answer != QMessageBox.StandardButton.Yes:
                return
        self._state.delete(self._state.current_index)
        self._state.show_message("info", f"Deleted profile {name!r}")

    def load_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load profile", "", "Headroom profile (*.json)")
        if path:
            self.load_path(path)

    def load_path(self, path: str) -> bool:
        try:
            self._state.load_file(path)
        except BadInput as exc:
            self._state.show_message("error", str(exc))
            return False
        self._state.show_message("info", f"Loaded {path}")
        return True

    # ----- private ------------------------------------------------------------------------
    def _on_profiles_changed(self) -> None:
        self.list.blockSignals(True)
        self.list.clear()
        for name in self._state.names():
            item = QListWidgetItem(name)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsEditable)
            self.list.addItem(item)
        self.list.setCurrentRow(self._state.current_index)
        self.list.blockSignals(False)
        self.delete_button.setEnabled(len(self._state.names()) > 1)
        self._refresh_tooltips()

    def _refresh_tooltips(self) -> None:
        """Each row's tooltip: the profile in one line, its estimate and its measured run."""
        self.list.blockSignals(True)  # a tooltip change is an itemChanged, not a rename
        try:
            self._set_tooltips()
        finally:
            self.list.blockSignals(False)

    def _set_tooltips(self) -> None:
        for i, entry in enumerate(self._state.entries):
            item = self.list.item(i)
            if item is None:
                continue
            p = entry.profile
            lines = [f"{p.model} · {p.mode} · batch {p.batch} × seq {p.seq} · {p.precision} · {p.target}"]
            if entry.estimate is not None:
                lines.append(f"estimate: {format_bytes(entry.estimate.peak_allocated_bytes)} peak allocated")
            if entry.measured is not None:
                m = entry.measured
                lines.append("measured: out of memory" if m.oom else
                             f"measured: {format_bytes(m.peak_allocated_bytes)}, {m.tokens_per_s:,.0f} tokens/s")
            item.setToolTip("\n".join(lines))

    def _on_context_menu(self, pos) -> None:
        row = self.list.indexAt(pos).row()
        if row >= 0:
            self._state.select(row)
        menu = QMenu(self)
        menu.addAction("New", self._state.new_profile)
        menu.addAction("Duplicate", self._state.duplicate)
        menu.addAction("Rename", self._on_rename_clicked)
        menu.addAction("Delete", self.delete_current).setEnabled(len(self._state.names()) > 1)
        menu.addSeparator()
        menu.addAction("Save…", self.save_dialog)
        menu.exec(self.list.viewport().mapToGlobal(pos))

    def _on_current_changed(self, index: int) -> None:
        self.list.blockSignals(True)
        self.list.setCurrentRow(index)
        self.list.blockSignals(False)

    def _on_row_changed(self, row: int) -> None:
        self._state.select(row)

    def _on_rename_clicked(self) -> None:
        item = self.list.item(self._state.current_index)
        if item is not None:
            self.list.editItem(item)

    def _on_item_edited(self, item: QListWidgetItem) -> None:
        row = self.list.row(item)
        if 0 <= row < len(self._state.names()) and item.text() == self._state.names()[row]:
            return
        if not self._state.rename(row, item.text()):
            self._on_profiles_changed()
