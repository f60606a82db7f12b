"""Live estimate: the analytic number at once, the traced one right after it, in the background.

Every profile edit cancels whatever estimate is running (its result would be for a profile that no
longer exists) and restarts a 150 ms single-shot timer; when it fires, the analytic estimate
(milliseconds) runs on a worker thread and is shown, labelled "analytic (refining…)", then the
traced estimate (one step on meta tensors, seconds; median error about 1% against measured runs)
runs and replaces it. The traced job checks ``should_stop`` between blocks and micro-batches, so
an edit stops it within one block's trace. Results land in the AppState for exactly the profile
they were computed for.
"""

from __future__ import annotations

from PySide6.QtCore import QObject, QTimer, Signal

from app.state import AppState
from app.worker import TaskRunner
from engine.estimate import estimate

DEBOUNCE_MS = 150


class EstimateController(QObject):
    estimating_changed = Signal(bool)
    status_changed = Signal(str)  # a one-line state of the estimate ("" when fine)
    pending_changed = Signal(bool)  # a newer estimate of the selected profile is on its way

    def __init__(self, state: AppState, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._state = state
        self._pending = False
        self._chained = False  # an analytic result is being shown and its traced run follows
        self.traced_error = ""  # why the selected profile's traced estimate failed ("" if it did not)
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(DEBOUNCE_MS)
        self._timer.timeout.connect(self._on_timer)
        self._runner = TaskRunner("estimate", self)
        self._runner.result_ready.connect(self._on_result)
        self._runner.failed.connect(self._on_failed)
        self._runner.running_changed.connect(self.estimating_changed)
        self._runner.running_changed.connect(lambda _r: self._update_pending())
        state.profile_changed.connect(self._on_profile_changed)
        state.current_changed.connect(lambda _i: self.schedule())

    @property
    def pending(self) -> bool:
        """An estimate of the selected profile is scheduled or running (the shown one will change)."""
        return self._pending

    @property
    def running_method(self) -> str:
        """"analytic" or "traced" while that estimate runs, else ""."""
        return self._runner.context[1] if self._runner.is_running and self._runner.context else ""

    def schedule(self) -> None:
        # An edit makes a running estimate stale: stop it now rather than when the timer fires.
        self._runner.cancel()
        self.traced_error = ""
        self._timer.start()
        self._update_pending()

    def estimate_now(self) -> None:
        self._timer.stop()
        self._on_timer(force=True)

    def shutdown(self) -> None:
        self._timer.stop()
        self._runner.shutdown()

    def _update_pending(self) -> None:
        pending = self._timer.isActive() or self._runner.is_running or self._chained
        if pending != self._pending:
            self._pending = pending
            self.pending_changed.emit(pending)

    def _on_profile_changed(self, _profile) -> None:
        self.schedule()

    def _on_timer(self, force: bool = False) -> None:
        entry = self._state.current
        fresh = entry.estimate is not None and entry.estimate_for == entry.profile
        if not force and fresh and entry.estimate.method == "traced":
            self._update_pending()  # another profile selected, already traced: nothing to do
        elif not force and fresh:
            self._start(entry.profile, "traced")
        else:
            self._start(entry.profile, "analytic")

    def _start(self, profile, method: str) -> None:
        self.status_changed.emit("refining the estimate (traced)…" if method == "traced"
                                 else "estimating (analytic)…")
        self.traced_error = ""
        self._runner.start(lambda progress, should_stop: estimate(profile, method=method, progress=progress,
                                                                  should_stop=should_stop),
                           context=(profile, method))
        self._update_pending()

    def _on_result(self, result) -> None:
        profile, method = self._runner.context
        current = profile == self._state.profile
        self._chained = method == "analytic" and current  # the view labels it "refining…"
        self._update_pending()
        try:
            self._state.set_estimate(profile, result)
            self.status_changed.emit("")
            if self._chained:
                self._start(profile, "traced")  # the analytic answer shows at once; the traced one replaces it
        finally:
            self._chained = False
            self._update_pending()

    def _on_failed(self, message: str) -> None:
        profile, method = self._runner.context
        current = profile == self._state.profile
        if method == "analytic":
            self._state.set_estimate(profile, None)
            if current:
                self._state.show_message("error", message)
            self.status_changed.emit(message)
        else:
            # a failed traced estimate keeps the analytic one on screen, saying why it stays
            self.status_changed.emit(f"traced estimate failed: {message}")
            if current:
                self.traced_error = message
                self._update_pending()
                self.pending_changed.emit(self._pending)  # the view says why the analytic one stays
                return
        self._update_pending()
