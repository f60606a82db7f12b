"""A Hugging Face cache laid out as huggingface_hub writes it, for tests without network.

    HF_HOME/hub/models--ORG--NAME/blobs/<sha256>            the files' bytes
    HF_HOME/hub/models--ORG--NAME/snapshots/<commit>/FILE   relative symlinks into blobs/
    HF_HOME/hub/models--ORG--NAME/refs/<branch>             the commit a branch points at
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from engine.data.tokens import FALLBACK_PATH
from engine.models import PRESET_DIR

QWEN_COMMIT = "060db6499f32faf8b98477b0a26969ef7d8b9987"


def add_repo(hf_home: Path, repo_id: str, files: dict[str, bytes | str | Path], *,
             commit: str = QWEN_COMMIT, branch: str | None = "main") -> Path:
    """Put ``files`` (name -> bytes, text or a file to copy) in the cache as commit ``commit`` of
    ``repo_id`` (and ``refs/branch`` -> it); the snapshot folder."""
    repo = Path(hf_home) / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, content in files.items():
        if isinstance(content, Path):
            content = content.read_bytes()
        elif isinstance(content, str):
            content = content.encode()
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            link.unlink()
        os.symlink(os.path.relpath(blob, link.parent), link)
    if branch is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / branch).write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


def preset_repo(hf_home: Path, repo_id: str, preset: str, *, tokenizer: Path | None = FALLBACK_PATH,
                commit: str = QWEN_COMMIT, branch: str | None = "main", **config_changes) -> Path:
    """A repository holding a bundled preset's config.json (changed by ``config_changes``) and a real
    tokenizer.json (Headroom's fallback BPE unless another is given; None: no tokenizer)."""
    config = json.loads((PRESET_DIR / preset / "config.json").read_text())
    config.update(config_changes)
    files: dict[str, bytes | str | Path] = {"config.json": json.dumps(config, indent=2)}
    if tokenizer is not None:
        files["tokenizer.json"] = tokenizer
    return add_repo(hf_home, repo_id, files, commit=commit, branch=branch)


def use_cache(monkeypatch, hf_home: Path) -> None:
    """Point this process's huggingface_hub (read at import) and any child at ``hf_home``, offline."""
    from huggingface_hub import constants

    from engine import hub

    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(Path(hf_home) / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(Path(hf_home) / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub._fetch.cache_clear()


def remove(hf_home: Path) -> None:
    shutil.rmtree(hf_home, ignore_errors=True)
