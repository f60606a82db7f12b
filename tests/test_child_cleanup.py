"""A measure child never outlives its parent: kill `headroom compare --measure` (SIGTERM or SIGKILL)
while its child runs, and 2 s later there is no child and no temp folder (engine/measure/child_guard)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.measure import child_guard

REPO_ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out += [int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _child_tmpdir(pid: int) -> str | None:
    """The measure child's temp folder, from its environment (None before it has exec'd)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    key = f"{child_guard.ENV_TMPDIR}=".encode()
    found = [e[len(key):].decode() for e in env if e.startswith(key)]
    return found[0] if found else None


def _guard_installed(pid: int) -> bool:
    """The exec'd child catches SIGTERM: child_guard is in place."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt")).split()[1], 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


#: The app's way: a worker thread (not the main thread) drives the child through measure_in_child.
_APP_LIKE_PARENT = """
import threading, time
from engine.measure import measure_in_child
from engine.profile import Profile
profile = Profile(model="tiny-llama", target="cpu", batch=2, seq=32, steps=100_000)
threading.Thread(target=lambda: measure_in_child(profile), daemon=True).start()
time.sleep(600)
"""


@pytest.mark.slow
@pytest.mark.parametrize("parent_kind, sig", [("compare", signal.SIGTERM), ("compare", signal.SIGKILL),
                                              ("worker-thread", signal.SIGKILL)],
                         ids=["compare-SIGTERM", "compare-SIGKILL", "worker-thread-SIGKILL"])
def test_killing_the_parent_leaves_no_child_and_no_temp_folder(tmp_path, parent_kind, sig):
    profile = tmp_path / "long.json"
    profile.write_text(json.dumps({"name": "long", "model": "tiny-llama", "target": "cpu", "batch": 2,
                                   "seq": 32, "steps": 100_000}))
    if parent_kind == "compare":
        cmd = [sys.executable, "-m", "engine", "compare", str(profile), "--measure"]
    else:
        cmd = [sys.executable, "-c", _APP_LIKE_PARENT]
    parent = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child = tmpdir = None
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and parent.poll() is None:
            for pid in _children(parent.pid):
                found = _child_tmpdir(pid)
                if found and _guard_installed(pid):
                    child, tmpdir = pid, found
            if child:
                break
            time.sleep(0.05)
        assert child is not None, f"no measure child appeared (parent exit {parent.poll()})"
        assert os.path.isdir(tmpdir)
        time.sleep(0.5)  # let it get into its run
        parent.send_signal(sig)
        parent.wait(timeout=10)
        time.sleep(2.0)
        assert not _alive(child), f"measure child {child} outlived its parent ({sig.name})"
        assert not os.path.exists(tmpdir), f"temp folder {tmpdir} left behind ({sig.name})"
    finally:
        if parent.poll() is None:
            parent.kill()
        if child and _alive(child):
            os.kill(child, signal.SIGKILL)
