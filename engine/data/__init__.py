"""Datasets: the built-in sample corpus and the user's files; tokenization and length statistics.

    texts = load_texts("builtin")                      # or a .txt/.csv/.tsv/.jsonl/.parquet path
    tok = tokenizer_for(profile)                       # the model's own, else the bundled fallback
    lengths = [len(ids) for ids in tokenize(texts, tok)]
    stats = length_stats(lengths)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from engine.data.corpus import builtin_corpus, cache_dir
from engine.data.files import SUFFIXES, TEXT_COLUMN_NAMES, TXT_MODES, read_file
from engine.data.stats import LengthStats, length_stats
from engine.data.tokens import (
    FALLBACK_PATH,
    FALLBACK_SPECIAL_TOKENS,
    fallback_tokenizer,
    tokenize,
    tokenizer_for,
    tokenizer_info,
)
from engine.errors import BadInput, Cancelled

__all__ = [
    "DEFAULT_LIMIT",
    "FALLBACK_PATH",
    "FALLBACK_SPECIAL_TOKENS",
    "SUFFIXES",
    "TEXT_COLUMN_NAMES",
    "TXT_MODES",
    "LengthStats",
    "builtin_corpus",
    "cache_dir",
    "dataset_stats",
    "fallback_tokenizer",
    "length_stats",
    "load_texts",
    "tokenize",
    "tokenizer_for",
    "tokenizer_info",
]

#: Texts read from a dataset unless asked otherwise: plenty for length statistics and a few
#: hundred batches, and it keeps a multi-GB file from being read whole.
DEFAULT_LIMIT = 20_000


def load_texts(dataset: str = "builtin", text_column: str = "", limit: int | None = None, *,
               txt_mode: str = "auto",
               progress: Callable[[float, str], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> list[str]:
    """Up to ``limit`` (default ``DEFAULT_LIMIT``) non-empty texts, in file order.

    ``dataset`` is "builtin" or a path to .txt (one text per line, or per blank-line-separated
    paragraph: ``txt_mode`` auto|lines|paragraphs), .csv/.tsv (header row), .jsonl (objects, or
    plain strings) or .parquet. ``text_column`` names the column; empty finds it (a column named
    text/content/sentence/..., else the string column with the longest average length). It is
    ignored for the built-in corpus and .txt files, which have no columns.
    """
    limit = DEFAULT_LIMIT if limit is None else limit
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise BadInput(f"limit must be a positive integer; got {limit!r}")
    name = (dataset or "").strip()
    if not name:
        raise BadInput("dataset must be 'builtin' or a path to a .txt/.csv/.jsonl/.parquet file")
    if name.lower() == "builtin":
        if should_stop is not None and should_stop():
            raise Cancelled("loading the built-in corpus cancelled")
        texts = list(builtin_corpus()[:limit])
        if progress is not None:
            progress(1.0, f"built-in corpus: {len(texts)} texts")
        return texts
    return read_file(Path(name).expanduser(), text_column.strip(), limit, txt_mode,
                     progress, should_stop)


def dataset_stats(profile, progress: Callable[[float, str], None] | None = None,
                  should_stop: Callable[[], bool] | None = None, *, bins: int = 32,
                  log_bins: bool = False) -> LengthStats:
    """Token-length statistics of the profile's dataset with its model's tokenizer (untruncated).

    Lengths are heavy-tailed; ``log_bins=True`` gives a histogram that shows the tail.
    """
    def part(lo: float, hi: float):
        if progress is None:
            return None
        return lambda f, msg: progress(lo + (hi - lo) * f, msg)

    texts = load_texts(profile.dataset, profile.text_column, progress=part(0.0, 0.3),
                       should_stop=should_stop)
    tok = tokenizer_for(profile)
    ids = tokenize(texts, tok, progress=part(0.3, 1.0), should_stop=should_stop)
    return length_stats([len(x) for x in ids], bins=bins, log_bins=log_bins)
