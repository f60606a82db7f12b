"""What the app test modules share: a main window on a tiny CPU profile, and waiting until it is idle."""

from __future__ import annotations

from engine.profile import Profile


def tiny_main_window(qtbot, *, ask_before_slow_runs: bool | None = None):
    """A shown MainWindow on tiny-gpt2 (CPU, 2 x 32, 2 steps) that deletes profiles without asking.

    ``ask_before_slow_runs``: None leaves the run panel's default (the run guard's tests need it)."""
    from app.main_window import MainWindow

    w = MainWindow(Profile(name="tiny", model="tiny-gpt2", target="cpu", batch=2, seq=32, steps=2))
    qtbot.addWidget(w)
    w.show()
    if ask_before_slow_runs is not None:
        w.run_panel.ask_before_slow_runs = ask_before_slow_runs
    w.profiles.ask_before_delete = False
    return w


def wait_idle(qtbot, w, timeout=60000):
    """Until the model facts, dataset statistics and estimate workers are done."""
    qtbot.waitUntil(lambda: not (w.model_panel._runner.is_running or w.dataset_panel._runner.is_running
                                 or w.estimator._runner.is_running or w.estimator._timer.isActive()),
                    timeout=timeout)
