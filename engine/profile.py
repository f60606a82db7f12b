"""Profile: every setting of one planned run, as one frozen dataclass of plain fields.

A Profile is what flows into every engine function (estimate, measure, plan, export) and what the
app keeps, compares and saves. It is JSON on disk, with ``schema_version`` so older files can be
read by newer versions. The record is built from the core fields below plus the fields every
technique module declares (``engine.techniques``), so a new technique adds its fields without
editing this file. Validation here is structural (types, ranges, grammar of compound values, rules
between fields); checks that need the model (sequence beyond its positions) live in
``engine.prepare``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

from engine import techniques
from engine.atomic_file import atomic_write_text  # noqa: F401 - re-exported: callers import it from here
from engine.errors import BadInput
from engine.safe_json import short_repr
from engine.techniques.base import Field

#: 2: LoRA, quantized base weights and the optimizers of engine.optimizers (issue 14).
SCHEMA_VERSION = 2

MODES = ("train", "infer", "generate")
TASKS = ("auto", "causal-lm", "masked-lm", "classification")
from engine.optimizers import OPTIMIZERS  # the optimizers' home (estimate, measure, export)
TARGETS = ("cuda", "cpu")

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4,
          "tib": 1024**4}


#: Sizes above this (1 EiB) are no memory anyone has; refusing them keeps arithmetic exact.
MAX_SIZE_BYTES = 1 << 60


def parse_bytes(text: str) -> int:
    """'24GiB' -> 25769803776; '512MB' -> 512e6; '1000' -> 1000 bytes (exact: no float rounding)."""
    from fractions import Fraction

    raw = str(text)
    shown = raw if len(raw) <= 40 else raw[:37] + "..."
    if raw.strip().startswith("-"):
        raise BadInput(f"a size cannot be negative: {shown!r} (use e.g. 24GiB, 512MiB, 80GB)")
    m = re.fullmatch(r"[ \t]*([0-9]{1,30}(?:\.[0-9]{1,30})?)[ \t]*([A-Za-z]{0,3})[ \t]*", raw, re.ASCII)
    if not m or m.group(2).lower() not in _UNITS:
        if re.fullmatch(r"[ \t]*[0-9.]{31,}[ \t]*[A-Za-z]*[ \t]*", raw, re.ASCII):
            raise BadInput(f"size {shown!r} is far beyond any memory (at most 1 EiB)")
        raise BadInput(f"not a size: {shown!r} (use e.g. 24GiB, 512MiB, 80GB)")
    size = int(Fraction(m.group(1)) * _UNITS[m.group(2).lower()])
    if size > MAX_SIZE_BYTES:
        raise BadInput(f"size {shown!r} is far beyond any memory (at most 1 EiB)")
    return size


def _check_model(value: str) -> None:
    if not value.strip():
        raise BadInput("model must name a preset, a folder holding config.json or a Hub id org/name")


def _check_gpu(value: str) -> None:
    from engine import gpus

    gpus.check_name(value)


#: The run itself (not a technique); each technique's fields come from its module
#: (``engine.techniques``) and are placed in the record after the field they name.
CORE_FIELDS: tuple[Field, ...] = (
    Field("schema_version", int, SCHEMA_VERSION, "format version of this record", cli=False),
    Field("name", str, "default", "the user's label for this profile"),
    Field("model", str, "gpt2", 'preset name, "minilm", a folder holding config.json, or a Hub id '
          'org/name[@revision] (an existing folder wins; ./org/name is always the folder)',
          check=_check_model, metavar="NAME|DIR|ORG/NAME", path=True),
    Field("trust_remote_code", bool, False, "allow a model folder's own Python code to run (off: safe)",
    label="trust remote code"),
    Field("download_weights", bool, False, "a Hub model's measured run downloads and loads its safetensors "
          "weights (off: random init; estimates never download weights)", label="download weights"),
    Field("mode", str, "train", "train: fwd+loss+bwd+step; infer: forward under no_grad; generate: prefill + greedy decode with a KV cache", choices=MODES),
    Field("task", str, "auto", "head: auto picks causal-lm for decoders, masked-lm for encoders",
          choices=TASKS, label="task head"),
    Field("batch", int, 8, "sequences per optimizer step (fixed-count strategies)", minimum=1,
          maximum=1 << 24, metavar="N"),
    Field("seq", int, 512, "max sequence length in tokens (pad/truncate length)", minimum=1,
          maximum=1 << 24, metavar="N", label="sequence length"),
    Field("optimizer", str, "adamw", "adamw | adamw-8bit | paged-adamw-8bit (bitsandbytes) | "
          "adafactor | sgd (momentum 0.9) | lion", choices=OPTIMIZERS),
    Field("target", str, "cuda", "device the run is for: cuda | cpu", choices=TARGETS, label="target device"),
    Field("gpu", str, "", 'catalog GPU the estimate is for (engine.gpus; "" = H100 SXM, or the '
          'deprecated HEADROOM_DEVICE)', check=_check_gpu, metavar="NAME", label="GPU"),
    Field("dataset", str, "builtin", '"builtin" sample corpus, or a .txt/.csv/.jsonl/.parquet path',
          metavar="builtin|PATH", path=True),
    Field("text_column", str, "", 'column holding the text ("" = find it)', metavar="NAME",
    label="text column"),
    Field("steps", int, 3, "measured steps (the first is warm-up, excluded from timings)", minimum=1,
          maximum=1 << 20, metavar="N"),
    Field("seed", int, 0, "seed for data order, init and sampling", minimum=0, maximum=2**63 - 1,
          metavar="N"),
    Field("memory_cap_bytes", int, 0, "simulated device capacity for CPU runs (0 = none)", minimum=0,
          maximum=MAX_SIZE_BYTES, flag="--memory-cap", metavar="SIZE", parse=parse_bytes,
          label="simulated capacity"),
)


def _ordered_fields() -> tuple[Field, ...]:
    """Core fields, with every technique's fields placed after the field each names."""
    order = list(CORE_FIELDS)
    pending: list[tuple[Field, str | None]] = []
    for technique in techniques.registry():
        previous = None
        for f in technique.fields:
            pending.append((f, f.after or previous))
            previous = f.name
    while pending:
        names = [f.name for f in order]
        placed = [(f, a) for f, a in pending if a in names]
        if not placed:  # anchors absent: append in registry order
            order.extend(f for f, _ in pending)
            break
        for f, anchor in placed:
            order.insert([x.name for x in order].index(anchor) + 1, f)
        pending = [(f, a) for f, a in pending if (f, a) not in placed]
    names = [f.name for f in order]
    if len(set(names)) != len(names):
        raise RuntimeError(f"two profile fields share a name: {sorted(names)}")
    return tuple(order)


