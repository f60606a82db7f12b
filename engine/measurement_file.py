"""A measurement made elsewhere, read back: the JSON of ``headroom measure --json`` or the last JSON
line an exported script prints, run on another machine (plan on a laptop, run on the GPU box).

    result, settings = read_measurement("run.json")     # BadInput (one line) for anything else
    differences(profile, settings)                      # [] when the run is of this profile

Both writers put the profile's settings in the result (``profile``: every field from ``headroom
measure``, the non-default ones from an exported script), so an import can check that the run is
of the profile it is imported onto. Paths (a model folder, a dataset file) are compared by their
last part: the same files usually live in different folders on the two machines.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from engine import safe_json
from engine.errors import BadInput
from engine.results import MeasureResult

MAX_BYTES = 8 << 20  # a measurement with its timeline is kilobytes; a whole script log, a few MB

#: Fields that do not change what a run measures, or name the run rather than configure it.
IGNORED_FIELDS = ("name", "schema_version", "trust_remote_code", "gpu", "steps")  # a script's --steps
_NUMBERS = ("peak_allocated_bytes", "peak_reserved_bytes", "device_used_bytes")


def _last_object(text: str, label: str) -> dict[str, Any]:
    """The JSON object of a file that is one, or the last line that is one (a script's output)."""
    stripped = text.strip()
    if not stripped:
        raise BadInput(f"{label} is empty")
    if stripped.startswith("{"):
        try:
            value = safe_json.loads(stripped, label)
        except BadInput:
            value = None  # several JSON lines, say: look for the last one
        if isinstance(value, dict):
            return value
    for line in reversed(stripped.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            value = safe_json.loads(line, f"the last JSON line of {label}")
            if isinstance(value, dict):
                return value
    raise BadInput(f"{label} holds no JSON object (a measurement is the JSON of headroom measure --json "
                   "or the last line of an exported script's output)")


def looks_like_measurement(path: str | Path) -> bool:
    """Whether a file is a measurement (its last JSON object has the measured peaks), not a profile."""
    try:
        if Path(path).stat().st_size > MAX_BYTES:
            return False
        data = _last_object(Path(path).read_text(encoding="utf-8-sig"), str(path))
    except (BadInput, OSError, UnicodeDecodeError):
        return False
    return all(k in data for k in _NUMBERS)


def read_measurement(path: str | Path) -> tuple[MeasureResult, dict[str, Any] | None]:
    """(the run as a MeasureResult, its profile settings or None when the file has none)."""
    path = Path(path)
    label = f"measurement {path.name}"
    data = _last_object(safe_json.read_text(path, label, MAX_BYTES, kind="a measurement"), label)
    return from_json(data, label), _settings_of(data, label)


def from_json(data: dict[str, Any], label: str = "the measurement") -> MeasureResult:
    """A MeasureResult from a measurement's JSON object; BadInput (one line) when it is not one."""
    missing = [k for k in _NUMBERS if k not in data]
    if missing:
        raise BadInput(f"{label} is not a measurement: no {', '.join(missing)} "
                       "(expected the JSON of headroom measure --json or of an exported script)")
    for key in _NUMBERS + ("real_tokens", "padded_tokens", "steps", "params"):
        value = data.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise BadInput(f"{label}: {key} must be a whole number of at least 0, got "
                           f"{safe_json.short_repr(value)}")
    for key in ("step_time_s", "tokens_per_s", "useful_tokens_per_s", "first_step_s", "elapsed_s"):
        value = data.get(key, 0.0)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise BadInput(f"{label}: {key} must be a number of at least 0, got {safe_json.short_repr(value)}")
    breakdown = data.get("breakdown") or {}
    if not isinstance(breakdown, dict) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                  for v in breakdown.values()):
        raise BadInput(f"{label}: breakdown must map categories to bytes")
    record = {
        "device": str(data.get("device", "")), "device_name": str(data.get("device_name", "")),
        "breakdown": dict(breakdown), "step_time_s": float(data.get("step_time_s") or 0.0),
        "tokens_per_s": float(data.get("tokens_per_s") or 0.0),
        "useful_tokens_per_s": float(data.get("useful_tokens_per_s") or 0.0),
        "real_tokens": int(data.get("real_tokens", 0)), "padded_tokens": int(data.get("padded_tokens", 0)),
        "steps": int(data.get("steps", 0)), "params": int(data.get("params", 0)),
    }
    known = {f.name for f in dataclasses.fields(MeasureResult)}
    rest = {k: v for k, v in data.items() if k in known and k not in record}
    try:
        result = MeasureResult.from_dict({**rest, **record, **{k: data[k] for k in _NUMBERS}})
    except (TypeError, ValueError, AttributeError) as exc:
        raise BadInput(f"{label} is not a measurement Headroom can read ({str(exc).splitlines()[0][:80]})") \
            from None
    if not isinstance(result.timeline, tuple) or not isinstance(result.notes, tuple):
        raise BadInput(f"{label}: timeline and notes must be lists")
    return result


def _settings_of(data: dict[str, Any], label: str) -> dict[str, Any] | None:
    settings = data.get("profile")
    if settings is None:
        return None
    if not isinstance(settings, dict):
        raise BadInput(f"{label}: its profile settings are not a JSON object")
    return settings


def _same(field: str, ours: Any, theirs: Any) -> bool:
    if ours == theirs:
        return True
    from engine.profile import FIELDS_BY_NAME

    is_path = field in FIELDS_BY_NAME and FIELDS_BY_NAME[field].path  # a model or file: its name
    if is_path and isinstance(ours, str) and isinstance(theirs, str):
        return Path(ours.rstrip("/\\").replace("\\", "/")).name == Path(theirs.rstrip("/\\").replace("\\", "/")).name
    if isinstance(ours, float) and isinstance(theirs, (int, float)) and not isinstance(theirs, bool):
        return float(theirs) == ours
    return False


def differences(profile, settings: dict[str, Any] | None, result: MeasureResult | None = None) -> list[str]:
    """What differs between ``profile`` and a measurement's settings (and, given the result, the
    device it ran on), one phrase each ("batch 8 in the file, 4 here"); [] for the same run."""
    from engine.profile import FIELDS

    if settings is None:
        return ["the file has no profile settings (made by an older Headroom?), so it cannot be "
                "checked against this profile"]
    out = []
    if result is not None and result.device in ("cuda", "cpu") and result.device != profile.target:
        out.append(f"it ran on {result.device}, this profile targets {profile.target}")
    known = set()
    for f in FIELDS:
        known.add(f.name)
        if f.name in IGNORED_FIELDS:
            continue
        theirs = settings.get(f.name, f.default)
        ours = getattr(profile, f.name)
        if not _same(f.name, ours, theirs):
            out.append(f"{f.label or f.name} {safe_json.short_repr(theirs)} in the file, "
                       f"{safe_json.short_repr(ours)} here")
    for name in sorted(set(settings) - known):
        out.append(f"{name} {safe_json.short_repr(settings[name])} in the file (a setting this Headroom "
                   "does not know)")
    return out
