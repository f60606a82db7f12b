"""The built-in sample corpus: real English text already on every machine that runs Python.

Texts are the docstrings of the standard library's own modules, classes and functions (read with
``ast`` from the source files: nothing is imported or executed) followed by the long help topics of
``pydoc_data.topics``. The result is a few thousand texts whose lengths are heavy-tailed the way
real corpora are: many one-line docstrings, a body of paragraphs, and a few pages-long topics.

Building it parses ~650 source files (about 2 s), so it is cached twice: in-process
(``lru_cache``) and on disk as JSON under the user cache folder, keyed by the Python version (the
stdlib, hence the corpus, changes between versions). A read-only or missing cache folder only
costs the rebuild.
"""

from __future__ import annotations

import ast
import functools
import gc
import json
import os
import platform
import sys
import sysconfig
from pathlib import Path

#: Bump when the way texts are extracted changes, so stale disk caches are ignored.
CORPUS_FORMAT = 2

#: Texts with fewer words are labels ("Return self.", "Close the file."), not text anyone trains on.
#: Dropping them removes ~1,800 one-liners; with the fallback tokenizer it moves the useful fraction
#: of fixed 512-token padding from 10.7% to 13.3% (the issue's GPT-2 figure is about 14%).
MIN_WORDS = 8

# Folders of the stdlib that hold tests, vendored code or generated data rather than documentation.
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                        "__pycache__", "lib2to3", "pydoc_data", "encodings", "ensurepip",
                        "venv", "turtledemo"})


# The functions below use the standard library only: the exported script embeds their source
# (with MIN_WORDS and STDLIB_SKIP_DIRS as its constants).
def stdlib_files(root):
    """Stdlib .py files in sorted relative-path order (independent of os.walk's order)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS and not d.startswith(".")]
        found.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def docstrings(body, owner=None):
    """Docstrings of ``owner`` and every class/function defined in ``body``, in source order.

    Only statement bodies are visited (not expressions): a docstring can live nowhere else, and
    skipping ``ast.walk`` over every node halves the build time.
    """
    if owner is not None:
        doc = ast.get_docstring(owner, clean=True)  # type: ignore[arg-type]
        if doc:
            yield doc
    for node in body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from docstrings(node.body, node)
        elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):  # conditional defs
            for part in (node.body, getattr(node, "orelse", []), getattr(node, "finalbody", [])):
                yield from docstrings(part)
            for handler in getattr(node, "handlers", []):
                yield from docstrings(handler.body)


def build_corpus():
    """Extract the corpus from this interpreter's stdlib (no cache). Deterministic order:
    files by relative path, docstrings in source order, then pydoc topics by name; exact
    duplicates (the same docstring copied between modules) are kept once, and texts shorter than
    ``MIN_WORDS`` words are left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    # Syntax trees are freed by reference counting; the cyclic collector would only rescan the
    # millions of nodes they create (about 15% of the build time, more in a busy process).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for path in stdlib_files(root):
            try:
                tree = ast.parse(path.read_bytes(), filename=str(path))
            except (SyntaxError, ValueError, OSError, UnicodeDecodeError):
                continue  # a broken or unreadable file in someone's stdlib is not our problem
            texts.extend(d.strip().replace("\r\n", "\n") for d in docstrings(tree.body, tree))
    finally:
        if gc_was_enabled:
            gc.enable()
    try:
        from pydoc_data.topics import topics  # a plain dict of str: str, safe to import
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    texts.extend(topics[name].strip().replace("\r\n", "\n") for name in sorted(topics))
    seen = set()
    unique = []
    for text in texts:
        if len(text.split()) >= MIN_WORDS and text not in seen:
            seen.add(text)
            unique.append(text)
    return tuple(unique)


def cache_dir() -> Path:
    """Headroom's user cache folder ($XDG_CACHE_HOME/headroom, else ~/.cache/headroom)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "headroom"


def _cache_path() -> Path:
    version = f"{platform.python_implementation().lower()}{sys.version_info[0]}.{sys.version_info[1]}.{sys.version_info[2]}"
    return cache_dir() / f"builtin-corpus-{version}-v{CORPUS_FORMAT}.json"


def _read_cache(path: Path) -> tuple[str, ...] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    # A cache file is data from disk: accept it only if it has exactly the expected shape.
    if (isinstance(data, dict) and data.get("format") == CORPUS_FORMAT
            and data.get("stdlib") == sysconfig.get_paths()["stdlib"]
            and isinstance(data.get("texts"), list)
            and all(isinstance(t, str) for t in data["texts"]) and data["texts"]):
        return tuple(data["texts"])
    return None


def _write_cache(path: Path, texts: tuple[str, ...]) -> None:
    from engine.atomic_file import atomic_write_text
    from engine.errors import BadInput

    payload = {"format": CORPUS_FORMAT, "python": sys.version,
               "stdlib": sysconfig.get_paths()["stdlib"], "texts": list(texts)}
    try:
        # atomic_write_text also removes temp files of earlier writes that were killed midway
        # (each is the whole corpus, ~6 MB).
        atomic_write_text(path, json.dumps(payload, ensure_ascii=False), make_parents=True)
    except (BadInput, OSError):
        pass  # read-only home or full disk: the corpus still works, it is just rebuilt next time


def load_or_build() -> tuple[str, ...]:
    """The corpus from the disk cache, else built (and written to the cache)."""
    path = _cache_path()
    texts = _read_cache(path)
    if texts is None:
        texts = build_corpus()
        _write_cache(path, texts)
    return texts


@functools.lru_cache(maxsize=1)
def builtin_corpus() -> tuple[str, ...]:
    """The built-in sample corpus (cached in-process and on disk)."""
    return load_or_build()
