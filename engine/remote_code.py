"""Consent to run a model folder's own Python code (transformers' ``trust_remote_code``).

A profile may *remember* that its model needs the folder's code (``Profile.trust_remote_code``), but
a file never grants it: a profile is data anyone can hand over, and ``auto_map`` code runs with the
user's rights. Consent comes only from the user's own hand in this session, the CLI flag
``--trust-remote-code`` or the app's confirmation dialog, and is held here, per process, as a set of
resolved folders. The model loaders run a folder's code only when the profile asks for it *and* the
folder was granted (``allowed``); a measure child receives the grant as its command-line flag.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_LOCK = threading.Lock()
_GRANTED: set[str] = set()


def _key(folder: str | os.PathLike) -> str:
    return str(Path(folder).expanduser().resolve())


def grant(folder: str | os.PathLike) -> None:
    """The user allowed this folder's code to run (for the rest of this process)."""
    with _LOCK:
        _GRANTED.add(_key(folder))


def revoke(folder: str | os.PathLike) -> None:
    with _LOCK:
        _GRANTED.discard(_key(folder))


def revoke_all() -> None:
    with _LOCK:
        _GRANTED.clear()


def is_granted(folder: str | os.PathLike) -> bool:
    with _LOCK:
        return _key(folder) in _GRANTED


def allowed(folder: str | os.PathLike, requested: bool) -> bool:
    """Whether code from ``folder`` may run: the profile asks (``requested``) and the user granted it."""
    return bool(requested) and is_granted(folder)


def model_folders(profile) -> list[Path]:
    """The local folders of the profile's models (student and teacher) whose code it could run.

    Presets and the packaged MiniLM are Headroom's own files; a Hub id's code never runs (nor is
    anything fetched here: the app asks on its GUI thread); names that resolve to nothing are left
    to the loaders' own errors.
    """
    from engine import techniques
    from engine.errors import BadInput
    from engine.models import resolve, source_kind

    out: list[Path] = []
    others = [n for t in techniques.active(profile) if t.model_names for n in t.model_names(profile)]
    for name in (profile.model, *others):
        if not name or source_kind(name) != "folder":
            continue
        try:
            source = resolve(name)
        except BadInput:
            continue
        if source.kind not in ("preset", "minilm"):
            out.append(source.folder)
    return out


def grant_profile(profile) -> list[Path]:
    """Grant every model folder of ``profile`` (what ``--trust-remote-code`` means); the folders."""
    folders = model_folders(profile)
    for folder in folders:
        grant(folder)
    return folders


def profile_granted(profile) -> bool:
    """The profile asks for its folders' code and every one of them was granted in this process."""
    folders = model_folders(profile)
    return bool(profile.trust_remote_code) and bool(folders) and all(is_granted(f) for f in folders)


def python_files(folder: str | os.PathLike) -> list[str]:
    """The Python files a folder holds (what the confirmation dialog names), sorted, relative."""
    root = Path(folder)
    try:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*.py") if p.is_file())[:200]
    except OSError:
        return []
