"""Screenshots of Headroom's main views, offscreen, into docs/screenshots/*.png.

    .venv/bin/python scripts/screenshots.py

main.png (README): GPT-2 on the built-in sample for a 24 GiB GPU; main-1366x768.png and
main-1024x768.png: the same window at two laptop sizes; estimate.png: the estimate view
alone; layers.png: its per-layer breakdown; dataset.png: the length histogram; techniques.png: the
whole technique panel (one explanation opened); measured.png: after a real measured run of
tiny-gpt2 on this CPU; oom.png: the same model under a simulated 40 MiB capacity, ending out of
memory; compare.png: three tiny-gpt2 profiles, each measured; dark.png: the dark palette.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAPTOP_SIZES = ((1366, 768), (1024, 768))
OUT = ROOT / "docs" / "screenshots"
sys.path.insert(0, str(ROOT))

_tmp = Path(tempfile.mkdtemp(prefix="headroom-shots-"))
_screen = _tmp / "screen.json"
_screen.write_text(json.dumps({"screens": [{"name": "shot", "x": 0, "y": 0, "width": 1920, "height": 1200,
                                            "logicalDpi": 96, "logicalBaseDpi": 96, "dpr": 1}]}))
os.environ["QT_QPA_PLATFORM"] = f"offscreen:configfile={_screen}"
os.environ["HEADROOM_SETTINGS_DIR"] = str(_tmp / "settings")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from PySide6.QtWidgets import QApplication  # noqa: E402

from app.theme import apply_theme  # noqa: E402
from engine.profile import Profile  # noqa: E402


def pump(app: QApplication, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.01)


def wait(app: QApplication, condition, timeout: float = 180.0, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise SystemExit(f"timed out waiting for {what}")
        app.processEvents()
        time.sleep(0.02)
    pump(app, 0.3)


def idle(w) -> bool:
    return not (w.model_panel._runner.is_running or w.dataset_panel._runner.is_running
                or w.estimator._runner.is_running or w.estimator._timer.isActive()
                or w.compare_view._runner.is_running or w.target_panel._runner.is_running)


def save(widget, name: str) -> None:
    path = OUT / name
    widget.grab().save(str(path))
    print(f"wrote {path.relative_to(ROOT)} ({widget.width()}x{widget.height()})")


def measure(app, w) -> None:
    done = []
    w.run_panel.run_finished.connect(done.append)
    w.run_panel.start()
    wait(app, lambda: done, 600, "the measured run")
    w.run_panel.run_finished.disconnect()
    w.run_panel.run_finished.connect(w._on_run_finished)


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    app = QApplication(sys.argv[:1])
    app.setApplicationName("Headroom")
    apply_theme(app, dark="--dark" in sys.argv)
    from app.main_window import MainWindow

    w = MainWindow()  # the default profile: gpt2, built-in sample, cuda, 24 GiB
    w.run_panel.ask_before_slow_runs = False
    w.profiles.ask_before_delete = False
    w.resize(1400, 900)
    w.show()
    wait(app, lambda: idle(w), what="model facts, dataset statistics and the estimate")
    save(w, "main.png")
    for width, height in LAPTOP_SIZES:  # the layout at common laptop sizes: nothing overlaps
        w.resize(width, height)
        pump(app, 0.5)
        save(w, f"main-{width}x{height}.png")
    w.resize(1400, 900)
    pump(app, 0.5)
    save(w.tabs, "estimate.png")
    dialog = w.estimate_view.show_layers()
    if dialog is not None:
        dialog.resize(700, 520)
        pump(app, 0.3)
        save(dialog, "layers.png")
        dialog.close()
    w.tabs.setCurrentWidget(w.dataset_panel)
    pump(app, 0.3)
    save(w, "dataset.png")
    w.tabs.setCurrentIndex(0)

    note = w.techniques.notes()["checkpointing"]
    note.set_expanded(True)
    inner = w.techniques.widget()
    inner.resize(420, inner.sizeHint().height())
    pump(app, 0.2)
    save(inner, "techniques.png")
    note.set_expanded(False)
    w.techniques.widget().resize(w.techniques.viewport().width(), inner.sizeHint().height())

    # a measured run of a tiny model on this CPU
    w.state.add(Profile(name="tiny-gpt2 fp32", model="tiny-gpt2", target="cpu", batch=8, seq=128, steps=4))
    wait(app, lambda: idle(w), what="estimate of tiny-gpt2")
    measure(app, w)
    save(w, "measured.png")

    # the same model under a simulated 40 MiB capacity: the run ends out of memory, as a result
    w.state.duplicate()
    w.state.update(name="tiny-gpt2 under 40 MiB", memory_cap_bytes=40 * 1024**2)
    wait(app, lambda: idle(w), what="estimate")
    measure(app, w)
    save(w, "oom.png")
    w.state.delete(w.state.current_index)
    w.state.select(1)

    # two more tiny profiles, measured, then the comparison
    w.state.duplicate()
    w.state.update(name="tiny-gpt2 checkpointing", checkpointing=True)
    wait(app, lambda: idle(w), what="estimate")
    measure(app, w)
    w.state.duplicate()
    w.state.update(name="tiny-gpt2 dynamic padding", checkpointing=False, padding="dynamic")
    wait(app, lambda: idle(w), what="estimate")
    measure(app, w)
    w.state.delete(0)  # the GPT-2 profile is on another scale; compare the tiny ones
    w.tabs.setCurrentWidget(w.compare_view)
    wait(app, lambda: idle(w), what="compare estimates")
    save(w, "compare.png")

    apply_theme(app, dark=True)
    w.tabs.setCurrentIndex(0)
    pump(app, 0.5)
    save(w, "dark.png")
    w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
