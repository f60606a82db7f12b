"""Reading texts from the user's files: .txt, .csv/.tsv, .jsonl, .parquet.

Every reader streams and stops after ``limit`` texts, so a 5 GB file costs no more than its first
rows. Nothing from a file is ever executed or unpickled: text is decoded as UTF-8, JSON with the
``json`` module, Parquet with pyarrow. Every user mistake is a one-line ``BadInput``.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from engine import safe_json
from engine.errors import BadInput, Cancelled

#: Column names that hold the text, in order of preference (compared case-insensitively).
TEXT_COLUMN_NAMES = ("text", "content", "sentence", "document", "body", "article", "passage",
                     "review", "abstract", "story", "prompt", "question", "message", "input")
SUFFIXES = (".txt", ".csv", ".tsv", ".jsonl", ".ndjson", ".parquet")
TXT_MODES = ("auto", "lines", "paragraphs")

# Rows/records looked at to find the text column (and lines to tell lines from paragraphs).
_SAMPLE = 500
_TXT_PEEK_LINES = 2000
# How often the readers report progress and check for cancel.
_EVERY = 1000
#: Longest text kept, in characters (~250k tokens, beyond any model's context): a 50 MB one-line
#: file is read in pieces of this size and cut here, so reading and tokenizing it stay bounded
#: (seconds, not a minute); memory planning only needs min(length, seq) tokens of each text.
MAX_TEXT_CHARS = 1 << 20

Progress = Callable[[float, str], None] | None
ShouldStop = Callable[[], bool] | None


class _Ticker:
    """Counts texts; reports progress and honours cancel every ``_EVERY`` texts."""

    def __init__(self, limit: int, progress: Progress, should_stop: ShouldStop) -> None:
        self.limit, self.progress, self.should_stop = limit, progress, should_stop

    def __call__(self, n: int) -> None:
        if n % _EVERY:
            return
        if self.should_stop is not None and self.should_stop():
            raise Cancelled("reading the dataset cancelled")
        if self.progress is not None:
            self.progress(min(1.0, n / self.limit), f"read {n} texts")


# ----- the readers' streams: stdlib (and pyarrow) only, no Headroom import; the exported script
# embeds them (``PORTABLE``) around its own open() of the file -------------------------------------
def text_value(value):
    """``value`` when it is a string with something in it, else None."""
    return value if isinstance(value, str) and value.strip() else None


def take_texts(texts, limit, tick=None):
    """The first ``limit`` texts, each cut at MAX_TEXT_CHARS; ``tick(n)`` after each one."""
    out = []
    for text in texts:
        if len(out) >= limit:
            break
        out.append(text[:MAX_TEXT_CHARS])
        if tick is not None:
            tick(len(out))
    return out


def bounded_lines(fh, cap=MAX_TEXT_CHARS):
    """The lines of a text file, each cut at ``cap`` characters; the rest of a longer line is read
    in pieces of ``cap`` and dropped, so no line is ever held whole (a 50 MB one-line file)."""
    while True:
        line = fh.readline(cap)
        if not line:
            return
        if len(line) >= cap and not line.endswith("\n"):
            while True:
                rest = fh.readline(cap)
                if not rest or rest.endswith("\n"):
                    break
            line += "\n"
        yield line


def paragraphs(lines):
    """Blank-line-separated blocks of ``lines``, each joined with newlines (trailing space cut)."""
    block = []
    size = 0
    for line in lines:
        if line.strip():
            if size > MAX_TEXT_CHARS:
                continue  # the paragraph is already longer than any text is kept
            block.append(line.rstrip("\n").rstrip())
            size += len(block[-1]) + 1
        elif block:
            yield "\n".join(block)
            block, size = [], 0
    if block:
        yield "\n".join(block)


def txt_texts(lines, mode):
    """The texts of a .txt file's lines: one per non-empty line (``mode`` "lines", stripped) or
    one per paragraph ("paragraphs")."""
    if mode == "lines":
        return (text for text in (line.strip() for line in lines) if text)
    return paragraphs(lines)


def csv_texts(rows, column):
    """The non-empty cells at index ``column`` of CSV ``rows`` (short rows skipped)."""
    for row in rows:
        cell = row[column] if column < len(row) else None
        if text_value(cell):
            yield cell


def jsonl_texts(records, column, strings=True):
    """Texts of JSON records: an object's ``column`` value; a plain string itself when
    ``strings`` (no column was named); empty values skipped."""
    for record in records:
        if isinstance(record, str):
            value = record if strings else None
        elif isinstance(record, dict) and column is not None:
            value = record.get(column)
        else:
            value = None
        if text_value(value):
            yield value


def parquet_texts(parquet_file, column):
    """The non-empty string values of ``column`` of a ``pyarrow.parquet.ParquetFile``, streamed."""
    for batch in parquet_file.iter_batches(batch_size=1024, columns=[column]):
        for value in batch.column(0).to_pylist():
            if text_value(value):
                yield value


#: What the exported script embeds of this module, in order (it keeps what its reader reaches).
PORTABLE = (text_value, take_texts, bounded_lines, paragraphs, txt_texts, csv_texts, jsonl_texts,
            parquet_texts)


def _take(texts: Iterable[str], limit: int, tick: _Ticker) -> list[str]:
    return take_texts(texts, limit, tick)


def read_file(path: Path, text_column: str, limit: int, txt_mode: str = "auto",
              progress: Progress = None, should_stop: ShouldStop = None) -> list[str]:
    """Up to ``limit`` non-empty texts of a dataset file (see ``engine.data.load_texts``)."""
    if not path.exists():
        raise BadInput(f"dataset file not found: {path}")
    if path.is_dir():
        raise BadInput(f"dataset {path} is a folder; give a .txt, .csv, .jsonl or .parquet file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise BadInput(f"unsupported dataset type {suffix or '(no extension)'!r} for {path.name}; "
                       f"use builtin or a file ending in {', '.join(SUFFIXES)}")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BadInput(f"cannot read dataset {path}: {exc.strerror}") from None
    if size == 0:
        raise BadInput(f"dataset file {path.name} is empty")
    if txt_mode not in TXT_MODES:
        raise BadInput(f"txt_mode must be one of {', '.join(TXT_MODES)}; got {txt_mode!r}")
    texts, _column = _read_any(path, suffix, text_column, limit, txt_mode,
                               _Ticker(limit, progress, should_stop))
    return texts


def _read_any(path: Path, suffix: str, text_column: str, limit: int, txt_mode: str,
              tick: _Ticker) -> tuple[list[str], str | None]:
    try:
        if suffix == ".txt":
            texts, column = _read_txt(path, limit, txt_mode, tick), None
        elif suffix in (".csv", ".tsv"):
            texts, column = _read_csv(path, text_column, limit, "\t" if suffix == ".tsv" else ",", tick)
        elif suffix in (".jsonl", ".ndjson"):
            texts, column = _read_jsonl(path, text_column, limit, tick)
        else:
            texts, column = _read_parquet(path, text_column, limit, tick)
    except OSError as exc:
        raise BadInput(f"cannot read dataset {path}: {exc.strerror or exc}") from None
    except RecursionError:
        raise BadInput(f"{path.name} nests too deeply to read") from None
    if not texts:
        raise BadInput(f"no text found in {path.name}")
    return texts, column


def text_column_of(path: Path, text_column: str = "") -> str | None:
    """The column ``read_file`` takes the texts from (None for .txt and .jsonl of plain strings),
    read from the file's first rows with the readers' own checks (what the exported script uses)."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise BadInput(f"unsupported dataset type {suffix or '(no extension)'!r} for {path.name}; "
                       f"use builtin or a file ending in {', '.join(SUFFIXES)}")
    return _read_any(path, suffix, text_column, _SAMPLE, "auto", _Ticker(_SAMPLE, None, None))[1]


