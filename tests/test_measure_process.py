"""The measured run as a child process: progress lines, OOM exit 3 as a result, cancel, errors."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from engine.errors import BadInput
from engine.measure import MeasureProcess, measure_in_child
from engine.profile import Profile


def _alive(pids):
    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_oom_in_the_child_is_a_result_with_progress_and_exit_3():
    profile = Profile(model="tiny-llama", target="cpu", batch=16, seq=256, steps=2,
                      memory_cap_bytes=12 * 2**20)
    proc = MeasureProcess(profile)
    events = list(proc.events())
    progress = [e for e in events if e.kind == "progress"]
    assert progress and progress[0].fraction == 0.0
    assert [e.fraction for e in progress] == sorted(e.fraction for e in progress)
    final = events[-1]
    assert final.kind == "result", final.message
    assert final.result.oom and final.result.oom_step == 0 and final.result.oom_phase
    assert proc.returncode == 3
    assert not any("Traceback" in line for line in proc.stderr_tail)


def test_cli_oom_exit_status_and_no_traceback():
    cmd = [sys.executable, "-m", "engine", "measure", "--model", "tiny-gpt2", "--target", "cpu",
           "--batch", "16", "--seq", "256", "--steps", "2", "--memory-cap", "8MiB", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr
    assert '"oom": true' in done.stdout


def test_cancel_ends_the_child_within_two_seconds_and_leaves_nothing():
    profile = Profile(model="tiny-llama", target="cpu", batch=4, seq=128, steps=10_000)
    proc = MeasureProcess(profile)
    events = proc.events()
    for event in events:  # wait until it really runs steps
        if event.kind == "progress" and event.message.startswith("step"):
            break
        assert event.kind == "progress", event.message
    pid = proc.pid
    family = [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    started = time.monotonic()
    proc.cancel()
    assert time.monotonic() - started < 2.0
    assert not _alive(family)
    assert proc.returncode is not None and proc.returncode != 0


def test_bad_input_in_the_child_is_bad_input_here():
    with pytest.raises(BadInput, match="exceeds tiny-gpt2's limit"):
        measure_in_child(Profile(model="tiny-gpt2", target="cpu", seq=4096))


def test_the_child_runs_this_engine_whatever_the_cwd_and_pythonpath(tmp_path, monkeypatch):
    """The child is ``sys.executable -P -m engine``: a folder named engine in the cwd is not what it
    imports, nor does it need the checkout as cwd or on PYTHONPATH."""
    decoy = tmp_path / "engine"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise SystemExit('imported the decoy engine')\n")
    (decoy / "__main__.py").write_text("raise SystemExit('ran the decoy engine')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", ".")  # relative: resolved against the cwd, where the decoy is
    with MeasureProcess(Profile(model="tiny-gpt2", target="cpu", seq=4096), start=False) as proc:
        assert proc.command("p.json")[:4] == [sys.executable, "-P", "-m", "engine"]
        with pytest.raises(BadInput, match="exceeds tiny-gpt2's limit"):
            proc.wait()


def test_should_stop_cancels_measure_in_child():
    from engine.errors import Cancelled

    started = time.monotonic()
    with pytest.raises(Cancelled):
        measure_in_child(Profile(model="tiny-llama", target="cpu", steps=10_000, batch=2, seq=32),
                         should_stop=lambda: time.monotonic() - started > 0.5)
    assert time.monotonic() - started < 3.0


def test_a_failed_torchrun_says_what_the_rank_raised():
    # torchrun's stderr ends with a '=' banner and a ChildFailedError summary; the message picks
    # the rank's own exception line, else the last line that is not a banner
    from engine.measure.process import _torchrun_cause

    lines = ["[rank1]: Traceback (most recent call last):",
             "[rank1]: RuntimeError: Connection reset by peer",
             "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
             "=" * 40, "engine FAILED", "=" * 40]
    assert _torchrun_cause(lines) == "[rank1]: RuntimeError: Connection reset by peer"
    assert _torchrun_cause(["something went wrong", "=" * 40]) == "something went wrong"
    assert _torchrun_cause([]) == ""
