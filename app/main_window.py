"""The main window: profiles, model, target (left), techniques (middle), and the views (right):
estimate versus measured with the run controls, the dataset, and the comparison of profiles."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QByteArray, QIODevice, QSaveFile, Qt, Signal
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (QDialog, QDialogButtonBox, QFileDialog, QHeaderView, QLabel, QMainWindow,
                               QMenu, QMessageBox, QSplitter, QTableWidget, QTableWidgetItem, QTabWidget,
                               QVBoxLayout, QWidget)

from app.estimator import EstimateController
from app.state import AppState
from app.theme import apply_theme
from app.widgets.common import HorizontalScrollArea, install_wheel_guard, keep_wrapped_height
from app.widgets.compare_view import CompareView
from app.widgets.dataset_panel import DatasetPanel
from app.widgets.estimate_view import EstimateView
from app.widgets.model_panel import ModelPanel, model_folder_of
from app.widgets.profile_list import ProfileList
from app.widgets.run_panel import RunPanel
from app.widgets.target_panel import TargetPanel
from app.widgets.technique_panel import TechniquePanel
from app.worker import TaskRunner
from engine.export import export_script, export_summary_markdown
from engine.profile import Profile

_MESSAGE_STYLES = {
    "error": "background: #FBE3E1; color: #8A1C14; border: 1px solid #E8A09A;",
    "warning": "background: #FFF4D6; color: #6B4E00; border: 1px solid #E8C76A;",
    "info": "background: #E3EEFB; color: #173B6B; border: 1px solid #9DB9E0;",
}


#: Below this the estimate view's bars and their legend crowd each other (px).
VIEWS_COMFORTABLE_WIDTH = 460


def _prefer_traced(profile: Profile, shown, should_stop):
    """The estimate an export writes: the traced one (closer to a real run; the export names the
    estimator), made now if the app still shows the analytic one; else what the app shows."""
    if shown is not None and shown.method == "traced":
        return shown
    from engine.estimate import estimate

    try:
        return estimate(profile, method="traced", should_stop=should_stop)
    except Exception:  # noqa: BLE001 - Cancelled, a trace that fails: the shown estimate stays
        return shown


class MainWindow(QMainWindow):
    export_finished = Signal(str, bool)  # path, written

    def __init__(self, profile: Profile | None = None, state: AppState | None = None) -> None:
        super().__init__()
        install_wheel_guard()  # the wheel scrolls panels; it changes a setting only with focus
        self.setWindowTitle("Headroom — memory planner")
        self.state = state or AppState(profiles=[profile] if profile else None)
        self.estimator = EstimateController(self.state, self)

        self.profiles = ProfileList(self.state)
        self.model_panel = ModelPanel(self.state)
        self.target_panel = TargetPanel(self.state)
        self.techniques = TechniquePanel(self.state)
        self.estimate_view = EstimateView(self.state, self.estimator)
        self.run_panel = RunPanel(self.state)
        self.dataset_panel = DatasetPanel(self.state)
        self.compare_view = CompareView(self.state)

        self.message = QLabel()
        self.message.setToolTip("Click to dismiss")
        self.message.mousePressEvent = lambda _e: self.message.hide()
        self.message.setObjectName("message_bar")
        self.message.setWordWrap(True)
        self.message.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.message.hide()

        left = QSplitter(Qt.Orientation.Vertical)
        left.addWidget(self.profiles)
        left.addWidget(self.model_panel)
        left.addWidget(self.target_panel)
        left.setStretchFactor(1, 1)
        left.setSizes([200, 460, 190])
        for panel in (self.profiles, self.model_panel, self.target_panel):
            keep_wrapped_height(panel)  # the splitter gives wrapped facts and notes their lines

        # The estimate view's bars and legends want ~480 px; in a scroll area they scroll instead of
        # setting the window's minimum width (usable down to ~950 px wide).
        estimate_scroll = HorizontalScrollArea(self.estimate_view)
        estimate_tab = QSplitter(Qt.Orientation.Vertical)
        estimate_tab.addWidget(estimate_scroll)
        estimate_tab.addWidget(self.run_panel)
        estimate_tab.setSizes([520, 330])
        self.tabs = QTabWidget()
        self.tabs.setUsesScrollButtons(True)  # the tab titles never set the views' minimum width
        self.tabs.addTab(estimate_tab, "Estimate vs measured")
        self.tabs.addTab(self.dataset_panel, "Dataset")
        self.tabs.addTab(self.compare_view, "Compare profiles")
        right = QWidget()
        right_layout = QVBoxLayout(right)
        right_layout.setContentsMargins(0, 0, 0, 0)
        right_layout.addWidget(self.message)
        right_layout.addWidget(self.tabs, 1)

        # where a window is too narrow for every column, the techniques scroll sideways rather
        # than clip their controls
        self.techniques.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        self.splitter.addWidget(left)
        self.splitter.addWidget(self.techniques)
        self.splitter.addWidget(right)
        self.splitter.setStretchFactor(2, 1)
        self.splitter.setSizes([300, 390, 710])
        self.splitter.setChildrenCollapsible(False)
        self.setCentralWidget(self.splitter)

        self._export_runner = TaskRunner("export", self)
        self._export_runner.result_ready.connect(self._on_export_done)
        self._export_runner.failed.connect(self._on_export_failed)
        self.setAcceptDrops(True)  # a model folder, a profile .json or a dataset file
        self._make_actions()
        self.state.message_changed.connect(self._on_message_changed)
        self.state.recent_files_changed.connect(self._refresh_recent_menu)
        self.run_panel._runner.running_changed.connect(self.cancel_action.setEnabled)
        self.estimate_view.layers_button_enabled_changed.connect(self.layers_action.setEnabled)
        self.run_panel.run_finished.connect(self._on_run_finished)
        self.estimator.status_changed.connect(self._on_estimator_status)
        self.tabs.currentChanged.connect(self._on_tab_changed)
        self.resize(1400, 900)
        self._restore_window()
        self.estimator.estimate_now()

    # ----- actions ------------------------------------------------------------------------
    def _action(self, text: str, shortcut: str | QKeySequence | None, slot, tip: str = "") -> QAction:
        action = QAction(text, self)
        if shortcut:
            action.setShortcut(QKeySequence(shortcut))
        if tip:
            action.setToolTip(tip)
            action.setStatusTip(tip)
        action.triggered.connect(slot)
        self.addAction(action)
        return action

    def _make_actions(self) -> None:
        s = self.state
        self.new_action = self._action("&New profile", QKeySequence.StandardKey.New, lambda: s.new_profile(),
                                       "A new profile with the default settings")
        self.open_action = self._action("&Open profile…", QKeySequence.StandardKey.Open, self.profiles.load_dialog,
                                        "Load a profile .json as a new profile")
        self.save_action = self._action("&Save profile as…", QKeySequence.StandardKey.Save, self.profiles.save_dialog,
                                        "Save the selected profile as .json")
        self.duplicate_action = self._action("&Duplicate profile", "Ctrl+D", lambda: s.duplicate(),
                                             "Copy the selected profile")
        self.rename_action = self._action("&Rename profile", "F2", self.profiles.rename_current)
        self.delete_action = self._action("De&lete profile", None, self.profiles.delete_current)
        self.export_action = self._action("&Export script…", "Ctrl+E", self.export_script_dialog,
                                          "Write a standalone training script (torch + transformers) for this profile")
        self.summary_action = self._action("Export s&ummary…", "Ctrl+Shift+E", self.export_summary_dialog,
                                           "Write a Markdown summary: settings, estimate, measurement, why")
        self.open_model_action = self._action("Open &model folder…", "Ctrl+Shift+M", self.model_panel._on_open_clicked,
                                              "A folder holding config.json (weights optional)")
        self.import_measurement_action = self._action(
            "&Import measurement…", "Ctrl+I", self.import_measurement_dialog,
            "Attach a run made elsewhere (headroom measure --json, or an exported script's output) to "
            "this profile")
        self.open_data_action = self._action("Open &dataset file…", "Ctrl+Shift+O", self.dataset_panel._on_open_clicked,
                                             ".txt, .csv/.tsv, .jsonl or .parquet")
        self.quit_action = self._action("&Quit", "Ctrl+Q", self.close)
        self.run_action = self._action("&Run measurement", "Ctrl+R", self.run_panel.start,
                                       "Run the profile's steps for real in a child process")
        self.cancel_action = self._action("&Cancel run", "Esc", self.run_panel.cancel)
        self.cancel_action.setEnabled(False)
        self.estimate_action = self._action("Re-&estimate now", "F5", self.estimator.estimate_now)
        self.layers_action = self._action("&Per-layer breakdown…", "Ctrl+L", self.estimate_view.show_layers)
        self.layers_action.setEnabled(False)
        self.which_gpu_action = self._action("&Which GPU?…", "Ctrl+G", self.show_which_gpu,
                                             "Every catalog GPU: does this profile fit, how fast (estimated)")
        self.best_action = self._action("&Best settings for this budget…", "Ctrl+B",
                                        self.show_best_settings,
                                        "The fastest settings that fit the capacity, as a new profile")
        self.search_action = self._action("&Find preset", QKeySequence.StandardKey.Find, self._on_find_preset)
        self.tab_actions = [
            self._action("&Estimate vs measured", "Ctrl+1", lambda: self.tabs.setCurrentIndex(0)),
            self._action("&Dataset", "Ctrl+2", lambda: self.tabs.setCurrentIndex(1)),
            self._action("&Compare profiles", "Ctrl+3", lambda: self.tabs.setCurrentWidget(self.compare_view)),
        ]
        self.compare_action = self.tab_actions[2]
        self.dark_action = self._action("Dar&k theme", "Ctrl+Shift+K", self._on_dark_toggled)
        self.dark_action.setCheckable(True)
        self.dark_action.setChecked(str(s.settings.value("view/dark", "false")).lower() == "true")
        self.shortcuts_action = self._action("&Keyboard shortcuts", "F1", self.show_shortcuts)
        self.about_action = self._action("&About Headroom", None, self._on_about)

        bar = self.menuBar()
        file_menu = bar.addMenu("&File")
        file_menu.setToolTipsVisible(True)
        self.recent_menu = QMenu("Open &recent", self)
        for a in (self.new_action, self.open_action, self.recent_menu, self.save_action, None,
                  self.open_model_action, self.open_data_action, self.import_measurement_action, None,
                  self.export_action,
                  self.summary_action, None, self.quit_action):
            if a is None:
                file_menu.addSeparator()
            elif isinstance(a, QMenu):
                file_menu.addMenu(a)
            else:
                file_menu.addAction(a)
        profile_menu = bar.addMenu("&Profile")
        for a in (self.duplicate_action, self.rename_action, self.delete_action):
            profile_menu.addAction(a)
        run_menu = bar.addMenu("&Run")
        for a in (self.run_action, self.cancel_action, None, self.estimate_action, self.layers_action,
                  None, self.which_gpu_action, self.best_action):
            run_menu.addSeparator() if a is None else run_menu.addAction(a)
        view_menu = bar.addMenu("&View")
        for a in self.tab_actions + [None, self.search_action, self.dark_action]:
            view_menu.addSeparator() if a is None else view_menu.addAction(a)
        help_menu = bar.addMenu("&Help")
        help_menu.addAction(self.shortcuts_action)
        help_menu.addAction(self.about_action)
        self._refresh_recent_menu()

    def _refresh_recent_menu(self) -> None:
        self.recent_menu.clear()
        files = self.state.recent_files()
        for kind, path in files:
            action = self.recent_menu.addAction(f"{Path(path).name}  ({kind})")
            action.setToolTip(path)
            action.setData((kind, path))
            action.triggered.connect(lambda _checked=False, k=kind, p=path: self.open_recent(k, p))
        if files:
            self.recent_menu.addSeparator()
            self.recent_menu.addAction("Clear list", self._clear_recent)
        self.recent_menu.setEnabled(bool(files))

    def _clear_recent(self) -> None:
        self.state.settings.setValue("recent/files", "[]")
        self._refresh_recent_menu()

    def open_recent(self, kind: str, path: str) -> bool:
        if not Path(path).is_file():
            self.state.forget_file(kind, path)
            self.state.show_message("warning", f"{path} no longer exists; removed from the recent files")
            return False
        if kind == "profile":
            return self.profiles.load_path(path)
        return self.dataset_panel.open_file(path)

    def open_path(self, path: str | Path) -> bool:
        """Open what a dropped path is: a model folder (or its config.json), a measurement (imported
        onto the selected profile), a profile .json, or a dataset file."""
        path = Path(path)
        folder = model_folder_of(path)
        if folder is not None:
            self.model_panel.open_folder(folder)
            return True
        suffix = path.suffix.lower()
        from engine.measurement_file import looks_like_measurement

        if suffix in (".json", ".jsonl", ".log", ".txt") and looks_like_measurement(path):
            return self.import_measurement(path)  # a run made elsewhere, onto the selected profile
        if suffix == ".json":
            return self.profiles.load_path(str(path))
        if suffix in (".txt", ".csv", ".tsv", ".jsonl", ".ndjson", ".parquet"):
            self.tabs.setCurrentWidget(self.dataset_panel)
            return self.dataset_panel.open_file(path)
        self.state.show_message("warning", f"Cannot open {path.name}: drop a model folder, a profile "
                                           ".json, a measurement .json or a dataset (.txt .csv .tsv "
                                           ".jsonl .parquet)")
        return False

    def dragEnterEvent(self, event) -> None:  # noqa: N802 - Qt override
        urls = event.mimeData().urls() if event.mimeData() is not None else []
        if urls and all(u.isLocalFile() for u in urls):
            event.acceptProposedAction()

    def dragMoveEvent(self, event) -> None:  # noqa: N802 - Qt override
        self.dragEnterEvent(event)

    def dropEvent(self, event) -> None:  # noqa: N802 - Qt override
        urls = event.mimeData().urls() if event.mimeData() is not None else []
        for url in urls:
            if url.isLocalFile():
                self.open_path(url.toLocalFile())
        event.acceptProposedAction()

    def show_shortcuts(self) -> QDialog:
        """A table of every action with a keyboard shortcut."""
        rows = [(a.text().replace("&", "").rstrip("…"), a.shortcut().toString(QKeySequence.SequenceFormat.NativeText))
                for a in self.actions() if not a.shortcut().isEmpty()]
        rows.append(("Delete profile (in the profile list)", "Del"))
        dialog = QDialog(self)
        dialog.setWindowTitle("Keyboard shortcuts")
        table = QTableWidget(len(rows), 2, dialog)
        table.setHorizontalHeaderLabels(["Action", "Shortcut"])
        for r, (name, keys) in enumerate(rows):
            table.setItem(r, 0, QTableWidgetItem(name))
            table.setItem(r, 1, QTableWidgetItem(keys))
        table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        table.verticalHeader().hide()
        table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(dialog.reject)
        layout = QVBoxLayout(dialog)
        layout.addWidget(table)
        layout.addWidget(buttons)
        dialog.resize(440, 520)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.open()
        self._shortcuts_dialog = dialog
        return dialog

    def _on_find_preset(self) -> None:
        self.model_panel.search.setFocus()
        self.model_panel.search.selectAll()

    # ----- public -------------------------------------------------------------------------
    def export_script_to(self, path: str) -> bool:
        """Write the engine's standalone script of the selected profile (its estimate and measured
        peaks go into the script's header). Runs off the GUI thread; ``export_finished`` tells."""
        return self._export_to(path, export_script, "Script export")

    def export_summary_to(self, path: str) -> bool:
        """Write the engine's Markdown summary of the selected profile (off the GUI thread)."""
        return self._export_to(path, export_summary_markdown, "Summary export")

    def _export_to(self, path: str, fn, what: str) -> bool:
        """Start an export; False if it cannot start. The text is made and written on a worker
        thread (building the model's facts takes a moment), atomically (QSaveFile)."""
        entry = self.state.current
        profile, estimate, measured = entry.profile, entry.estimate, entry.measured

        def job(progress, should_stop):
            text = fn(profile, _prefer_traced(profile, estimate, should_stop), measured)
            out = QSaveFile(path)
            if not out.open(QIODevice.OpenModeFlag.WriteOnly | QIODevice.OpenModeFlag.Text):
                raise OSError(f"cannot write {path}: {out.errorString()}")
            out.write(QByteArray(text.encode("utf-8")))
            if not out.commit():
                raise OSError(f"cannot write {path}: {out.errorString()}")
            return path

        self.statusBar().showMessage(f"{what}: writing {path}…")
        self._export_runner.start(job, context=(path, what))
        return True

    def _on_export_done(self, path: str) -> None:
        self.state.show_message("info", f"Wrote {path}")
        self.export_finished.emit(path, True)

    def _on_export_failed(self, message: str) -> None:
        path, what = self._export_runner.context
        self.state.show_message("error", f"{what} failed: {message}")
        self.export_finished.emit(path, False)

    def import_measurement(self, path: str | Path) -> bool:
        """Import a measurement file onto the selected profile (a message says what happened)."""
        if self.state.import_measurement(path):
            self.tabs.setCurrentIndex(0)  # where it is drawn, beside the estimate
            return True
        return False

    def import_measurement_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Import measurement", "",
                                              "Measurement (*.json *.jsonl *.log *.txt);;All files (*)")
        if path:
            self.import_measurement(path)

    def export_script_dialog(self) -> None:
        name = self.state.profile.name.replace("/", "_").replace(" ", "_") + ".py"
        path, _ = QFileDialog.getSaveFileName(self, "Export training script", name, "Python (*.py)")
        if path:
            self.export_script_to(path)

    def export_summary_dialog(self) -> None:
        name = self.state.profile.name.replace("/", "_").replace(" ", "_") + ".md"
        path, _ = QFileDialog.getSaveFileName(self, "Export summary", name, "Markdown (*.md)")
        if path:
            self.export_summary_to(path)

    # ----- handlers -----------------------------------------------------------------------
    def _on_message_changed(self, level: str, text: str) -> None:
        if not text:
            self.message.hide()
            return
        self.message.setStyleSheet(_MESSAGE_STYLES.get(level, _MESSAGE_STYLES["info"]) +
                                   " padding: 5px; border-radius: 3px;")
        self.message.setText(text)
        self.message.show()
        self.statusBar().showMessage(text, 8000)

    def _on_estimator_status(self, text: str) -> None:
        if text:
            self.statusBar().showMessage(text, 4000)
        elif self.statusBar().currentMessage().startswith("estimating"):
            self.statusBar().clearMessage()

    def _on_run_finished(self, result) -> None:
        if result is not None:
            self.statusBar().showMessage("Measured run finished" + (" (out of memory)" if result.oom else ""), 6000)

    def _on_tab_changed(self, _index: int) -> None:
        if self.tabs.currentWidget() is self.compare_view:
            self.compare_view.refresh()

    def _on_dark_toggled(self) -> None:
        from PySide6.QtWidgets import QApplication

        dark = self.dark_action.isChecked()
        self.state.settings.setValue("view/dark", "true" if dark else "false")
        apply_theme(QApplication.instance(), dark)

    def show_which_gpu(self):
        """The "Which GPU?" view (non-modal; returns the dialog for tests)."""
        from app.widgets.gpu_views import WhichGpuDialog

        dialog = WhichGpuDialog(self.state, self)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.show()
        return dialog

    def show_best_settings(self):
        """The planner's fastest settings within the target's capacity; a row becomes a profile."""
        from app.widgets.gpu_views import BestSettingsDialog

        dialog = BestSettingsDialog(self.state, self)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.show()
        return dialog

    def _on_about(self) -> None:
        QMessageBox.about(self, "About Headroom",
                          "<b>Headroom</b> — will it fit, with which settings, and what does each "
                          "setting cost in speed?<br>Estimates run instantly on any machine; measured "
                          "runs happen in a child process.")

    # ----- window state -------------------------------------------------------------------
    def _restore_window(self) -> None:
        geometry = self.state.settings.value("window/geometry")
        if isinstance(geometry, QByteArray) and not geometry.isEmpty():
            self.restoreGeometry(geometry)
        splitter = self.state.settings.value("window/splitter")
        if isinstance(splitter, QByteArray) and not splitter.isEmpty():
            self.splitter.restoreState(splitter)
        tab = self.state.settings.value("window/tab", 0)
        try:
            self.tabs.setCurrentIndex(int(tab))
        except (TypeError, ValueError):
            pass

    def shutdown(self) -> None:
        """Stop every background thread (a running measurement is cancelled: its child killed)."""
        if getattr(self, "_shut", False):
            return
        self._shut = True
        for part in (self.run_panel, self.estimator, self.model_panel, self.dataset_panel, self.compare_view,
                     self.target_panel, self._export_runner):
            part.shutdown()
        s = self.state.settings
        s.setValue("window/geometry", self.saveGeometry())
        s.setValue("window/splitter", self.splitter.saveState())
        s.setValue("window/tab", self.tabs.currentIndex())
        self.state.save_all()
        s.sync()

    def resizeEvent(self, event) -> None:  # noqa: N802 - Qt override
        super().resizeEvent(event)
        self._make_room_for_the_views()

    def _make_room_for_the_views(self) -> None:
        """Share a narrow window's width: the technique column keeps what its widest control needs
        (it scrolls down, never sideways, so less would clip its controls); the views get the
        rest, taken from the technique column's spare width first, so the bars, their legend and
        the summary stay whole rather than scroll sideways."""
        sizes = self.splitter.sizes()
        if len(sizes) != 3 or not all(sizes):
            return
        inner = self.techniques.widget()
        keep = max(self.techniques.minimumWidth(), inner.minimumSizeHint().width()
                   + self.techniques.verticalScrollBar().sizeHint().width() + 2 * self.techniques.frameWidth())
        want = max(VIEWS_COMFORTABLE_WIDTH, self.estimate_view.minimumSizeHint().width() + 4)
        left, middle, right = sizes
        if middle < keep:  # clipped controls first: from the views, down to their minimum
            take = min(keep - middle, max(0, right - self.splitter.widget(2).minimumSizeHint().width()))
            middle, right = middle + take, right - take
        move = min(max(0, want - right), max(0, middle - keep))
        middle, right = middle - move, right + move
        if [left, middle, right] != sizes:
            self.splitter.setSizes([left, middle, right])

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt override
        self.shutdown()
        super().closeEvent(event)