def _not_utf8(path: Path, lineno: int, exc: UnicodeDecodeError) -> BadInput:
    return BadInput(f"{path.name} is not UTF-8 text ({exc.reason} near line {lineno}); "
                    "convert it to UTF-8")


# ----- .txt ---------------------------------------------------------------------------------------
def _looks_like_paragraphs(lines: list[str]) -> bool:
    """Paragraphs (prose hard-wrapped over several lines) when blank lines separate multi-line
    blocks and are frequent enough for blocks of at most ~50 lines on average; otherwise one text
    per line, so a few stray blank lines in a long one-per-line file do not merge its texts."""
    run, multi_line, blocks, text_lines = 0, False, 0, 0
    for line in lines:
        if line.strip():
            blocks += run == 0
            run += 1
            text_lines += 1
            multi_line |= run > 1
        else:
            run = 0
    return multi_line and blocks >= 2 and text_lines <= 50 * blocks


def _read_txt(path: Path, limit: int, mode: str, tick: _Ticker) -> list[str]:
    lineno = 0
    try:
        with path.open(encoding="utf-8-sig", newline=None) as fh:
            if mode == "auto":
                peek = []
                for lineno, line in enumerate(bounded_lines(fh), 1):
                    peek.append(line)
                    if lineno >= _TXT_PEEK_LINES:
                        break
                mode = "paragraphs" if _looks_like_paragraphs(peek) else "lines"
                fh.seek(0)
                lineno = 0

            def lines() -> Iterator[str]:
                nonlocal lineno
                for lineno, line in enumerate(bounded_lines(fh), 1):
                    yield line

            return _take(txt_texts(lines(), mode), limit, tick)
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, lineno + 1, exc) from None


