"""What an exported script needs to know that a profile only names: resolved at export time.

The model's config (presets are inlined as a dict literal), the folder of a local model or the
repository and commit of a Hub id, whether it has safetensors weights to load and a tokenizer, the task head, the fallback tokenizer's path,
the dataset's kind, its text column and the .txt layout. Reading these here keeps the script free of
Headroom: it carries the answers, not the code that found them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import safe_json
from engine.errors import BadInput
from engine.profile import Profile

#: Texts read from the dataset (as ``engine.data.DEFAULT_LIMIT``).
TEXT_LIMIT = 20_000


@dataclass(frozen=True)
class ModelFacts:
    name: str  # what the profile says (preset, "minilm", folder, Hub id)
    kind: str  # preset | folder | minilm | hub
    folder: str  # absolute folder (for folders and minilm; a Hub id's cached snapshot)
    model_type: str  # transformers model_type
    config: dict[str, Any]  # config.json without model_type (presets: inlined in the script)
    task: str  # causal-lm | masked-lm | classification
    has_weights: bool  # safetensors to load (a Hub id: when the profile asks): from_pretrained, else random init
    has_tokenizer: bool  # the model's own tokenizer, else Headroom's fallback
    max_positions: int  # position limit (0 = none)
    hub_id: str = ""  # a Hub id's repository ("org/name"): the script fetches config and tokenizer
    hub_commit: str = ""  # the commit Headroom planned with (the script pins it)


@dataclass(frozen=True)
class DataFacts:
    kind: str  # builtin | txt | csv | tsv | jsonl | parquet
    path: str  # absolute path of the file ("" for builtin)
    column: str | None  # text column (None: .txt, builtin, or a .jsonl of plain strings)
    txt_mode: str  # lines | paragraphs (.txt only)
    limit: int  # texts read


def model_facts(profile: Profile, name: str | None = None) -> ModelFacts:
    from engine import models

    name = name or profile.model
    source = models.resolve(name)
    config = models.load_config(name, profile.trust_remote_code)  # first: its one-line errors
    data = safe_json.load_file(source.folder / "config.json", "model config")
    if not isinstance(data, dict):
        raise BadInput(f"config.json must hold a JSON object: {source.folder}")
    model_type = data.pop("model_type", config.model_type)
    task = models.resolve_task(profile, config)
    return ModelFacts(name=name, kind=source.kind, folder=str(source.folder.resolve()),
                      model_type=model_type, config=data, task=task,
                      has_weights=source.has_weights or (source.kind == "hub" and profile.download_weights),
                      has_tokenizer=source.has_tokenizer,
                      max_positions=int(models.max_positions(config) or 0),
                      hub_id=source.hub.ref.repo_id if source.hub else "",
                      hub_commit=source.hub.commit if source.hub else "")


def data_facts(profile: Profile) -> DataFacts:
    name = profile.dataset.strip()
    if name.lower() == "builtin":
        return DataFacts("builtin", "", None, "", TEXT_LIMIT)
    path = Path(name).expanduser()
    suffix = path.suffix.lower()
    kinds = {".txt": "txt", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
             ".parquet": "parquet"}
    if suffix not in kinds:
        raise BadInput(f"unsupported dataset type {suffix or '(no extension)'!r}; use builtin or a "
                       f"file ending in {', '.join(kinds)}")
    kind = kinds[suffix]
    column = profile.text_column.strip() or None
    txt_mode = ""
    exists = path.is_file()
    if kind == "txt":
        if not exists:
            raise BadInput(f"dataset file not found: {path} (export reads it to tell lines from paragraphs)")
        txt_mode = _txt_mode(path)
        column = None
    elif column is None:
        if not exists:
            raise BadInput(f"dataset file not found: {path} (export reads it to find the text column; "
                           "or name the column with --text-column)")
        column = _find_column(path, kind)
    return DataFacts(kind, str(path.resolve()), column, txt_mode, TEXT_LIMIT)


def _txt_mode(path: Path) -> str:
    from engine.data import files

    peek = []
    with path.open(encoding="utf-8-sig", errors="replace") as fh:
        for i, line in enumerate(files.bounded_lines(fh)):
            if i >= files._TXT_PEEK_LINES:
                break
            peek.append(line)
    return "paragraphs" if files._looks_like_paragraphs(peek) else "lines"


def _find_column(path: Path, kind: str) -> str | None:
    """The column ``engine.data`` would pick from the file's first rows (its own readers and checks)."""
    from engine.data import files

    return files.text_column_of(path)
