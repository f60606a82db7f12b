"""Hugging Face Hub model ids (``org/name`` or ``org/name@revision``): config and tokenizer only.

A Hub id is fetched through ``huggingface_hub`` into its normal cache (``HF_HOME``/``HF_HUB_CACHE``,
``HF_TOKEN`` for gated and private repositories, ``HF_HUB_OFFLINE=1`` for the cache alone), and only
the small files an estimate needs: ``config.json`` and the tokenizer's files (``SMALL_FILES``). The
snapshot folder is then read like any local model folder. Weights are fetched only by
``download_weights``, which a measured run calls when the profile asks for real weights; an estimate
never downloads them. Parameter counts and dtypes come from the safetensors headers
(``checkpoint_facts``: a ranged read of each header on the Hub, or the header of a file already in
the cache). No code from a repository ever runs: ``engine.remote_code`` grants local folders only.

Every failure is one BadInput line: a gated or private repository without a token, a repository or
revision that does not exist, no network, or (offline) a repository that is not in the cache.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

from engine.errors import BadInput, exception_line

#: What an estimate needs from a repository: the architecture and the tokenizer (a few MB at most).
SMALL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model",
               "spiece.model", "sentencepiece.bpe.model")
#: What a real-weights run adds: safetensors only (pickled ``.bin`` weights are never fetched).
WEIGHT_FILES = ("*.safetensors", "model.safetensors.index.json")

# org/name as the Hub spells it (huggingface_hub.utils.validate_repo_id has the finer rules), then
# an optional @revision: a branch, tag, commit or refs/pr/N.
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)"
                     r"(?:@(?P<revision>.*))?", re.ASCII)
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}", re.ASCII)


@dataclass(frozen=True)
class HubRef:
    repo_id: str  # "Qwen/Qwen2.5-0.5B"
    revision: str | None  # None = the default branch ("main")

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class Snapshot:
    ref: HubRef
    folder: Path  # the cache's snapshots/<commit> folder
    commit: str  # the commit the revision resolved to


@dataclass(frozen=True)
class CheckpointFacts:
    """What the safetensors headers say about the weights, without reading them."""

    params: int  # parameters stored in the checkpoint (all tensors)
    dtypes: dict[str, int]  # safetensors dtype ("BF16", "F32", ...) -> parameters stored in it
    source: str  # "hub" (ranged header reads) | "cache" or "folder" (a local file's header)

    def to_dict(self) -> dict:
        return {"params": self.params, "dtypes": dict(self.dtypes), "source": self.source}


def parse(name: str) -> HubRef | None:
    """The Hub id ``name`` spells, or None when it is not one (a path, a preset name).

    Only the grammar is checked, nothing is looked up: ``engine.models.resolve`` decides between an
    existing folder (which wins) and the Hub. A name that is a Hub id but has a broken revision
    (``org/name@``) is a BadInput, not a path."""
    m = _HUB_ID.fullmatch(name)
    if m is None:
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(m.group("repo"))
    except HFValidationError:
        return None
    revision = m.group("revision")
    if revision is not None and (not _REVISION.fullmatch(revision) or ".." in revision
                                 or revision.endswith(("/", ".lock"))):
        raise BadInput(f"not a Hub revision: {revision!r} in {name!r} (use org/name@BRANCH, "
                       f"@TAG or @COMMIT)")
    return HubRef(m.group("repo"), revision or None)


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cache_dir() -> str:
    """The cache huggingface_hub uses (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def fetch(ref: HubRef) -> Snapshot:
    """The snapshot folder holding ``ref``'s config.json and tokenizer files (downloaded if needed)."""
    return _fetch(ref, offline(), cache_dir())


@functools.lru_cache(maxsize=64)
def _fetch(ref: HubRef, is_offline: bool, cache: str) -> Snapshot:
    # Keyed by the offline switch and the cache too: a test or a user switching HF_HOME in-process
    # must not get another cache's folder. Errors are not cached (a retry after login works).
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

    if are_progress_bars_disabled("huggingface_hub"):
        folder = Path(_download(ref, list(SMALL_FILES)))
    else:
        # A few small files: progress bars would only be noise on stderr, which holds Headroom's
        # one-line errors (the weights' download keeps its bars: that one takes minutes).
        with disable_progress_bars("huggingface_hub"):
            folder = Path(_download(ref, list(SMALL_FILES)))
    if not (folder / "config.json").is_file():
        raise BadInput(f"Hub model {ref} has no config.json (Headroom needs a transformers model repository)")
    return Snapshot(ref, folder, folder.name)


def download_weights(snapshot: Snapshot) -> Path:
    """The snapshot folder with the safetensors weights too (downloads them: a real-weights run), at
    the commit the config was read from (a branch that moved meanwhile cannot mix the two)."""
    ref = HubRef(snapshot.ref.repo_id, snapshot.commit)
    folder = Path(_download(ref, list(SMALL_FILES) + list(WEIGHT_FILES)))
    if not any(folder.glob("*.safetensors")):
        raise BadInput(f"Hub model {ref} has no safetensors weights; Headroom never loads pickled "
                       f"(.bin) weights")
    return folder


def _download(ref: HubRef, patterns: list[str]) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"the local cache ({cache_dir()})"
    try:
        # token=None: huggingface_hub's own lookup (HF_TOKEN, else the saved `hf auth login`).
        return snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=patterns)
    except GatedRepoError:
        raise BadInput(f"Hub model {ref} is gated: accept its terms on huggingface.co and set HF_TOKEN "
                       f"(or run `hf auth login`)") from None
    except RepositoryNotFoundError:
        raise BadInput(f"Hub model {ref.repo_id} not found (a private one needs HF_TOKEN), and there is "
                       f"no folder of that name here") from None
    except RevisionNotFoundError:
        raise BadInput(f"revision {ref.revision!r} not found in Hub model {ref.repo_id}") from None
    except IncompleteSnapshotError:
        raise BadInput(f"Hub model {ref} is only partly in {where} and the Hub cannot be reached") from None
    except LocalEntryNotFoundError:
        if offline():
            raise BadInput(f"Hub model {ref} is not in {where} and HF_HUB_OFFLINE is set: fetch it once "
                           f"online, or unset HF_HUB_OFFLINE") from None
        raise BadInput(f"cannot reach the Hugging Face Hub for {ref}, and it is not in {where}") from None
    except HfHubHTTPError as exc:  # 401 with a bad token, 5xx: the Hub's own words, on one line
        raise BadInput(f"the Hub refused {ref}: {exception_line(exc, 160)}") from None
    except (OSError, ValueError) as exc:  # a read-only cache, a bad HF_TOKEN file, a malformed id
        raise BadInput(f"cannot fetch Hub model {ref}: {exception_line(exc, 160)}") from None


