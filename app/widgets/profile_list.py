"""Profiles: the list (select, rename in place) and its actions (new, duplicate, rename, delete,
save to / load from a .json file)."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (QFileDialog, QGridLayout, QGroupBox, QListWidget, QListWidgetItem,
                               QPushButton, QVBoxLayout)

from app.state import AppState
from engine.errors import BadInput


class ProfileList(QGroupBox):
    def __init__(self, state: AppState, parent=None) -> None:
        super().__init__("Profiles", parent)
        self._state = state
        self.list = QListWidget()
        self.list.setMinimumHeight(90)
        self.new_button = QPushButton("New")
        self.duplicate_button = QPushButton("Duplicate")
        self.duplicate_button.setToolTip("Copy the selected profile (Ctrl+D)")
        self.rename_button = QPushButton("Rename")
        self.delete_button = QPushButton("Delete")
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
        self.delete_button.clicked.connect(lambda: self._state.delete(self._state.current_index))
        self.save_button.clicked.connect(lambda: self.save_dialog())
        self.load_button.clicked.connect(lambda: self.load_dialog())
        self.list.currentRowChanged.connect(self._on_row_changed)
        self.list.itemChanged.connect(self._on_item_edited)
        state.profiles_changed.connect(self._on_profiles_changed)
        state.current_changed.connect(self._on_current_changed)
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
        if not self._state.rename(row, item.text()):
            self._on_profiles_changed()