# ----- column detection (shared by csv, jsonl, parquet) ------------------------------------------
def _pick_column(path: Path, columns: list[str], samples: dict[str, list[Any]],
                 text_column: str) -> str:
    """The named column, else a conventionally named text column, else the string column with the
    longest average length. ``samples`` holds the first values of each column."""
    if text_column:
        if text_column not in columns:
            raise BadInput(f"column {text_column!r} not found in {path.name}; available: "
                           f"{', '.join(columns) or '(none)'}")
        return text_column
    stringy = [c for c in columns if _is_text(samples.get(c, []))]
    by_lower = {c.lower(): c for c in reversed(stringy)}  # first spelling wins on duplicates
    for name in TEXT_COLUMN_NAMES:
        if name in by_lower:
            return by_lower[name]
    if not stringy:
        raise BadInput(f"no text column in {path.name} (columns: {', '.join(columns) or '(none)'}); "
                       "name one with text_column / --text-column")

    def mean_len(c: str) -> float:
        vals = [v for v in samples[c] if isinstance(v, str) and v]
        return sum(map(len, vals)) / max(1, len(vals))

    return max(stringy, key=mean_len)  # max keeps the first column on ties


def _is_text(values: list[Any]) -> bool:
    """Mostly non-empty strings that are not numbers (CSV cells are all strings)."""
    present = [v for v in values if v not in (None, "")]
    if not present:
        return False
    texty = 0
    for v in present:
        if isinstance(v, str):
            try:
                float(v)
            except ValueError:
                texty += 1
    return texty * 2 > len(present)


# ----- .csv / .tsv --------------------------------------------------------------------------------
def _read_csv(path: Path, text_column: str, limit: int, delimiter: str,
              tick: _Ticker) -> tuple[list[str], str]:
    old_limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # long documents in one cell are normal; the default is 128 KiB
    reader = None
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh, delimiter=delimiter)
            header = next(reader, None)
            if not header:
                raise BadInput(f"{path.name} has no header row (the first row must name the columns)")
            header = [h.strip() for h in header]
            head_rows = [row for _, row in zip(range(_SAMPLE), reader)]
            if not any(any(cell.strip() for cell in row) for row in head_rows):
                raise BadInput(f"{path.name} has a header ({', '.join(header)[:80]}) but no rows")
            samples = {c: [row[i] if i < len(row) else None for row in head_rows]
                       for i, c in enumerate(header)}
            col = header.index(_pick_column(path, header, samples, text_column))

            def rows() -> Iterator[list[str]]:
                yield from head_rows
                yield from reader

            return _take(csv_texts(rows(), col), limit, tick), header[col]
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, (reader.line_num if reader else 0) + 1, exc) from None
    except csv.Error as exc:
        raise BadInput(f"{path.name} is not valid CSV near line {reader.line_num if reader else 1}: "
                       f"{exc}") from None
    finally:
        csv.field_size_limit(old_limit)


