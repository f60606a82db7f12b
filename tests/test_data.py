"""engine.data: built-in corpus, file readers, tokenizers, length statistics."""

from __future__ import annotations

import json
import sys
import time
import types

import numpy as np
import pytest

import engine
from engine.data import (
    DEFAULT_LIMIT,
    FALLBACK_SPECIAL_TOKENS,
    LengthStats,
    builtin_corpus,
    dataset_stats,
    fallback_tokenizer,
    length_stats,
    load_texts,
    tokenize,
    tokenizer_for,
)
from engine.data import corpus as corpus_mod
from engine.errors import BadInput, Cancelled
from engine.profile import Profile


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """The corpus' disk cache goes to a temporary folder, never the user's home."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def bad_input(fn, *args, match: str = "", **kwargs) -> str:
    """Call fn, expect BadInput with a one-line message containing ``match``; return the message."""
    with pytest.raises(BadInput) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and msg.strip(), msg
    assert match.lower() in msg.lower(), msg
    return msg


@pytest.fixture(scope="module")
def fallback():
    return fallback_tokenizer()


@pytest.fixture
def no_models(monkeypatch):
    """engine.models without load_tokenizer (as before that module lands)."""
    fake = types.ModuleType("engine.models")
    monkeypatch.setitem(sys.modules, "engine.models", fake)
    monkeypatch.setattr(engine, "models", fake, raising=False)


@pytest.fixture
def models_returning(monkeypatch):
    def install(tok):
        fake = types.ModuleType("engine.models")
        fake.load_tokenizer = lambda profile: tok
        monkeypatch.setitem(sys.modules, "engine.models", fake)
        monkeypatch.setattr(engine, "models", fake, raising=False)
    return install


# ----- built-in corpus ----------------------------------------------------------------------------
def test_builtin_corpus_is_large_real_text_and_deterministic():
    texts = builtin_corpus()
    assert isinstance(texts, tuple)
    assert len(texts) >= 2000
    assert all(isinstance(t, str) and t == t.strip() and len(t.split()) >= corpus_mod.MIN_WORDS
               for t in texts)
    assert len(set(texts)) == len(texts)
    assert corpus_mod.build_corpus() == texts  # a fresh build gives the same texts in the same order
    lengths = sorted(len(t) for t in texts)
    # Heavy tail: the longest text is far beyond the typical one.
    assert lengths[-1] > 50 * lengths[len(lengths) // 2]


def test_builtin_corpus_disk_cache_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "build_corpus", lambda: ("alpha beta", "gamma delta epsilon"))
    assert corpus_mod.load_or_build() == ("alpha beta", "gamma delta epsilon")
    path = corpus_mod._cache_path()
    assert path.is_file() and str(path).startswith(str(tmp_path))
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["texts"] == ["alpha beta", "gamma delta epsilon"]

    def fail():
        raise AssertionError("the disk cache should have been used")

    monkeypatch.setattr(corpus_mod, "build_corpus", fail)
    assert corpus_mod.load_or_build() == ("alpha beta", "gamma delta epsilon")

    # A damaged cache file is ignored and rebuilt, never trusted.
    path.write_text('{"format": 2, "texts": [1, 2]}', encoding="utf-8")
    monkeypatch.setattr(corpus_mod, "build_corpus", lambda: ("rebuilt text here",))
    assert corpus_mod.load_or_build() == ("rebuilt text here",)
    path.write_text('not json', encoding="utf-8")
    assert corpus_mod.load_or_build() == ("rebuilt text here",)


def test_builtin_corpus_tolerates_unwritable_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # mkdir under a file fails
    monkeypatch.setattr(corpus_mod, "build_corpus", lambda: ("some text in here",))
    assert corpus_mod.load_or_build() == ("some text in here",)


def test_load_texts_builtin_and_limit():
    assert load_texts() == list(builtin_corpus()[:DEFAULT_LIMIT])
    assert load_texts("builtin", limit=5) == list(builtin_corpus()[:5])
    assert load_texts("BUILTIN", text_column="ignored", limit=3) == list(builtin_corpus()[:3])
    bad_input(load_texts, "builtin", limit=0, match="limit")
    bad_input(load_texts, "", match="dataset")


# ----- files ----------------------------------------------------------------------------------------
def test_txt_one_text_per_line(tmp_path):
    p = tmp_path / "lines.txt"
    p.write_text("first text\n\nsecond text\n\n  third text  \n\n", encoding="utf-8")
    assert load_texts(str(p)) == ["first text", "second text", "third text"]
    # A blank line between two single-line texts is not paragraphs; nor are a few stray blank
    # lines in a long file of one text per line.
    stray = tmp_path / "stray.txt"
    stray.write_text("".join(f"text {i}\n" + ("\n" if i % 200 == 199 else "") for i in range(1000)),
                     encoding="utf-8")
    assert len(load_texts(str(stray))) == 1000
    assert load_texts(str(p), txt_mode="lines") == ["first text", "second text", "third text"]


def test_txt_paragraphs_detected_and_explicit(tmp_path):
    p = tmp_path / "paras.txt"
    p.write_text("para one line a\npara one line b\n\npara two\n\n\npara three a\npara three b\n",
                 encoding="utf-8")
    assert load_texts(str(p)) == ["para one line a\npara one line b", "para two",
                                  "para three a\npara three b"]
    assert load_texts(str(p), txt_mode="lines")[:2] == ["para one line a", "para one line b"]
    single = tmp_path / "single.txt"
    single.write_text("a\nb\nc\n", encoding="utf-8")
    assert load_texts(str(single), txt_mode="paragraphs") == ["a\nb\nc"]
    bad_input(load_texts, str(single), txt_mode="words", match="txt_mode")


def test_txt_with_bom_and_crlf(tmp_path):
    p = tmp_path / "bom.txt"
    p.write_bytes("\ufeffhello there\r\nsecond line\r\n".encode("utf-8"))
    assert load_texts(str(p)) == ["hello there", "second line"]


def test_csv_column_detection_and_naming(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('id,label,Text,note\n1,0,"a long review, with a comma",x\n2,1,another one,y\n',
                 encoding="utf-8")
    assert load_texts(str(p)) == ["a long review, with a comma", "another one"]  # named "Text"
    assert load_texts(str(p), text_column="note") == ["x", "y"]
    msg = bad_input(load_texts, str(p), text_column="body", match="'body' not found")
    assert "id, label, Text, note" in msg

    q = tmp_path / "unnamed.csv"
    q.write_text("num,short,long\n1,ab,a much longer string here\n2.5,cd,and another long one\n",
                 encoding="utf-8")
    assert load_texts(str(q)) == ["a much longer string here", "and another long one"]


def test_csv_long_cells_and_tsv(tmp_path):
    long_text = "word " * 60_000  # beyond the csv module's default 128 KiB field limit
    p = tmp_path / "long.csv"
    p.write_text(f'text\n"{long_text}"\nshort\n', encoding="utf-8")
    assert load_texts(str(p)) == [long_text, "short"]
    t = tmp_path / "d.tsv"
    t.write_text("score\tsentence\n3\tfirst, sentence\n4\tsecond\n", encoding="utf-8")
    assert load_texts(str(t)) == ["first, sentence", "second"]


def test_jsonl_detection_naming_and_strings(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"id": 1, "meta": "m", "content": "first doc"}, {"id": 2, "meta": "n", "content": "second doc"}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert load_texts(str(p)) == ["first doc", "second doc"]
    assert load_texts(str(p), text_column="meta") == ["m", "n"]
    bad_input(load_texts, str(p), text_column="text", match="available: id, meta, content")

    q = tmp_path / "longest.jsonl"
    q.write_text('{"a": "xy", "b": "a longer value", "c": 3}\n{"a": "zz", "b": "more text here"}\n',
                 encoding="utf-8")
    assert load_texts(str(q)) == ["a longer value", "more text here"]

    s = tmp_path / "strings.jsonl"
    s.write_text('"just a string"\n"another string"\n', encoding="utf-8")
    assert load_texts(str(s)) == ["just a string", "another string"]


def test_jsonl_bad_line_names_its_number(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "ok too"}\n\n{"text": broken}\n', encoding="utf-8")
    bad_input(load_texts, str(p), match="line 4")
    q = tmp_path / "list.jsonl"
    q.write_text('[1, 2]\n', encoding="utf-8")
    bad_input(load_texts, str(q), match="line 1")


def test_parquet_detection_and_naming(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "d.parquet"
    table = pa.table({"n": [1, 2, 3], "title": ["t1", "t2", "t3"],
                      "passage_text": ["a long passage one", None, "a long passage three"]})
    pq.write_table(table, p)
    assert load_texts(str(p)) == ["a long passage one", "a long passage three"]
    assert load_texts(str(p), text_column="title") == ["t1", "t2", "t3"]
    bad_input(load_texts, str(p), text_column="text", match="available: n, title, passage_text")
    bad_input(load_texts, str(p), text_column="n", match="not text")

    named = tmp_path / "named.parquet"
    pq.write_table(pa.table({"document": ["x y", "z"], "other": ["much longer text", "yes"]}), named)
    assert load_texts(str(named)) == ["x y", "z"]

    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"a": [1, 2], "b": [0.5, 1.5]}), numbers)
    bad_input(load_texts, str(numbers), match="no text column")

    fake = tmp_path / "fake.parquet"
    fake.write_bytes(b"this is not parquet at all")
    bad_input(load_texts, str(fake), match="not a valid Parquet")


def test_parquet_without_pyarrow_is_bad_input(tmp_path, monkeypatch):
    p = tmp_path / "d.parquet"
    p.write_bytes(b"PAR1....PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    bad_input(load_texts, str(p), match="pyarrow")


def test_bad_inputs_are_one_line(tmp_path):
    bad_input(load_texts, str(tmp_path / "missing.txt"), match="not found")
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    bad_input(load_texts, str(empty), match="empty")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n   \n", encoding="utf-8")
    bad_input(load_texts, str(blank), match="no text")
    bad_input(load_texts, str(tmp_path), match="folder")
    other = tmp_path / "data.xlsx"
    other.write_bytes(b"PK")
    bad_input(load_texts, str(other), match="unsupported dataset type '.xlsx'")
    numeric = tmp_path / "numbers.csv"
    numeric.write_text("a,b\n1,2\n3,4.5\n", encoding="utf-8")
    bad_input(load_texts, str(numeric), match="no text column")
    numeric_jsonl = tmp_path / "numbers.jsonl"
    numeric_jsonl.write_text('{"a": 1}\n{"a": 2}\n', encoding="utf-8")
    bad_input(load_texts, str(numeric_jsonl), match="no text column")
    for suffix, content in ((".txt", b"caf\xe9\n"), (".csv", b"text\ncaf\xe9\n"),
                            (".jsonl", b'{"text": "caf\xe9"}\n')):
        latin1 = tmp_path / f"latin1{suffix}"
        latin1.write_bytes(content)
        bad_input(load_texts, str(latin1), match="not UTF-8")


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".jsonl"])
def test_limited_read_stops_early(tmp_path, suffix):
    """A big file with garbage at its end: reading `limit` texts never reaches the garbage."""
    n = 200_000
    p = tmp_path / f"big{suffix}"
    with p.open("wb") as fh:
        if suffix == ".csv":
            fh.write(b"id,text\n")
        for i in range(n):
            line = {".txt": f"text number {i} of the big file",
                    ".csv": f"{i},text number {i} of the big file",
                    ".jsonl": json.dumps({"text": f"text number {i} of the big file"})}[suffix]
            fh.write(line.encode() + b"\n")
        fh.write(b"\xff\xfe not utf-8 and {not json\n")
    start = time.perf_counter()
    texts = load_texts(str(p), limit=1000)
    assert len(texts) == 1000 and texts[999] == "text number 999 of the big file"
    assert time.perf_counter() - start < 1.0
    with pytest.raises(BadInput):  # the garbage is really there
        load_texts(str(p), limit=n + 1)


def test_limited_parquet_read(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(100_000)]}), p, row_group_size=5000)
    start = time.perf_counter()
    texts = load_texts(str(p), limit=1234)
    assert len(texts) == 1234 and texts[-1] == "row 1233"
    assert time.perf_counter() - start < 1.0


def test_load_texts_reports_progress_and_cancels(tmp_path):
    p = tmp_path / "many.txt"
    p.write_text("".join(f"line {i}\n" for i in range(5000)), encoding="utf-8")
    seen = []
    load_texts(str(p), progress=lambda f, msg: seen.append(f))
    assert seen and all(0 <= f <= 1 for f in seen)
    with pytest.raises(Cancelled):
        load_texts(str(p), should_stop=lambda: True)


# ----- tokenizers -----------------------------------------------------------------------------------
def test_fallback_tokenizer_roundtrips_and_has_special_tokens(fallback):
    assert len(fallback) == 8192
    for attr, token in FALLBACK_SPECIAL_TOKENS.items():
        assert getattr(fallback, attr) == token
        assert getattr(fallback, attr + "_id") is not None
    for text in ["Return the number of items.", "  indented\n\tcode = f(x) ", "naïve café — 漢字 🙂", ""]:
        ids = fallback(text, add_special_tokens=True)["input_ids"]
        assert fallback.decode(ids) == text
        assert fallback.unk_token_id not in ids  # byte-level: nothing is unknown
    # A fresh object per call: changing one does not change the next.
    fallback.pad_token = fallback.eos_token
    assert fallback_tokenizer().pad_token == "<pad>"


def test_tokenizer_for_falls_back(no_models, fallback):
    tok = tokenizer_for(Profile())
    assert tok.pad_token == "<pad>" and len(tok) == len(fallback)


def test_tokenizer_for_uses_models_and_adds_pad_on_a_copy(models_returning):
    own = fallback_tokenizer()
    own.pad_token = None
    models_returning(own)
    tok = tokenizer_for(Profile())
    assert tok.pad_token == tok.eos_token == "</s>"
    assert own.pad_token is None  # the (possibly shared) original is untouched

    with_pad = fallback_tokenizer()
    models_returning(with_pad)
    assert tokenizer_for(Profile()) is with_pad

    models_returning(None)
    assert tokenizer_for(Profile()).pad_token == "<pad>"


def test_tokenize_truncates_without_padding(fallback):
    texts = ["short one", "a considerably longer text " * 20]
    ids = tokenize(texts, fallback)
    assert len(ids[1]) > 20 > len(ids[0]) > 0
    assert ids[0] == fallback("short one")["input_ids"]
    cut = tokenize(texts, fallback, max_length=16)
    assert [len(x) for x in cut] == [len(ids[0]), 16] and cut[1] == ids[1][:16]
    bad_input(tokenize, texts, fallback, max_length=0, match="max_length")


def test_tokenize_whole_corpus_quickly(fallback):
    texts = builtin_corpus()
    start = time.perf_counter()
    ids = tokenize(texts, fallback)
    assert time.perf_counter() - start < 10
    assert len(ids) == len(texts) and all(ids)
    lengths = np.array([len(x) for x in ids])
    # The property: fixed padding to 512 leaves only a small fraction of tokens useful.
    useful = np.minimum(lengths, 512).sum() / (len(lengths) * 512)
    assert 0.08 < useful < 0.20


def test_tokenize_cancel(fallback):
    with pytest.raises(Cancelled):
        tokenize(["a", "b"], fallback, should_stop=lambda: True)


# ----- length statistics ----------------------------------------------------------------------------
def test_length_stats_on_known_list():
    lengths = [5, 1, 9, 3, 7, 100, 2, 2]
    s = length_stats(lengths, bins=4)
    arr = np.array(lengths)
    assert (s.count, s.min, s.max, s.total_tokens) == (8, 1, 100, 129)
    assert s.mean == pytest.approx(129 / 8)
    assert s.median == pytest.approx(np.percentile(arr, 50)) == 4.0
    assert s.p90 == pytest.approx(np.percentile(arr, 90))
    assert s.p99 == pytest.approx(np.percentile(arr, 99))
    assert s.histogram_edges == (1.0, 25.75, 50.5, 75.25, 100.0)
    assert s.histogram_counts == (7, 0, 0, 1)
    d = s.to_dict()
    assert json.loads(json.dumps(d)) == d and LengthStats.from_dict(d) == s

    log = length_stats(lengths, bins=3, log_bins=True)
    assert sum(log.histogram_counts) == 8 and log.histogram_edges[0] == 1 and log.histogram_edges[-1] == 100

    same = length_stats([4, 4, 4])
    assert same.histogram_counts == (3,) and same.median == 4.0
    assert length_stats([]) == LengthStats(0, 0.0, 0.0, 0.0, 0.0, 0, 0, 0)
    bad_input(length_stats, [1, -2], match="negative")


def test_dataset_stats_builtin(no_models):
    s = dataset_stats(Profile())
    assert s.count == len(builtin_corpus())
    assert s.min >= 1 and s.max > 5000 and s.mean > 2 * s.median  # heavy-tailed
    assert sum(s.histogram_counts) == s.count
    log = dataset_stats(Profile(), bins=10, log_bins=True)
    assert len(log.histogram_counts) == 10 and sum(log.histogram_counts) == s.count


def test_dataset_stats_of_a_file(no_models, tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"body": "hello world"}\n{"body": "a somewhat longer text here"}\n', encoding="utf-8")
    s = dataset_stats(Profile(dataset=str(p)))
    assert s.count == 2 and s.min < s.max
