"""The main window: profiles, model, target (left), techniques (middle), and the views (right):
estimate versus measured with the run controls, the dataset, and the comparison of profiles."""

from __future__ import annotations

from PySide6.QtCore import QByteArray, QIODevice, QSaveFile, Qt
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (QFileDialog, QLabel, QMainWindow, QMessageBox, QSplitter, QTabWidget,
                               QVBoxLayout, QWidget)

from app import engine_bridge
from app.estimator import EstimateController
from app.state import AppState
from app.theme import apply_theme
from app.widgets.compare_view import CompareView
from app.widgets.dataset_panel import DatasetPanel
from app.widgets.estimate_view import EstimateView
from app.widgets.model_panel import ModelPanel
from app.widgets.profile_list import ProfileList
from app.widgets.run_panel import RunPanel
from app.widgets.target_panel import TargetPanel
from app.widgets.technique_panel import TechniquePanel
from engine.profile import Profile

_MESSAGE_STYLES = {
    "error": "background: #FBE3E1; color: #8A1C14; border: 1px solid #E8A09A;",
    "warning": "background: #FFF4D6; color: #6B4E00; border: 1px solid #E8C76A;",
    "info": "background: #E3EEFB; color: #173B6B; border: 1px solid #9DB9E0;",
}


class MainWindow(QMainWindow):
    def __init__(self, profile: Profile | None = None, state: AppState | None = None) -> None:
        super().__init__()
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

        estimate_tab = QSplitter(Qt.Orientation.Vertical)
        estimate_tab.addWidget(self.estimate_view)
        estimate_tab.addWidget(self.run_panel)
        estimate_tab.setSizes([520, 330])
        self.tabs = QTabWidget()
        self.tabs.addTab(estimate_tab, "Estimate vs measured")
        self.tabs.addTab(self.dataset_panel, "Dataset")
        self.tabs.addTab(self.compare_view, "Compare profiles")
        right = QWidget()
        right_layout = QVBoxLayout(right)
        right_layout.setContentsMargins(0, 0, 0, 0)
        right_layout.addWidget(self.message)
        right_layout.addWidget(self.tabs, 1)

        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        self.splitter.addWidget(left)
        self.splitter.addWidget(self.techniques)
        self.splitter.addWidget(right)
        self.splitter.setStretchFactor(2, 1)
        self.splitter.setSizes([300, 390, 710])
        self.splitter.setChildrenCollapsible(False)
        self.setCentralWidget(self.splitter)

        self._make_actions()
        self.state.message_changed.connect(self._on_message_changed)
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
        self.new_action = self._action("&New profile", QKeySequence.StandardKey.New, lambda: s.new_profile())
        self.open_action = self._action("&Open profile…", "Ctrl+O", self.profiles.load_dialog)
        self.save_action = self._action("&Save profile…", "Ctrl+S", self.profiles.save_dialog)
        self.duplicate_action = self._action("&Duplicate profile", "Ctrl+D", lambda: s.duplicate())
        self.export_action = self._action("&Export script…", "Ctrl+E", self.export_script_dialog,
                                          "Write a standalone training script for this profile")
        if engine_bridge.export_fn() is None:
            self.export_action.setEnabled(False)
            self.export_action.setToolTip("Script export (engine.export) is not available yet in this build")
            self.export_action.setStatusTip(self.export_action.toolTip())
        self.open_model_action = self._action("Open &model folder…", None, self.model_panel._on_open_clicked)
        self.open_data_action = self._action("Open &dataset file…", None, self.dataset_panel._on_open_clicked)
        self.quit_action = self._action("&Quit", QKeySequence.StandardKey.Quit, self.close)
        self.run_action = self._action("&Run measurement", "Ctrl+R", self.run_panel.start)
        self.cancel_action = self._action("&Cancel run", "Esc", self.run_panel.cancel)
        self.compare_action = self._action("&Compare profiles", "Ctrl+K", lambda: self.tabs.setCurrentWidget(self.compare_view))
        self.dark_action = self._action("&Dark theme", None, self._on_dark_toggled)
        self.dark_action.setCheckable(True)
        self.dark_action.setChecked(str(s.settings.value("view/dark", "false")).lower() == "true")
        self.about_action = self._action("&About Headroom", None, self._on_about)

        bar = self.menuBar()
        file_menu = bar.addMenu("&File")
        file_menu.setToolTipsVisible(True)
        for a in (self.new_action, self.open_action, self.save_action, self.duplicate_action, None,
                  self.open_model_action, self.open_data_action, None, self.export_action, None,
                  self.quit_action):
            file_menu.addSeparator() if a is None else file_menu.addAction(a)
        run_menu = bar.addMenu("&Run")
        run_menu.addAction(self.run_action)
        run_menu.addAction(self.cancel_action)
        view_menu = bar.addMenu("&View")
        view_menu.addAction(self.compare_action)
        view_menu.addAction(self.dark_action)
        bar.addMenu("&Help").addAction(self.about_action)

    # ----- public -------------------------------------------------------------------------
    def export_script_to(self, path: str) -> bool:
        fn = engine_bridge.export_fn()
        if fn is None:
            self.state.show_message("warning", "Script export is not available yet in this build.")
            return False
        try:
            text = fn(self.state.profile)
        except Exception as exc:  # noqa: BLE001 - shown, never raised into Qt
            self.state.show_message("error", f"Export failed: {str(exc).splitlines()[0] if str(exc) else exc!r}")
            return False
        out = QSaveFile(path)
        if not out.open(QIODevice.OpenModeFlag.WriteOnly | QIODevice.OpenModeFlag.Text):
            self.state.show_message("error", f"Cannot write {path}: {out.errorString()}")
            return False
        out.write(QByteArray(text.encode("utf-8")))
        if not out.commit():
            self.state.show_message("error", f"Cannot write {path}: {out.errorString()}")
            return False
        self.state.show_message("info", f"Wrote {path}")
        return True

    def export_script_dialog(self) -> None:
        name = self.state.profile.name.replace("/", "_").replace(" ", "_") + ".py"
        path, _ = QFileDialog.getSaveFileName(self, "Export training script", name, "Python (*.py)")
        if path:
            self.export_script_to(path)

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
        for part in (self.run_panel, self.estimator, self.model_panel, self.dataset_panel, self.compare_view):
            part.shutdown()
        s = self.state.settings
        s.setValue("window/geometry", self.saveGeometry())
        s.setValue("window/splitter", self.splitter.saveState())
        s.setValue("window/tab", self.tabs.currentIndex())
        self.state.save_all()
        s.sync()

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt override
        self.shutdown()
        super().closeEvent(event)
