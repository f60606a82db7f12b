"""Live estimate: every profile edit restarts a 150 ms single-shot timer; when it fires, the
analytic estimate (milliseconds) runs on a worker thread, then, if asked, the traced one (seconds).
Results land in the AppState for exactly the profile they were computed for."""

from __future__ import annotations

from PySide6.QtCore import QObject, QTimer, Signal

from app.state import AppState
from app.worker import TaskRunner
from engine.estimate import estimate

DEBOUNCE_MS = 150


class EstimateController(QObject):
    estimating_changed = Signal(bool)
    status_changed = Signal(str)  # a one-line state of the estimate ("" when fine)
    traced_changed = Signal(bool)

    def __init__(self, state: AppState, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._state = state
        self._traced = False
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(DEBOUNCE_MS)
        self._timer.timeout.connect(self._on_timer)
        self._runner = TaskRunner("estimate", self)
        self._runner.result_ready.connect(self._on_result)
        self._runner.failed.connect(self._on_failed)
        self._runner.running_changed.connect(self.estimating_changed)
        state.profile_changed.connect(self._on_profile_changed)
        state.current_changed.connect(lambda _i: self.schedule())

    @property
    def traced(self) -> bool:
        return self._traced

    def set_traced(self, on: bool) -> None:
        if on != self._traced:
            self._traced = on
            self.traced_changed.emit(on)
            self.schedule()

    def schedule(self) -> None:
        self._timer.start()

    def estimate_now(self) -> None:
        self._timer.stop()
        self._on_timer()

    def shutdown(self) -> None:
        self._timer.stop()
        self._runner.shutdown()

    def _on_profile_changed(self, _profile) -> None:
        self.schedule()

    def _on_timer(self) -> None:
        self._start(self._state.profile, "analytic")

    def _start(self, profile, method: str) -> None:
        self.status_changed.emit(f"estimating ({method})…")
        self._runner.start(lambda progress, should_stop: estimate(profile, method=method),
                           context=(profile, method))

    def _on_result(self, result) -> None:
        profile, method = self._runner.context
        self._state.set_estimate(profile, result)
        self.status_changed.emit("")
        if method == "analytic" and self._traced and profile == self._state.profile:
            self._start(profile, "traced")  # the analytic answer shows at once; the traced one replaces it

    def _on_failed(self, message: str) -> None:
        profile, method = self._runner.context
        if method == "analytic":  # a failed traced estimate keeps the analytic one on screen
            self._state.set_estimate(profile, None)
        self.status_changed.emit(message)
        if profile == self._state.profile:
            self._state.show_message("error", message)