# ----- .jsonl -------------------------------------------------------------------------------------
def _read_jsonl(path: Path, text_column: str, limit: int, tick: _Ticker) -> tuple[list[str], str | None]:
    lineno = 0
    try:
        with path.open(encoding="utf-8-sig") as fh:

            def records() -> Iterator[Any]:
                nonlocal lineno
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    record = safe_json.loads(line, f"{path.name} line {lineno}")
                    if not isinstance(record, (dict, str)):
                        raise BadInput(f"{path.name} line {lineno} is a JSON {type(record).__name__}; "
                                       "each line must be an object (or a string)")
                    yield record

            stream = records()
            head = [r for _, r in zip(range(_SAMPLE), stream)]
            columns: list[str] = []
            for r in head:
                if isinstance(r, dict):
                    columns.extend(k for k in r if k not in columns)
            # A file of plain JSON strings has no columns: each string is a text.
            col = None
            if columns or text_column:
                samples = {c: [r.get(c) for r in head if isinstance(r, dict)] for c in columns}
                col = _pick_column(path, columns, samples, text_column)

            # plain strings are texts unless a column was named
            texts = jsonl_texts(_chain(head, stream), col, strings=not text_column)
            return _take(texts, limit, tick), col
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, lineno + 1, exc) from None


def _chain(head: list[Any], rest: Iterator[Any]) -> Iterator[Any]:
    yield from head
    yield from rest


# ----- .parquet -----------------------------------------------------------------------------------
def _read_parquet(path: Path, text_column: str, limit: int, tick: _Ticker) -> tuple[list[str], str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise BadInput("reading .parquet needs pyarrow (pip install pyarrow), "
                       "or convert the file to .jsonl or .csv") from None
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, ValueError) as exc:
        raise BadInput(f"{path.name} is not a valid Parquet file: {str(exc).splitlines()[0]}") from None
    try:
        schema = pf.schema_arrow
    except (pa.ArrowException, ValueError) as exc:
        raise BadInput(f"{path.name} has a Parquet schema Headroom cannot read: "
                       f"{str(exc).splitlines()[0][:120]}") from None
    columns = list(schema.names)
    duplicates = sorted({c for c in columns if columns.count(c) > 1})
    if duplicates:
        raise BadInput(f"{path.name} has duplicate column names ({', '.join(duplicates)[:80]}); "
                       "rename them so the text column is unambiguous")

    def is_string(t: Any) -> bool:
        return (pa.types.is_string(t) or pa.types.is_large_string(t)
                or (hasattr(pa.types, "is_string_view") and pa.types.is_string_view(t)))

    string_cols = [c for c in columns if is_string(schema.field(c).type)]
    if text_column:
        if text_column not in columns:
            raise BadInput(f"column {text_column!r} not found in {path.name}; available: "
                           f"{', '.join(columns) or '(none)'}")
        if text_column not in string_cols:
            raise BadInput(f"column {text_column!r} of {path.name} holds {schema.field(text_column).type}, "
                           "not text")
        col = text_column
    else:
        samples: dict[str, list[Any]] = {c: [] for c in string_cols}
        if string_cols and pf.metadata.num_rows:
            try:  # invalid UTF-8 in a string column surfaces in to_pylist (UnicodeDecodeError)
                first = next(pf.iter_batches(batch_size=_SAMPLE, columns=string_cols), None)
                if first is not None:
                    samples = {c: first.column(c).to_pylist() for c in string_cols}
            except (pa.ArrowException, ValueError) as exc:
                raise BadInput(f"{path.name} could not be read: {str(exc).splitlines()[0][:120]}") from None
        if not string_cols:
            raise BadInput(f"no text column in {path.name} (columns: {', '.join(columns) or '(none)'})")
        col = _pick_column(path, string_cols, samples, "")

    def values() -> Iterator[str]:
        try:
            yield from parquet_texts(pf, col)
        except (pa.ArrowException, ValueError) as exc:
            raise BadInput(f"{path.name} could not be read: {str(exc).splitlines()[0][:120]}") from None

    return _take(values(), limit, tick), col
