"""Speed views: "Which GPU?" (every catalog GPU: fits, memory, estimated tokens/s) and "Best
settings for this budget" (the planner's fastest settings that fit, one click to a new profile).

Both run engine searches (``engine.plan_search``) on a worker thread; the dialogs only draw.
"""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (QAbstractItemView, QDialog, QDialogButtonBox, QLabel, QTableWidget,
                               QTableWidgetItem, QVBoxLayout)

from app.state import AppState
from app.widgets.common import note_label
from app.worker import TaskRunner
from engine.units import format_bytes


def _item(text: str, sort_value=None, align_right: bool = False) -> QTableWidgetItem:
    item = QTableWidgetItem(text)
    item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEditable)
    if sort_value is not None:
        item.setData(Qt.ItemDataRole.UserRole, sort_value)
    if align_right:
        item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
    return item


class _SearchDialog(QDialog):
    """A table filled from one engine search on a worker thread."""

    columns: tuple[str, ...] = ()

    def __init__(self, state: AppState, title: str, parent=None) -> None:
        super().__init__(parent)
        self.setWindowTitle(title)
        self.resize(860, 520)
        self._state = state
        self.status = QLabel("Searching…")
        self.table = QTableWidget(0, len(self.columns))
        self.table.setHorizontalHeaderLabels(list(self.columns))
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.verticalHeader().setVisible(False)
        self.note = note_label("")
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        self.buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(self.status)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.note)
        layout.addWidget(self.buttons)
        self.result = None
        self._runner = TaskRunner(type(self).__name__, self)
        self._runner.result_ready.connect(self._on_result)
        self._runner.failed.connect(lambda m: self.status.setText(f"Search failed: {m}"))

    def _row_button(self, text: str, slot):
        """An accept-role button that runs ``slot``, enabled only while a table row is selected."""
        button = self.buttons.addButton(text, QDialogButtonBox.ButtonRole.AcceptRole)
        button.setEnabled(False)
        button.clicked.connect(slot)
        self.table.itemSelectionChanged.connect(lambda: button.setEnabled(bool(self.table.selectedItems())))
        return button

    def start(self, job) -> None:
        self._runner.start(job)

    def done(self, code: int) -> None:  # noqa: D401 - Qt override: stop the worker with the dialog
        self._runner.shutdown()
        super().done(code)

    def _on_result(self, result) -> None:
        raise NotImplementedError


class WhichGpuDialog(_SearchDialog):
    """Every catalog GPU: does the profile fit, how much memory, how fast (estimated)."""

    columns = ("GPU", "memory", "fits", "device used", "margin", "est. tokens/s", "step", "note")

    def __init__(self, state: AppState, parent=None) -> None:
        super().__init__(state, f"Which GPU? — {state.profile.name}", parent)
        self.use_button = self._row_button("Plan for this GPU", self._use)
        profile = state.profile.replace(target="cuda")
        from engine.plan_search import which_gpu

        self.start(lambda progress, should_stop: which_gpu(profile, progress, should_stop))

    def _on_result(self, rows) -> None:
        self.result = rows
        self.table.setRowCount(len(rows))
        for i, r in enumerate(rows):
            cells = [_item(r.name, r.gpu), _item(format_bytes(r.memory_bytes), align_right=True),
                     _item("fits" if r.fits else "does not fit"),
                     _item(format_bytes(r.device_used_bytes), align_right=True),
                     _item(format_bytes(abs(r.margin_bytes)) + (" free" if r.fits else " short"),
                           align_right=True),
                     _item(f"{r.tokens_per_s:,.0f}", align_right=True),
                     _item(f"{r.step_s * 1000:,.0f} ms", align_right=True), _item(r.note)]
            if not r.fits:
                for c in cells:
                    c.setForeground(Qt.GlobalColor.gray)
            for j, c in enumerate(cells):
                self.table.setItem(i, j, c)
        self.table.resizeColumnsToContents()
        fits = sum(r.fits for r in rows)
        self.status.setText(f"{fits} of {len(rows)} GPUs fit {self._state.profile.name} "
                            "(analytic estimate: memory, and speed from the GPU's roofline)")
        from engine.estimate import speed

        cal = speed.calibration()
        self.note.setText(f"Speeds: expected error {cal.median_error:.0%} median, "
                          f"{cal.worst_error:.0%} worst ({cal.source}). Rates from each GPU's "
                          "datasheet (engine/gpus.py).")

    def _use(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        if rows and self.result:
            key = self.table.item(rows[0].row(), 0).data(Qt.ItemDataRole.UserRole)
            self._state.update(gpu=key, target="cuda")
        self.accept()


class BestSettingsDialog(_SearchDialog):
    """The planner's fastest settings that fit the budget; "New profile" fills one from a row."""

    columns = ("#", "changes", "est. tokens/s", "step", "device used", "margin", "notes")

    def __init__(self, state: AppState, parent=None) -> None:
        budget = state.capacity_bytes
        super().__init__(state, f"Best settings for {format_bytes(budget)} — {state.profile.name}",
                         parent)
        self.new_button = self._row_button("New profile from the selected row", self._new_profile)
        self.created: int | None = None
        profile = state.profile.replace(target="cuda")
        from engine.plan_search import fastest

        self.start(lambda progress, should_stop: fastest(profile, budget, progress=progress,
                                                         should_stop=should_stop))

    def _on_result(self, result) -> None:
        self.result = result
        rows = result.candidates
        self.table.setRowCount(len(rows))
        for i, c in enumerate(rows):
            changes = ", ".join(f"{k}={v}" for k, v in c.changes.items())
            cells = [_item(str(i + 1), i), _item(changes), _item(f"{c.tokens_per_s:,.0f}", align_right=True),
                     _item(f"{c.step_s * 1000:,.0f} ms", align_right=True),
                     _item(format_bytes(c.device_used_bytes), align_right=True),
                     _item(format_bytes(c.margin_bytes), align_right=True), _item("; ".join(c.notes))]
            for j, cell in enumerate(cells):
                self.table.setItem(i, j, cell)
        self.table.resizeColumnsToContents()
        if rows:
            self.table.selectRow(0)
        self.status.setText(f"{len(rows)} fastest settings that fit on {result.gpu} "
                            f"({result.searched} estimates in {result.elapsed_s:.1f} s)")
        self.note.setText(" ".join(result.notes))

    def _new_profile(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        if rows and self.result and self.result.candidates:
            c = self.result.candidates[rows[0].row()]
            base = self._state.profile
            self.created = self._state.add(c.profile.replace(name=f"{base.name} (fastest)"))
        self.accept()


__all__ = ["BestSettingsDialog", "WhichGpuDialog"]
