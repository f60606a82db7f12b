"""Saving a file so that a crash never leaves half of it, and a save never surprises the user.

Write-then-rename (a temp file beside the target, fsynced, renamed over it, then the folder
fsynced so the rename itself survives a power cut). What a save will not do: create folders the
user did not ask for, replace a folder, a device or a read-only file, or change the mode of the file
it replaces. Temp files are named ``.NAME.XXXXXXXX.headroom-tmp``; one left by a killed save (SIGKILL
cannot be caught) is removed by the next save to the same folder once it is old enough that no save
in progress can own it.
"""

from __future__ import annotations

import os
import stat
import tempfile
import time
from pathlib import Path

from engine.errors import BadInput

TEMP_SUFFIX = ".headroom-tmp"
#: A temp file older than this belongs to no save in progress (a save takes milliseconds).
STALE_AFTER_S = 60.0


def _umask() -> int:
    """The process umask, read without changing it (os.umask() would race other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def remove_stale_temps(folder: Path, name: str) -> int:
    """Remove temp files of earlier, killed saves of ``name`` in ``folder``; how many."""
    removed = 0
    now = time.time()
    try:
        candidates = list(folder.glob(f".{name}.*{TEMP_SUFFIX}"))
    except OSError:
        return 0
    for tmp in candidates:
        try:
            if tmp.is_file() and not tmp.is_symlink() and now - tmp.stat().st_mtime > STALE_AFTER_S:
                tmp.unlink()
                removed += 1
        except OSError:
            pass
    return removed


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # not supported here (Windows): the file itself was fsynced
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _probe_folder(parent: Path, path: Path, make_parents: bool) -> None:
    """Can a new file be made there? (/proc, a read-only mount: say so before any work is done)."""
    if make_parents and not parent.exists():
        return
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=parent)
    except OSError as exc:
        raise BadInput(f"cannot write {path}: {exc.strerror or exc} (folder {parent})") from None
    os.close(fd)
    try:
        os.unlink(tmp)
    except OSError:
        pass


def check_target(path: Path, make_parents: bool = False) -> int | None:
    """BadInput unless ``path`` may be written; the mode to keep when it replaces a file."""
    parent = path.parent
    if path.name in ("", ".", ".."):
        raise BadInput(f"cannot write {path}: give a file name")
    if not make_parents and not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise BadInput(f"cannot write {path}: folder {parent} {what} (create it first)")
    try:
        st = path.lstat()
    except FileNotFoundError:
        _probe_folder(parent, path, make_parents)
        return None
    except OSError as exc:
        raise BadInput(f"cannot write {path}: {exc.strerror or exc}") from None
    if stat.S_ISLNK(st.st_mode):
        try:
            st = path.stat()
        except OSError:
            raise BadInput(f"cannot write {path}: it is a broken symbolic link") from None
    if stat.S_ISDIR(st.st_mode):
        raise BadInput(f"cannot write {path}: it is a folder; give a file name")
    if not stat.S_ISREG(st.st_mode):
        raise BadInput(f"cannot write {path}: it is not a regular file")
    if not os.access(path, os.W_OK) or not st.st_mode & 0o222:  # root passes access(): ask the mode too
        raise BadInput(f"cannot write {path}: it is read-only (left unchanged)")
    return stat.S_IMODE(st.st_mode)


def atomic_write_text(path: str | os.PathLike, text: str, *, make_parents: bool = False) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically; one-line BadInput when it cannot or must
    not be written. A symbolic link is followed: its target is replaced, the link stays."""
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    keep_mode = check_target(path, make_parents)
    parent = path.parent
    try:
        if make_parents:
            parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(parent, path.name)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=parent)
    except OSError as exc:
        raise BadInput(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp makes the file 0600; a save keeps the replaced file's mode, or the usual one.
        os.chmod(tmp, keep_mode if keep_mode is not None else 0o666 & ~_umask())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(parent)
    except OSError as exc:
        raise BadInput(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
