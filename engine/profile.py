"""Profile: every setting of one planned run, as one frozen dataclass of plain fields.

A Profile is what flows into every engine function (estimate, measure, plan, export) and what the
app keeps, compares and saves. It is JSON on disk, with ``schema_version`` so older files can be
read by newer versions. Validation here is structural (types, ranges, grammar of compound values);
checks that need the model (sequence beyond its positions) live in ``engine.models``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from engine.errors import BadInput
from engine.units import format_bytes

SCHEMA_VERSION = 1

MODES = ("train", "infer")
TASKS = ("auto", "causal-lm", "masked-lm", "classification")
PRECISIONS = ("fp32", "fp16-amp", "bf16-amp", "fp16", "bf16")
OPTIMIZERS = ("adamw", "sgd")
TARGETS = ("cuda", "cpu")
PADDINGS = ("fixed", "dynamic", "bucketed", "token-budget")
MLPS = ("default", "geglu")
PRUNE_KINDS = ("unstructured", "heads", "ffn")
TEACHER_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MAX_SPLIT_FLOOR_MIB = 20  # PyTorch refuses max_split_size_mb <= 20 (kLargeBuffer, 20 MiB)

_ATTN_RE = re.compile(r"^(sdpa|eager|local:(\d+))$")
_PRUNE_RE = re.compile(r"^(unstructured|heads|ffn):(0(\.\d+)?|1(\.0+)?|\.\d+)$")
_ALLOC_RE = re.compile(r"^(default|expandable|pool:(\d+(\.\d+)?)\s*([KMGT]i?B|B)?)$", re.IGNORECASE)


@dataclass(frozen=True)
class Profile:
    schema_version: int = SCHEMA_VERSION  # format version of this record
    name: str = "default"  # the user's label for this profile
    model: str = "gpt2"  # preset name, "minilm", or a folder holding config.json
    trust_remote_code: bool = False  # allow a model folder's own Python code to run (off: safe)
    mode: str = "train"  # train: fwd+loss+bwd+step; infer: forward under no_grad
    task: str = "auto"  # head: auto picks causal-lm for decoders, masked-lm for encoders
    batch: int = 8  # sequences per optimizer step (fixed-count strategies)
    seq: int = 512  # max sequence length in tokens (pad/truncate length)
    precision: str = "fp32"  # fp32 | fp16-amp | bf16-amp (autocast) | fp16 | bf16 (pure weights)
    checkpointing: bool = False  # gradient checkpointing (recompute activations in backward)
    checkpoint_every: int = 1  # with checkpointing: checkpoint every k-th layer (1 = all)
    attn: str = "sdpa"  # sdpa | eager | local:W (sliding window of W tokens)
    optimizer: str = "adamw"  # adamw | sgd (torch defaults for the device)
    target: str = "cuda"  # device the run is for: cuda | cpu
    dataset: str = "builtin"  # "builtin" sample corpus, or a .txt/.csv/.jsonl/.parquet path
    text_column: str = ""  # column holding the text ("" = find it)
    padding: str = "fixed"  # fixed | dynamic | bucketed | token-budget
    pad_multiple: int = 1  # pad lengths up to a multiple of this (1 = off)
    max_tokens: int = 0  # token-budget batching: tokens per batch, padding included (0 = batch*seq)
    micro_batches: int = 1  # training: split each batch in N micro-batches, accumulate gradients
    chunk_input: int = 0  # inference: process long inputs in windows of W tokens (0 = off)
    prune: str = ""  # "" | unstructured:F | heads:F | ffn:F (F = fraction removed)
    mlp: str = "default"  # default | geglu (gated GeGLU block of matched parameter count)
    ffn_chunks: int = 1  # feed-forward applied to N sequence chunks (1 = off)
    distill_from: str = ""  # teacher model (preset or folder) for knowledge distillation
    teacher_precision: str = "auto"  # teacher weights: auto (student's half dtype on CUDA) | fp32|bf16|fp16
    alloc: str = "default"  # default | expandable | pool:SIZE (CUDA caching allocator setup)
    alloc_max_split: str = ""  # "" | SIZE: blocks this large or larger are never split (max_split_size_mb)
    steps: int = 3  # measured steps (the first is warm-up, excluded from timings)
    seed: int = 0  # seed for data order, init and sampling
    memory_cap_bytes: int = 0  # simulated device capacity for CPU runs (0 = none)

    # ----- derived views -------------------------------------------------------------------
    @property
    def local_window(self) -> int:
        """Window W of ``attn == 'local:W'``, else 0."""
        return int(self.attn.split(":", 1)[1]) if self.attn.startswith("local:") else 0

    @property
    def prune_kind(self) -> str:
        return self.prune.split(":", 1)[0] if self.prune else ""

    @property
    def prune_fraction(self) -> float:
        return float(self.prune.split(":", 1)[1]) if self.prune else 0.0

    @property
    def is_training(self) -> bool:
        return self.mode == "train"

    @property
    def alloc_pool_bytes(self) -> int:
        """Size of ``alloc == 'pool:SIZE'`` in bytes, else 0."""
        if not self.alloc.lower().startswith("pool:"):
            return 0
        return parse_bytes(self.alloc.split(":", 1)[1])

    @property
    def alloc_max_split_bytes(self) -> int:
        """``alloc_max_split`` in bytes (a whole number of MiB), else 0 (no limit)."""
        return parse_bytes(self.alloc_max_split) if self.alloc_max_split.strip() else 0

    @property
    def alloc_max_split_mib(self) -> int:
        """``max_split_size_mb`` for PYTORCH_CUDA_ALLOC_CONF, else 0 (not set)."""
        return self.alloc_max_split_bytes // 2**20

    def replace(self, **changes: Any) -> "Profile":
        """A validated copy with some fields changed."""
        return validate(dataclasses.replace(self, **changes))

    def non_defaults(self) -> dict[str, Any]:
        """Fields whose value differs from the default (for export and summaries)."""
        default = Profile()
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("schema_version",) and getattr(self, f.name) != getattr(default, f.name)
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4,
          "tib": 1024**4}


def parse_bytes(text: str) -> int:
    """'24GiB' -> 25769803776; '512MB' -> 512e6; '1000' -> 1000 bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise BadInput(f"not a size: {text!r} (use e.g. 24GiB, 512MiB, 80GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _field_types() -> dict[str, type]:
    out = {}
    for f in fields(Profile):
        out[f.name] = {"int": int, "str": str, "bool": bool, "float": float}[str(f.type)]
    return out


FIELD_TYPES = _field_types()


def validate(profile: Profile) -> Profile:
    """Check types, ranges and grammar; return the profile or raise BadInput (one line)."""
    for name, typ in FIELD_TYPES.items():
        value = getattr(profile, name)
        ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
        if not ok:
            raise BadInput(f"profile field {name!r} must be {typ.__name__}, got {value!r}")
    p = profile
    if p.schema_version > SCHEMA_VERSION:
        raise BadInput(f"profile schema_version {p.schema_version} is newer than this Headroom "
                       f"understands ({SCHEMA_VERSION}); upgrade Headroom")
    choices = {"mode": MODES, "task": TASKS, "precision": PRECISIONS, "optimizer": OPTIMIZERS,
               "target": TARGETS, "padding": PADDINGS, "mlp": MLPS}
    for name, allowed in choices.items():
        if getattr(p, name) not in allowed:
            raise BadInput(f"{name} must be one of {', '.join(allowed)}; got {getattr(p, name)!r}")
    for name, low in (("batch", 1), ("seq", 1), ("checkpoint_every", 1), ("pad_multiple", 1),
                      ("max_tokens", 0), ("micro_batches", 1), ("chunk_input", 0),
                      ("ffn_chunks", 1), ("steps", 1), ("seed", 0), ("memory_cap_bytes", 0)):
        if getattr(p, name) < low:
            raise BadInput(f"{name} must be >= {low}; got {getattr(p, name)}")
    if not p.model.strip():
        raise BadInput("model must name a preset or a folder holding config.json")
    m = _ATTN_RE.match(p.attn)
    if not m:
        raise BadInput(f"attn must be sdpa, eager or local:W (W a positive integer); got {p.attn!r}")
    if m.group(2) is not None and int(m.group(2)) < 1:
        raise BadInput("local attention window W must be >= 1")
    if p.prune and not _PRUNE_RE.match(p.prune):
        raise BadInput(f"prune must be unstructured:F, heads:F or ffn:F with 0 <= F < 1; got {p.prune!r}")
    if p.prune and p.prune_fraction >= 1.0:
        raise BadInput("prune fraction must be below 1 (something must remain)")
    if not _ALLOC_RE.match(p.alloc):
        raise BadInput(f"alloc must be default, expandable or pool:SIZE (e.g. pool:8GiB); got {p.alloc!r}")
    if p.alloc.lower().startswith("pool:"):
        parse_bytes(p.alloc.split(":", 1)[1])
    if p.alloc_max_split.strip():
        _check_max_split(p)
    if p.micro_batches > p.batch:
        raise BadInput(f"micro_batches ({p.micro_batches}) cannot exceed batch ({p.batch})")
    if p.micro_batches > 1 and p.mode != "train":
        raise BadInput("micro_batches (gradient accumulation) applies to training only")
    if p.chunk_input and p.mode != "infer":
        raise BadInput("chunk_input (windowed long inputs) applies to inference only; "
                       "for training use micro_batches")
    if p.distill_from and p.mode != "train":
        raise BadInput("distill_from (knowledge distillation) applies to training only")
    if p.teacher_precision not in TEACHER_PRECISIONS:
        raise BadInput(f"teacher_precision must be one of {', '.join(TEACHER_PRECISIONS)}; "
                       f"got {p.teacher_precision!r}")
    if p.teacher_precision != "auto" and not p.distill_from:
        raise BadInput(f"teacher_precision {p.teacher_precision!r} needs a distillation teacher: "
                       f"set distill_from, or leave teacher_precision at auto")
    return p


def _check_max_split(p: Profile) -> None:
    """``alloc_max_split``: a size, a whole number of MiB above 20 MiB (what PyTorch accepts)."""
    try:
        size = parse_bytes(p.alloc_max_split)
    except BadInput:
        raise BadInput(f"alloc_max_split must be a size such as 256MiB or 1GiB (blocks this large "
                       f"are never split); got {p.alloc_max_split!r}") from None
    if size <= MAX_SPLIT_FLOOR_MIB * 2**20:
        raise BadInput(f"alloc_max_split must be above {MAX_SPLIT_FLOOR_MIB} MiB (PyTorch refuses "
                       f"smaller max_split_size_mb); got {p.alloc_max_split!r} = {format_bytes(size)} "
                       f"(write a unit, e.g. 512MiB)")
    if size % 2**20:
        raise BadInput(f"alloc_max_split must be a whole number of MiB (PyTorch's max_split_size_mb); "
                       f"got {p.alloc_max_split!r} = {size / 2**20:.2f} MiB")


def from_dict(data: dict[str, Any]) -> Profile:
    """Build a Profile from JSON data; unknown fields and wrong types are errors."""
    if not isinstance(data, dict):
        raise BadInput("a profile must be a JSON object")
    data = dict(data)
    version = data.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or isinstance(version, bool):
        raise BadInput(f"profile field 'schema_version' must be int, got {version!r}")
    unknown = sorted(set(data) - set(FIELD_TYPES))
    if unknown:
        raise BadInput(f"unknown profile field {unknown[0]!r} (known: {', '.join(FIELD_TYPES)})")
    for name, value in data.items():
        # JSON has no int/float distinction for whole numbers written as 1.0; accept ints for floats.
        if FIELD_TYPES[name] is float and isinstance(value, int) and not isinstance(value, bool):
            data[name] = float(value)
    try:
        profile = Profile(**data)
    except TypeError as exc:  # pragma: no cover - guarded by the unknown-field check
        raise BadInput(f"bad profile: {exc}") from None
    return validate(profile)


def load(path: str | os.PathLike) -> Profile:
    """Read a profile JSON file (one-line BadInput for a missing file or bad content)."""
    from engine import safe_json

    path = Path(path)
    if path.is_dir():
        raise BadInput(f"profile {path} is a folder; give a profile .json file")
    if not path.exists():
        raise BadInput(f"profile file not found: {path}")
    if not path.is_file():
        raise BadInput(f"profile {path} is not a regular file")
    return from_dict(safe_json.load_file(path, "profile file", max_bytes=1 << 20))


def dumps(profile: Profile) -> str:
    return json.dumps(profile.to_dict(), indent=2, sort_keys=False) + "\n"


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write-then-rename so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(profile: Profile, path: str | os.PathLike) -> None:
    atomic_write_text(path, dumps(validate(profile)))
