"""A measure child never outlives its parent, and takes its temp folder with it.

``MeasureProcess`` starts the child with its stdin on a pipe it never writes, in a new session (the
child leads its own process group), and names in the environment the temp folder holding the
child's profile. The child, first thing (``python -m engine`` calls ``guard_from_env``):

* watches that pipe from a daemon thread: end-of-file means the parent is gone, however it ended
  (SIGKILL included: the kernel closes a dead process's descriptors);
* on Linux also asks for SIGTERM when the parent dies (``prctl(PR_SET_PDEATHSIG)``), which reaches
  it even before the pipe's end-of-file is read;
* handles SIGTERM (the parent's cancel, or that parent-death signal) and the end-of-file alike:
  remove the temp folder, then SIGKILL its whole process group (itself and anything it started,
  torchrun ranks included);
* removes the temp folder when it exits on its own as well (at exit: a dead parent's pipes make
  the next progress line fail, and that exit can come before either signal path runs).

A parent's SIGTERM handler or ``cancel`` still ends the group from outside; this module covers
parents that die without a word.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import sys
import threading

ENV_WATCH = "HEADROOM_PARENT_WATCH"  # "1": stdin is the parent's pipe
ENV_PARENT_PID = "HEADROOM_PARENT_PID"  # the parent's pid when it started the child
ENV_TMPDIR = "HEADROOM_CHILD_TMPDIR"  # temp folder of this run, removed when the child goes
TMPDIR_PREFIX = "headroom-measure-"  # only folders named like this are ever removed

_PR_SET_PDEATHSIG = 1
_ending = threading.Lock()
_tmpdir: str | None = None
_parent_pid = 0


def _remove_tmpdir() -> None:
    if _tmpdir and os.path.basename(os.path.normpath(_tmpdir)).startswith(TMPDIR_PREFIX):
        shutil.rmtree(_tmpdir, ignore_errors=True)


def _at_exit() -> None:
    _remove_tmpdir()
    if _parent_pid and os.getppid() != _parent_pid and os.getpgrp() == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)  # the parent is gone: take any grandchildren along


def end_now(code: int = 143) -> None:
    """Remove the temp folder and end this process's group (or just this process)."""
    if not _ending.acquire(blocking=False):
        return  # the other path (signal or pipe) is already ending the process
    try:
        _remove_tmpdir()
    finally:
        try:
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass
        if os.getpgrp() == os.getpid():  # the group is ours alone (start_new_session)
            os.killpg(os.getpid(), signal.SIGKILL)
        os._exit(code)


def _on_sigterm(signum, frame) -> None:
    end_now(128 + signum)


def _watch_stdin() -> None:
    try:
        while os.read(0, 4096):
            pass  # the parent writes nothing; anything it does write is ignored
    except OSError:
        pass
    end_now(129)


def _set_parent_death_signal() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - no libc prctl: the pipe watch remains
        pass


def guard_from_env() -> bool:
    """Install the guard when started by ``MeasureProcess``; True if installed."""
    global _tmpdir, _parent_pid
    if os.environ.pop(ENV_WATCH, "") != "1" or os.name != "posix":
        return False
    _tmpdir = os.environ.pop(ENV_TMPDIR, "") or None
    expected_parent = os.environ.pop(ENV_PARENT_PID, "")
    _parent_pid = int(expected_parent) if expected_parent.isdigit() else 0
    signal.signal(signal.SIGTERM, _on_sigterm)
    atexit.register(_at_exit)
    _set_parent_death_signal()
    # The parent may have died before prctl took effect; then no signal would ever come.
    if _parent_pid and os.getppid() != _parent_pid:
        end_now(129)
    threading.Thread(target=_watch_stdin, name="headroom-parent-watch", daemon=True).start()
    return True
