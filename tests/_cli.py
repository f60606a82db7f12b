"""Run the CLI in this process with captured streams (fast), or as a subprocess (exact stderr)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_cli(argv, cwd=None) -> tuple[int, str, str]:
    """``engine.cli.main(argv)`` in ``cwd``; (exit status, stdout, stderr)."""
    from engine.cli import main

    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in argv])
            except SystemExit as exc:  # pragma: no cover - main returns its status
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(old)
    return code, out.getvalue(), err.getvalue()


def run_cli_process(argv, cwd=None, env=None, timeout=120) -> subprocess.CompletedProcess:
    """``python -m engine ARGV`` as a child process (sees every line any library prints)."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in full_env.get("PYTHONPATH", "").split(os.pathsep) if p])
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "engine", *[str(a) for a in argv]], cwd=cwd or ROOT,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and mtime: equal snapshots = nothing written."""
    out = {}
    for path in sorted(Path(folder).rglob("*")):
        st = path.lstat()
        out[str(path.relative_to(folder))] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return out
