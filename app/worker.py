"""Running engine calls off the GUI thread (DESIGN rule 2, after Orange3's TaskState).

A *job* is a callable ``job(progress, should_stop) -> result``. ``TaskRunner`` owns one QThread with
one ``Worker`` on it and runs jobs there one after another; starting a job cancels the running one
first (its ``should_stop()`` turns True and its result, if any, is dropped). Exceptions never escape
the worker: ``BadInput`` and any other error become ``failed(message)``; ``Cancelled`` becomes
``cancelled``.
"""

from __future__ import annotations

import gc
import threading
import time
import traceback
from typing import Any, Callable

from PySide6.QtCore import QObject, QThread, Signal, Slot

Job = Callable[[Callable[[float, str], None], Callable[[], bool]], Any]

_IMPORT_LOCK = threading.Lock()
_warmed = False


def warm_imports() -> None:
    """Import torch and resolve transformers' lazy top-level names once, under a lock.

    transformers' lazy module is not thread-safe: two workers touching it for the first time at
    once can see a half-initialised name ("cannot import name PreTrainedTokenizerFast").
    """
    global _warmed
    if _warmed:
        return
    with _IMPORT_LOCK:
        if _warmed:
            return
        try:
            import torch  # noqa: F401
            import transformers

            for name in ("PreTrainedTokenizerFast", "AutoConfig", "AutoTokenizer", "CONFIG_MAPPING",
                         "AutoModelForCausalLM", "AutoModelForMaskedLM",
                         "AutoModelForSequenceClassification", "PretrainedConfig", "PreTrainedModel"):
                getattr(transformers, name, None)
            import transformers.models.auto.modeling_auto  # noqa: F401
        except Exception:  # noqa: BLE001 - the job itself will report what is missing
            pass
        # torch and transformers leave ~400k long-lived objects; every automatic full collection
        # would walk them all (~250 ms on 2 cores, the GUI thread frozen meanwhile). Moved to the
        # permanent generation, they are never walked again; they live as long as the app anyway.
        gc.freeze()
        _warmed = True


#: Progress signals are limited to this rate so a chatty engine cannot flood the GUI thread.
_PROGRESS_INTERVAL_S = 0.05


class Worker(QObject):
    """Lives on the runner's thread; runs one job per ``run`` call."""

    progress_changed = Signal(int, float, str)  # job id, fraction 0..1, message
    status_changed = Signal(int, str)  # job id, "running" | "done" | "failed" | "cancelled"
    result_ready = Signal(int, object)  # job id, result
    failed = Signal(int, str)  # job id, one-line message

    def __init__(self) -> None:
        super().__init__()
        self._stops: dict[int, threading.Event] = {}
        self._lock = threading.Lock()

    def stop_event(self, job_id: int) -> threading.Event:
        with self._lock:
            return self._stops.setdefault(job_id, threading.Event())

    @Slot(int, object)
    def run(self, job_id: int, job: Job) -> None:
        stop = self.stop_event(job_id)
        try:
            if stop.is_set():
                self.status_changed.emit(job_id, "cancelled")
                return
            self.status_changed.emit(job_id, "running")
            warm_imports()
            last = [0.0]

            def progress(fraction: float, message: str = "") -> None:
                now = time.monotonic()
                if fraction >= 1.0 or now - last[0] >= _PROGRESS_INTERVAL_S:
                    last[0] = now
                    self.progress_changed.emit(job_id, float(fraction), str(message))

            result = job(progress, stop.is_set)
            if stop.is_set():
                self.status_changed.emit(job_id, "cancelled")
                return
            self.result_ready.emit(job_id, result)
            self.status_changed.emit(job_id, "done")
        except BaseException as exc:  # noqa: BLE001 - exceptions never escape the worker
            from engine.errors import BadInput, Cancelled

            if isinstance(exc, Cancelled) or stop.is_set():
                self.status_changed.emit(job_id, "cancelled")
                return
            if isinstance(exc, BadInput):
                message = str(exc)
            else:
                message = f"{type(exc).__name__}: {exc}".splitlines()[0]
                traceback.print_exc()
            self.failed.emit(job_id, message)
            self.status_changed.emit(job_id, "failed")
        finally:
            with self._lock:
                self._stops.pop(job_id, None)


#: Threads whose job outlived ``TaskRunner.shutdown``'s wait; kept alive until they end.
_still_running: list[tuple[QThread, QObject]] = []


class TaskRunner(QObject):
    """One background thread for one kind of work (estimates, measurements, data statistics).

    Signals carry only the current job's events; a superseded job's events are dropped.
    """

    progress_changed = Signal(float, str)
    status_changed = Signal(str)
    result_ready = Signal(object)
    failed = Signal(str)
    running_changed = Signal(bool)

    _run_requested = Signal(int, object)

    def __init__(self, name: str, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._thread = QThread()
        self._thread.setObjectName(name)
        self._worker = Worker()
        self._worker.moveToThread(self._thread)
        self._run_requested.connect(self._worker.run)
        self._worker.progress_changed.connect(self._on_progress)
        self._worker.status_changed.connect(self._on_status)
        self._worker.result_ready.connect(self._on_result)
        self._worker.failed.connect(self._on_failed)
        self._thread.start()
        self._job_id = 0
        self._running = False
        self._context: Any = None

    # ----- public -------------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self._running

    @property
    def context(self) -> Any:
        """What the caller attached to the current job (e.g. the profile it is for)."""
        return self._context

    def start(self, job: Job, context: Any = None) -> int:
        """Cancel the running job, then queue ``job``; returns its id."""
        self.cancel()
        self._job_id += 1
        self._context = context
        self._worker.stop_event(self._job_id)  # exists before the job starts, so cancel works early
        self._set_running(True)
        self._run_requested.emit(self._job_id, job)
        return self._job_id

    def cancel(self) -> None:
        if self._running:
            self._worker.stop_event(self._job_id).set()
            self._set_running(False)
            self.status_changed.emit("cancelled")

    def shutdown(self, timeout_ms: int = 10000) -> None:
        """Cancel and stop the thread (call before the owner goes away)."""
        self.cancel()
        self._thread.quit()
        if not self._thread.wait(timeout_ms):
            # A job that does not check its stop event (a long tokenizer call) is still running:
            # keep the thread and its worker referenced, since destroying a running QThread aborts.
            _still_running[:] = [(t, w) for t, w in _still_running if t.isRunning()]
            _still_running.append((self._thread, self._worker))

    # ----- private ------------------------------------------------------------------------
    def _set_running(self, running: bool) -> None:
        if running != self._running:
            self._running = running
            self.running_changed.emit(running)

    def _on_progress(self, job_id: int, fraction: float, message: str) -> None:
        if job_id == self._job_id and self._running:
            self.progress_changed.emit(fraction, message)

    def _on_status(self, job_id: int, status: str) -> None:
        if job_id != self._job_id:
            return
        if status in ("done", "failed", "cancelled"):
            was_running = self._running
            self._set_running(False)
            if status == "cancelled" and not was_running:
                return  # cancel() already said so
        self.status_changed.emit(status)

    def _on_result(self, job_id: int, result: Any) -> None:
        if job_id == self._job_id and self._running:
            # Not running any more before anyone sees the result: Cancel must not stay enabled
            # beside a finished run until the worker's "done" status arrives.
            self._set_running(False)
            self.result_ready.emit(result)

    def _on_failed(self, job_id: int, message: str) -> None:
        if job_id == self._job_id and self._running:
            self._set_running(False)
            self.failed.emit(message)
