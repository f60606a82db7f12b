"""The `headroom` console entry point: no arguments opens the app, anything else is the CLI.

``headroom --smoke`` opens the app, waits for the window's first estimate and quits: exit 0 only
when both happened (scripts/check_wheel.sh runs it offscreen on an installed wheel).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Sequence

#: Seconds --smoke waits for the window and its first estimate.
SMOKE_TIMEOUT_S = 120.0

NO_DISPLAY_HINT = ("headroom: no display (DISPLAY and WAYLAND_DISPLAY are unset): run it in a desktop "
                   "session, or set QT_QPA_PLATFORM=offscreen (no window), or start it under Xvfb "
                   "(xvfb-run headroom); the command line works anywhere: headroom estimate --help")


def display_missing(environ=None, platform: str | None = None) -> bool:
    """Linux without X11/Wayland and no Qt platform chosen: Qt would abort with a page of
    xcb plugin errors, so the launcher says what to do instead."""
    environ = os.environ if environ is None else environ
    if not (platform or sys.platform).startswith("linux"):
        return False
    return not any(environ.get(k) for k in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--smoke"]:
        return _smoke()
    if argv:
        from engine import cli

        try:  # comparison PNGs are drawn with the app's plotting code when Qt is present
            from app.compare_png import render_compare_png

            cli.png_renderer = render_compare_png
        except ImportError:
            pass
        return cli.main(argv)
    if display_missing():
        print(NO_DISPLAY_HINT, file=sys.stderr)
        return 2
    from app.main import run_app

    return run_app()


def _smoke(timeout_s: float = SMOKE_TIMEOUT_S) -> int:
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    from app.main import run_app
    from app.main_window import MainWindow
    from engine.units import format_bytes

    app = QApplication.instance() or QApplication(sys.argv[:1])
    started = time.monotonic()
    poll = QTimer(app)

    def check() -> None:
        shown = [w for w in app.topLevelWidgets() if isinstance(w, MainWindow) and w.isVisible()]
        estimate = shown[0].state.current.estimate if shown else None
        if estimate is not None:
            print(f"headroom --smoke: window shown, {shown[0].state.profile.model} estimated at "
                  f"{format_bytes(estimate.peak_allocated_bytes)} in {time.monotonic() - started:.1f} s",
                  flush=True)
            poll.stop()
            app.exit(0)
        elif time.monotonic() - started > timeout_s:
            print(f"headroom --smoke: no {'estimate' if shown else 'window'} after {timeout_s:.0f} s",
                  file=sys.stderr, flush=True)
            poll.stop()
            app.exit(1)

    poll.timeout.connect(check)
    poll.start(100)
    return run_app()


if __name__ == "__main__":
    sys.exit(main())
