"""Drive a measured run in a child process: the engine's own ``measure`` command.

    proc = MeasureProcess(profile)              # starts `python -m engine measure <tmp.json> --json --progress`
    for event in proc.events():                 # MeasureEvent(kind="progress"|"result"|"error", ...)
        ...
    proc.cancel()                               # SIGTERM to the child's process group, SIGKILL after 1.5 s

    result = measure_in_child(profile, progress=cb, should_stop=fn)   # the same, as one call

Why a child: an out-of-memory error, a poisoned CUDA context or a crash cannot take the caller down,
``PYTORCH_CUDA_ALLOC_CONF`` takes effect before CUDA starts, every run starts from a clean device,
and cancelling means ending the process. The child runs in its own session so ``cancel`` ends it and
anything it started. Exit 0 -> result; 3 -> an OOM result; 2 -> ``BadInput`` with the child's one-line
message; 130 -> ``Cancelled``; anything else (a crash) -> ``MeasureFailed`` with the last stderr line.

This module does not import torch: the app's worker thread uses it.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from engine.errors import BadInput, Cancelled
from engine.measure import child_guard

#: The folder holding the ``engine`` package this process runs (site-packages, or a checkout).
ENGINE_HOME = Path(__file__).resolve().parent.parent.parent
#: Seconds between SIGTERM and SIGKILL when cancelling.
TERMINATE_GRACE_S = 1.5
_ERROR_PREFIX = "headroom: error: "


class MeasureFailed(RuntimeError):
    """The child process crashed (not a user mistake, not an out-of-memory)."""


@dataclass(frozen=True)
class MeasureEvent:
    kind: str  # "progress" | "result" | "error"
    fraction: float = 0.0  # progress in [0, 1]
    message: str = ""  # progress message, or the error's one line
    result: Any = None  # MeasureResult for kind == "result"
    error: BaseException | None = None  # the exception to raise for kind == "error"


def _child_env(profile) -> dict[str, str]:
    env = dict(os.environ)
    # The child imports the engine this process runs. An installed one it finds anyway; a plain
    # checkout (PYTHONPATH=. or started from its root) is named absolutely, so neither the cwd nor a
    # relative PYTHONPATH decides what the child imports.
    if str(ENGINE_HOME) not in _site_dirs():
        paths = [str(ENGINE_HOME)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    from engine import techniques

    if techniques.plugin_path():  # techniques found beyond the package (a plugin, a test's toy)
        env[techniques.PATH_ENV] = techniques.plugin_path()
    for hooks in techniques.process_hooks():  # the allocator's configuration, read when CUDA starts
        if hooks.environment is not None:
            try:
                env = hooks.environment(profile, env)
            except Exception:  # noqa: BLE001 - the child sets it again and reports problems itself
                pass
    return env


def _site_dirs() -> set[str]:
    import site
    import sysconfig

    dirs = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    return {str(Path(d).resolve()) for d in dirs}


class MeasureProcess:
    """One measured run in a child process; read its events, or cancel it."""

    def __init__(self, profile, *, snapshot: str | None = None, python: str | None = None,
                 start: bool = True):
        from engine import profile as profile_mod

        self.profile = profile_mod.validate(profile)
        if self.profile.nodes > 1:  # refused before torchrun starts N ranks to say the same
            raise BadInput(f"HSDP over {self.profile.nodes} nodes is planned on paper: a measured "
                           f"run uses one node (set nodes = 1)")
        self.snapshot = snapshot
        self.python = python or sys.executable
        self.returncode: int | None = None
        self.result = None  # the MeasureResult, once known
        self.error: BaseException | None = None
        self.cancelled = False
        self._proc: subprocess.Popen | None = None
        self._lines: queue.Queue = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=50)
        self._threads: list[threading.Thread] = []
        self._tmpdir: tempfile.TemporaryDirectory | None = None
        self._done = False
        if start:
            self.start()

    # ----- lifecycle -----------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def command(self, profile_path: str) -> list[str]:
        # -P: the cwd is not put on the child's sys.path, so a folder named engine there is not imported.
        cmd = [self.python, "-P", "-m", "engine", "measure", profile_path, "--json", "--progress"]
        if self.profile.shard != "none":  # one engine measure per rank, under torchrun
            from engine.distributed import launch_command

            cmd = launch_command(self.python, profile_path, self.profile.gpus,
                                 ["--json", "--progress"])
        if self.snapshot:
            cmd += ["--snapshot", str(self.snapshot)]
        from engine import remote_code

        if remote_code.profile_granted(self.profile):  # the user's consent, passed on by hand
            cmd.append("--trust-remote-code")
        return cmd

    def start(self) -> None:
        if self._proc is not None:
            return
        from engine import profile as profile_mod

        # The child removes this folder itself if this process dies first (child_guard).
        self._tmpdir = tempfile.TemporaryDirectory(prefix=child_guard.TMPDIR_PREFIX,
                                                   ignore_cleanup_errors=True)
        path = os.path.join(self._tmpdir.name, "profile.json")
        profile_mod.atomic_write_text(path, profile_mod.dumps(self.profile))
        env = _child_env(self.profile)
        kwargs: dict[str, Any] = {}
        if os.name == "posix":
            kwargs["start_new_session"] = True  # its own process group: cancel ends all of it
            # stdin: a pipe never written; its end-of-file tells the child this process is gone.
            env.update({child_guard.ENV_WATCH: "1", child_guard.ENV_PARENT_PID: str(os.getpid()),
                        child_guard.ENV_TMPDIR: self._tmpdir.name})
        else:  # pragma: no cover - Windows
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
        self._proc = subprocess.Popen(self.command(path), env=env,
                                      stdin=subprocess.PIPE if os.name == "posix" else subprocess.DEVNULL,
                                      stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, encoding="utf-8",
                                      errors="replace", bufsize=1, **kwargs)
        for name, stream in (("stdout", self._proc.stdout), ("stderr", self._proc.stderr)):
            t = threading.Thread(target=self._pump, args=(name, stream), daemon=True,
                                 name=f"headroom-measure-{name}")
            t.start()
            self._threads.append(t)

    def _pump(self, name: str, stream) -> None:
        try:
            for line in stream:
                if name == "stdout":
                    self._lines.put(line)
                else:
                    text = line.rstrip("\n").replace("\r", "")
                    if text.strip():
                        self._stderr.append(text)
        except (OSError, ValueError):
            pass
        finally:
            if name == "stdout":
                self._lines.put(None)

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def cancel(self, grace_s: float = TERMINATE_GRACE_S) -> None:
        """End the child (and its process group): SIGTERM, then SIGKILL after ``grace_s``; wait."""
        proc = self._proc
        if proc is None:
            return
        self.cancelled = True
        if proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        # The group may hold grandchildren even when the child itself has ended.
        self._signal(getattr(signal, "SIGKILL", signal.SIGTERM))
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - the kernel did not deliver SIGKILL
            pass
        self._finish()

    def _signal(self, sig) -> None:
        proc = self._proc
        try:
            if os.name == "posix":
                os.killpg(proc.pid, sig)
            elif sig == signal.SIGTERM:  # pragma: no cover
                proc.terminate()
            else:  # pragma: no cover
                proc.kill()
        except (ProcessLookupError, PermissionError, OSError):
            pass

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        if self._proc is not None:
            self.returncode = self._proc.poll()
            for stream in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
                try:
                    if stream is not None:
                        stream.close()
                except OSError:
                    pass
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def __enter__(self) -> "MeasureProcess":
        return self

    def __exit__(self, *exc) -> None:
        if self.is_running():
            self.cancel()
        self._finish()

    def __del__(self):  # never leave a child behind
        try:
            if self.is_running():
                self.cancel(grace_s=0.2)
        except Exception:  # noqa: BLE001
            pass

    # ----- reading -------------------------------------------------------------------------
    @property
    def stderr_tail(self) -> list[str]:
        return list(self._stderr)

    def events(self, should_stop: Callable[[], bool] | None = None,
               poll_s: float = 0.1) -> Iterator[MeasureEvent]:
        """Progress events as they arrive, then one final "result" or "error" event.

        With ``should_stop``, it is polled every ``poll_s`` seconds; when it turns True the child is
        cancelled and ``Cancelled`` is raised.
        """
        if self._proc is None:
            self.start()
        result_line: dict[str, Any] | None = None
        while True:
            if should_stop is not None and should_stop():
                self.cancel()
                raise Cancelled("measure cancelled")
            try:
                line = self._lines.get(timeout=poll_s)
            except queue.Empty:
                continue
            if line is None:
                break
            line = line.strip()
            if not line.startswith("{"):
                continue  # a library's stray print
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "progress" in obj and "peak_allocated_bytes" not in obj:
                yield MeasureEvent("progress", float(obj.get("progress", 0.0)), str(obj.get("message", "")))
            else:
                result_line = obj
        # stdout closed: the child is ending.
        while self._proc.poll() is None:
            if should_stop is not None and should_stop():
                self.cancel()
                raise Cancelled("measure cancelled")
            time.sleep(0.02)
        for t in self._threads:
            t.join(timeout=2)
        code = self._proc.returncode
        self._finish()
        yield self._final_event(code, result_line)

    def _final_event(self, code: int, obj: dict[str, Any] | None) -> MeasureEvent:
        from engine.results import MeasureResult

        last = self._stderr[-1] if self._stderr else ""
        if self.profile.shard != "none":
            last = _torchrun_cause(self._stderr) or last
        if self.cancelled:
            self.error = Cancelled("measure cancelled")
        elif code in (0, 3) and obj is not None:
            try:
                self.result = MeasureResult.from_dict(obj)
                return MeasureEvent("result", 1.0, "out of memory" if self.result.oom else "done",
                                    result=self.result)
            except (TypeError, ValueError, KeyError) as exc:
                self.error = MeasureFailed(f"unreadable result from the measure process: {exc}")
        elif code == 2 or (code == 1 and self.profile.shard != "none" and any(
                line.startswith(_ERROR_PREFIX) for line in self._stderr)):
            # under torchrun a rank's exit 2 comes back as torchrun's 1: the rank's line tells
            last = next((line for line in reversed(self._stderr) if line.startswith(_ERROR_PREFIX)),
                        last)
            msg = last[len(_ERROR_PREFIX):] if last.startswith(_ERROR_PREFIX) else last
            self.error = BadInput(msg or "the measure process rejected the profile")
        elif code == 130:
            self.error = Cancelled("measure cancelled")
        else:
            how = f"exit status {code}" if code is not None and code >= 0 else f"signal {-(code or 0)}"
            self.error = MeasureFailed(f"the measure process failed ({how})" + (f": {last}" if last else ""))
        return MeasureEvent("error", 1.0, str(self.error), error=self.error)

    def wait(self, progress: Callable[[float, str], None] | None = None,
             should_stop: Callable[[], bool] | None = None):
        """Consume the events; return the MeasureResult or raise the error."""
        for event in self.events(should_stop=should_stop):
            if event.kind == "progress" and progress is not None:
                progress(event.fraction, event.message)
            elif event.kind == "result":
                return event.result
            elif event.kind == "error":
                raise event.error
        raise MeasureFailed("the measure process ended without a result")  # pragma: no cover


def measure_in_child(profile, progress: Callable[[float, str], None] | None = None,
                     should_stop: Callable[[], bool] | None = None, snapshot: str | None = None):
    """``run_measure`` in a fresh child process: a MeasureResult (OOM included) or an exception."""
    with MeasureProcess(profile, snapshot=snapshot) as proc:
        return proc.wait(progress=progress, should_stop=should_stop)


def _torchrun_cause(lines: list[str]) -> str:
    """The line of a failed torchrun's stderr that says why: torchrun ends with a banner of
    '=' and a ChildFailedError summary; a rank's exception line (``[rank1]: SomeError: ...``)
    says more."""
    import re

    error = re.compile(r"^\s*(\[rank\d+\]:\s*)?[\w.]*(Error|Exception)\b.*:")
    picks = [lambda ln: ln.lstrip().startswith("[rank") and error.match(ln),
             lambda ln: error.match(ln) and "ChildFailedError" not in ln,
             lambda ln: ln.strip() and not set(ln.strip()) <= set("=-*")]
    for pick in picks:
        for line in reversed(lines):
            if pick(line):
                return line.strip()
    return ""
