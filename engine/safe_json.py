"""JSON from files the user hands over (profiles, config.json, indexes, JSONL lines), read so that no
content can end in anything but a one-line BadInput.

The standard ``json`` module raises ValueError for an integer of more than 4300 digits (CPython's
int-string limit), RecursionError for deeply nested arrays, and happily returns ``Infinity``/``NaN``;
every one of them is a user's file, not a bug, so each becomes one line that says what is wrong.
"""

from __future__ import annotations

import json
import math
import os
import reprlib
from pathlib import Path
from typing import Any

from engine.errors import BadInput

#: Nesting deeper than this is refused: no profile, config or dataset record needs more, and
#: walking deeper structures (repr, deepcopy, dataclasses) would hit Python's recursion limit.
MAX_DEPTH = 64
#: Files larger than this are not JSON anyone wrote by hand (a profile is ~1 KiB, a config ~2 KiB).
MAX_FILE_BYTES = 16 << 20

_SHORT = reprlib.Repr()
_SHORT.maxstring = 60
_SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxdict = _SHORT.maxtuple = 4
_SHORT.maxlevel = 2
_SHORT.maxlong = 40


def short_repr(value: Any) -> str:
    """A repr that fits in an error line: long strings, huge ints and nested lists abbreviated."""
    try:
        return _SHORT.repr(value)
    except Exception:  # noqa: BLE001 - a repr for a message must never fail
        return f"<{type(value).__name__}>"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of containers, iteratively (a recursive walk is what fails on deep input)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def loads(text: str, what: str, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` whose every failure is a BadInput naming ``what`` (a file, "line 3 of x")."""
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise BadInput(f"{what} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise BadInput(f"{what} nests deeper than {max_depth} levels") from None
    except ValueError as exc:  # a number beyond the int-string limit, NaN/Infinity
        if "digits" in str(exc):
            raise BadInput(f"{what} holds a number with thousands of digits") from None
        raise BadInput(f"{what} is not valid JSON ({str(exc).splitlines()[0][:80]})") from None
    if _depth(value, max_depth) > max_depth:
        raise BadInput(f"{what} nests deeper than {max_depth} levels")
    _check_floats(value, what)
    return value


def _check_floats(value: Any, what: str) -> None:
    """Numbers like 1e400 parse as inf: refuse them like NaN (no size or count is infinite)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise BadInput(f"{what} holds a number too large to represent ({item})")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def load_file(path: str | os.PathLike, what: str | None = None, max_bytes: int = MAX_FILE_BYTES,
              max_depth: int = MAX_DEPTH) -> Any:
    """Read a UTF-8 JSON file; BadInput (one line) for a missing, unreadable, huge or bad file."""
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    return loads(read_text(path, label, max_bytes), label, max_depth)


def read_text(path: Path, label: str, max_bytes: int, kind: str = "a JSON file here") -> str:
    """A JSON file's text (BOM dropped); BadInput (one line, naming ``label``) when it is too big
    (more than ``max_bytes``; ``kind`` names what the limit is for), a folder, unreadable or not UTF-8."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise BadInput(f"{label} is {size:,} bytes; {kind} is at most {max_bytes:,}")
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise BadInput(f"{label} is not UTF-8 text") from None
    except IsADirectoryError:
        raise BadInput(f"{label} is a folder, not a JSON file") from None
    except OSError as exc:
        raise BadInput(f"cannot read {label}: {exc.strerror or exc}") from None
