"""The `headroom` console entry point: no arguments opens the app, anything else is the CLI."""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv:
        from engine import cli

        try:  # comparison PNGs are drawn with the app's plotting code when Qt is present
            from app.compare_png import render_compare_png

            cli.png_renderer = render_compare_png
        except ImportError:
            pass
        return cli.main(argv)
    from app.main import run_app

    return run_app()


if __name__ == "__main__":
    sys.exit(main())