def local_checkpoint_facts(folder: Path, source: str) -> CheckpointFacts | None:
    """Counts from the headers of a folder's safetensors files (model.safetensors or the index's
    shards, all present); None when there are none or one is missing or broken."""
    from huggingface_hub import get_local_safetensors_metadata

    if not ((folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()):
        return None
    try:
        meta = get_local_safetensors_metadata(folder)
    except Exception:  # noqa: BLE001 - facts to show, not a gate: loading checks the weights itself
        return None
    return _facts(meta, source)


@functools.lru_cache(maxsize=64)
def _remote_checkpoint_facts(repo_id: str, commit: str) -> CheckpointFacts | None:
    from huggingface_hub import get_safetensors_metadata

    try:
        meta = get_safetensors_metadata(repo_id, revision=commit)  # ranged reads of the headers only
    except Exception:  # noqa: BLE001 - no safetensors, no network: the facts are just unknown
        return None
    return _facts(meta, "hub")


def checkpoint_facts(snapshot: Snapshot) -> CheckpointFacts | None:
    """Parameter count and dtypes of a Hub model's safetensors weights: from a cached file's header
    when the weights are in the cache, else (online) from ranged reads of the headers on the Hub."""
    local = local_checkpoint_facts(snapshot.folder, "cache")
    if local is not None or offline():
        return local
    return _remote_checkpoint_facts(snapshot.ref.repo_id, snapshot.commit)


def _facts(meta, source: str) -> CheckpointFacts | None:
    counts: dict[str, int] = {}
    for file_meta in meta.files_metadata.values():
        for dtype, n in file_meta.parameter_count.items():
            counts[dtype] = counts.get(dtype, 0) + int(n)
    if not counts:
        return None
    return CheckpointFacts(sum(counts.values()), dict(sorted(counts.items())), source)