FIELDS: tuple[Field, ...] = _ordered_fields()
FIELDS_BY_NAME: dict[str, Field] = {f.name: f for f in FIELDS}


def _is_training(self) -> bool:
    return self.mode == "train"


def _replace(self, **changes: Any) -> "Profile":
    """A validated copy with some fields changed."""
    return validate(dataclasses.replace(self, **changes))


def _non_defaults(self) -> dict[str, Any]:
    """Fields whose value differs from the default (for export and summaries)."""
    return {f.name: getattr(self, f.name) for f in FIELDS
            if f.name != "schema_version" and getattr(self, f.name) != f.default}


def _to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _namespace() -> dict[str, Any]:
    ns: dict[str, Any] = {
        "__doc__": "Every setting of one planned run (fields: ``engine.profile.FIELDS``).",
        "__module__": __name__,
        "is_training": property(_is_training),
        "replace": _replace, "non_defaults": _non_defaults, "to_dict": _to_dict,
    }
    for technique in techniques.registry():
        for name, fn in technique.properties.items():  # derived views, e.g. local_window
            if name in ns or name in FIELDS_BY_NAME:
                raise RuntimeError(f"technique {technique.name}: property {name!r} is taken")
            ns[name] = property(fn, doc=fn.__doc__)
    return ns


#: One frozen dataclass: the core fields plus every registered technique's fields.
Profile = dataclasses.make_dataclass(
    "Profile", [(f.name, f.type, dataclasses.field(default=f.default, metadata={"help": f.help}))
                for f in FIELDS], namespace=_namespace(), frozen=True)

FIELD_TYPES: dict[str, type] = {f.name: f.type for f in FIELDS}


def validate(profile: Profile) -> Profile:
    """Check types, ranges and grammar of every field, then each technique's rules between fields;
    return the profile or raise BadInput (one line). Rules that need the model: ``engine.prepare``."""
    schema = profile.schema_version
    if isinstance(schema, int) and not isinstance(schema, bool) and schema > SCHEMA_VERSION:
        raise BadInput(f"profile schema_version {schema} is newer than this Headroom "
                       f"understands ({SCHEMA_VERSION}); upgrade Headroom")
    for f in FIELDS:
        f.validate(getattr(profile, f.name))
    for technique in techniques.registry():
        if technique.validate is not None:
            technique.validate(profile)
        for f in technique.fields:  # after its own rules: theirs come first, as they always did
            f.check_mode(profile)
    return profile


def _migrate(data: dict[str, Any], version: int) -> dict[str, Any]:
    """An older record in today's form (one step per schema version)."""
    if version < 1:
        raise BadInput(f"profile schema_version {version} never existed (the first is 1)")
    if version == 1:
        # 1 -> 2: the fields of LoRA and quantized base weights are new (their defaults: full
        # fine-tuning, unquantized) and "optimizer" gained choices; every schema 1 value holds.
        data = {**data, "schema_version": 2}
    return data


def from_dict(data: dict[str, Any]) -> Profile:
    """Build a Profile from JSON data; unknown fields and wrong types are errors."""
    if not isinstance(data, dict):
        raise BadInput("a profile must be a JSON object")
    data = dict(data)
    version = data.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or isinstance(version, bool):
        raise BadInput(f"profile field 'schema_version' must be int, got {short_repr(version)}")
    data = _migrate(data, version)
    unknown = sorted(set(data) - set(FIELD_TYPES))
    if unknown:
        raise BadInput(f"unknown profile field {short_repr(unknown[0])} (known: {', '.join(FIELD_TYPES)})")
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


def save(profile: Profile, path: str | os.PathLike) -> None:
    atomic_write_text(path, dumps(validate(profile)))
