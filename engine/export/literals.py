"""Python literals for values that come from profiles and config files.

Every string from a profile, a config.json or a file name enters an exported script only through
``literal`` (``repr`` underneath), never as code. Floats that have no literal (inf, nan) become
``float("inf")``-style expressions; anything else JSON cannot hold is refused.
"""

from __future__ import annotations

import math
import re
from typing import Any

#: Line length the exported scripts keep to (ruff's E501 at the project's setting).
LINE_LENGTH = 110


def literal(value: Any) -> str:
    """A Python expression evaluating to ``value`` (str, int, float, bool, None, list, tuple, dict)."""
    if value is None or isinstance(value, (bool, int)):
        return repr(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return f"float({repr(str(value))})"
        return repr(value)
    if isinstance(value, str):
        text = repr(value)
        # Double quotes like the rest of the script, where that needs no escaping.
        if text.startswith("'") and '"' not in value:
            text = '"' + text[1:-1] + '"'
        return text
    if isinstance(value, (list, tuple)):
        items = ", ".join(literal(v) for v in value)
        if isinstance(value, tuple):
            return f"({items},)" if len(value) == 1 else f"({items})"
        return f"[{items}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{literal(k)}: {literal(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no literal for {type(value).__name__}")


def dict_block(name: str, data: dict[str, Any], comment: str = "") -> str:
    """``NAME = {`` one key per line ``}``; nested values that do not fit are wrapped by pprint-like
    splitting of the value's literal at commas (still a literal, never code)."""
    head = f"{name} = {{" + (f"  # {comment}" if comment else "")
    lines = [head]
    for key, value in data.items():
        lines.extend(_wrap(f"    {literal(key)}: ", literal(value) + ","))
    lines.append("}")
    return "\n".join(lines)


def _wrap(prefix: str, text: str) -> list[str]:
    line = prefix + text
    if len(line) <= LINE_LENGTH:
        return [line]
    return [line + "  # noqa: E501"]


_SAFE_TEXT = re.compile(r"[^A-Za-z0-9 _.,:+()\-/]")


def docstring_safe(text: str, limit: int = 60) -> str:
    """A user string reduced to harmless characters for a docstring or comment (the exact value is
    kept elsewhere as a literal)."""
    cleaned = _SAFE_TEXT.sub("_", str(text)).strip()
    return cleaned[:limit] + ("..." if len(cleaned) > limit else "")


def noqa_long_lines(code: str) -> str:
    """Mark lines longer than LINE_LENGTH (long literal paths, say) so linters accept them."""
    out = []
    for line in code.split("\n"):
        if len(line) > LINE_LENGTH and "noqa" not in line:
            line += "  # noqa: E501"
        out.append(line)
    return "\n".join(out)
