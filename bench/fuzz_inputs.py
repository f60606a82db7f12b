"""Fuzz the profile loader and every dataset reader: any file a user could hand over ends in a
value or in one-line BadInput, never in another exception.

    PYTHONPATH=. python3 bench/fuzz_inputs.py --examples 10000          # every target
    PYTHONPATH=. python3 bench/fuzz_inputs.py --examples 500 --targets jsonl,csv

Each target is a hypothesis strategy of file contents (random bytes, near-valid structured
content, hostile numbers and nesting, odd encodings) and a check that reads the file with the
engine's own entry point (``engine.profile.load``, ``engine.data.files.read_file``) and asserts
what a success must look like. Outcomes are counted: ``ok`` (a value), ``refused`` (BadInput), and
``unexpected`` (anything else: a bug; the first few are printed with their input). Exit 1 on any
unexpected exception. tests/test_fuzz.py runs the same targets with a few hundred examples in CI.
"""

from __future__ import annotations

import argparse
import base64
import collections
import csv
import datetime
import io
import json
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import profile as profile_mod  # noqa: E402
from engine.data import files  # noqa: E402
from engine.errors import BadInput  # noqa: E402

# ----- building blocks ------------------------------------------------------------------------
_HOSTILE_INTS = st.sampled_from([0, -1, 1, 2**31, 2**63, 10**12, 10**400, -(10**30), 1 << 24, (1 << 24) + 1])
_HOSTILE_TEXT = st.sampled_from(["", " ", "\n", "eager\n", "expandable\n", "local:0", "local:-3",
                                 "local:" + "9" * 40, "pool:" + "9" * 400, "pool:-1GiB", "heads:1.5",
                                 "ffn:0.5\n", "\x00", "\u202e", "٣", "1e400", "NaN", "../../etc",
                                 "/proc/self/status", "x" * 5000, "gpt2", "tiny-gpt2", "builtin"])
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), _HOSTILE_INTS,
                     st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40), _HOSTILE_TEXT)
_JSON = st.recursive(_SCALARS, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=12)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _encode(text: str, how: str) -> bytes:
    if how == "utf-8-sig":
        return b"\xef\xbb\xbf" + text.encode("utf-8")
    return text.encode(how, errors="replace")


_ENCODINGS = st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-8-sig", "latin-1", "utf-16"])


@st.composite
def _mangled(draw, text: str) -> bytes:
    """``text`` encoded, sometimes cut, spliced with junk or with a hostile token inserted."""
    data = _encode(text, draw(_ENCODINGS))
    how = draw(st.sampled_from(["as-is", "as-is", "cut", "junk", "splice"]))
    if how == "cut" and data:
        data = data[: draw(st.integers(0, len(data)))]
    elif how == "junk":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(max_size=16)) + data[at:]
    elif how == "splice":
        at = draw(st.integers(0, len(data)))
        token = draw(st.sampled_from(["9" * 5000, _nested(5000), "NaN", "1e400", "\x00", "\n\n", '"', ","]))
        data = data[:at] + token.encode() + data[at:]
    return data


# ----- profile files ------------------------------------------------------------------------------
_FIELD_NAMES = st.sampled_from(sorted(profile_mod.FIELD_TYPES) + ["bacth", "", "__class__"])


@st.composite
def profile_files(draw) -> bytes:
    kind = draw(st.sampled_from(["fields", "fields", "fields", "json", "bytes", "nested"]))
    if kind == "bytes":
        return draw(st.binary(max_size=400))
    if kind == "nested":
        return ('{"name": ' + _nested(draw(st.integers(1, 100_000))) + "}").encode()
    if kind == "json":
        return draw(_mangled(json.dumps(draw(_JSON))))
    good = profile_mod.Profile().to_dict()
    data = {k: good[k] for k in draw(st.lists(st.sampled_from(sorted(good)), max_size=6))}
    data.update(draw(st.dictionaries(_FIELD_NAMES, _JSON, max_size=4)))
    return draw(_mangled(json.dumps(data, allow_nan=False)))


def check_profile(path: Path) -> str:
    p = profile_mod.load(path)
    assert profile_mod.from_dict(p.to_dict()) == p, "a loaded profile does not round-trip"
    return "ok"


# ----- datasets -----------------------------------------------------------------------------------
_CELL = st.one_of(st.text(max_size=30), _HOSTILE_TEXT, st.sampled_from(['"', '""', ",", "\n", "\r\n", "\t"]))
_COLUMN_NAMES = st.one_of(st.sampled_from(["text", "Text", "content", "body", "label", "id", "", " text "]),
                          st.text(max_size=8))


@st.composite
def txt_files(draw) -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(max_size=600))
    lines = draw(st.lists(st.one_of(st.text(max_size=60), st.just(""), _HOSTILE_TEXT), max_size=30))
    sep = draw(st.sampled_from(["\n", "\r\n", "\r", "\n\n"]))
    return draw(_mangled(sep.join(lines)))


@st.composite
def _table(draw, delimiter: str) -> str:
    header = draw(st.lists(_COLUMN_NAMES, max_size=5))
    rows = draw(st.lists(st.lists(_CELL, max_size=6), max_size=12))
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=delimiter)
    if header or draw(st.booleans()):
        writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _delimited(delimiter: str):
    @st.composite
    def files_(draw) -> bytes:
        if draw(st.integers(0, 4)) == 0:
            return draw(st.binary(max_size=600))
        return draw(_mangled(draw(_table(delimiter))))
    return files_


@st.composite
def jsonl_files(draw) -> bytes:
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=600))
    records = draw(st.lists(st.one_of(
        st.fixed_dictionaries({"text": st.text(max_size=40)}, optional={"id": _JSON, "body": _CELL}),
        st.dictionaries(_COLUMN_NAMES, _JSON, max_size=4), _JSON, st.text(max_size=40)), max_size=12))
    lines = [json.dumps(r, allow_nan=False) for r in records]
    if draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))),
                     draw(st.sampled_from(['{"text": ' + "9" * 5000 + "}", '{"text": ' + _nested(3000) + "}",
                                           "{text: 1}", "[1,2]", '{"text": NaN}', "", "null"])))
    return draw(_mangled("\n".join(lines)))


@st.composite
def parquet_files(draw) -> bytes:
    if draw(st.integers(0, 3)) == 0:
        junk = draw(st.binary(max_size=300))
        return b"PAR1" + junk + b"PAR1" if draw(st.booleans()) else junk
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = draw(st.integers(0, 8))
    columns, names = [], []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["string", "string", "int", "float", "binary", "list", "null"]))
        if kind == "string":
            values = draw(st.lists(st.one_of(st.none(), st.text(max_size=30), _HOSTILE_TEXT), min_size=n, max_size=n))
            columns.append(pa.array(values, type=pa.string()))
        elif kind == "int":
            columns.append(pa.array(draw(st.lists(st.integers(-2**63, 2**63 - 1), min_size=n, max_size=n)),
                                    type=pa.int64()))
        elif kind == "float":
            columns.append(pa.array(draw(st.lists(st.floats(), min_size=n, max_size=n)), type=pa.float64()))
        elif kind == "binary":
            columns.append(pa.array(draw(st.lists(st.binary(max_size=20), min_size=n, max_size=n)),
                                    type=pa.binary()))
        elif kind == "list":
            columns.append(pa.array(draw(st.lists(st.lists(st.text(max_size=5), max_size=3), min_size=n,
                                                  max_size=n)), type=pa.list_(pa.string())))
        else:
            columns.append(pa.nulls(n))
        names.append(draw(_COLUMN_NAMES))
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_arrays(columns, names=names) if columns else pa.table({}), buf)
    data = buf.getvalue()
    if draw(st.integers(0, 5)) == 0 and len(data) > 8:  # a damaged file: a few bytes flipped
        at = draw(st.integers(4, len(data) - 5))
        data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]
    return data


_TEXT_COLUMNS = st.one_of(st.just(""), st.just(""), _COLUMN_NAMES)


def _check_reader(limit_cap: int = 50) -> Callable[[Path, str, int], str]:
    def check(path: Path, text_column: str, limit: int) -> str:
        texts = files.read_file(path, text_column, limit)
        assert isinstance(texts, list) and 0 < len(texts) <= limit, "texts outside 1..limit"
        assert all(isinstance(t, str) and t.strip() and len(t) <= files.MAX_TEXT_CHARS for t in texts), \
            "a text that is not a non-empty string within MAX_TEXT_CHARS"
        return "ok"
    return check


@dataclass(frozen=True)
class Target:
    name: str  # the file kind
    suffix: str  # file name suffix the reader dispatches on
    contents: Any  # hypothesis strategy of file bytes
    check: Callable[..., str]  # reads the file; "ok", or raises
    takes_column: bool = True  # reader called with (path, text_column, limit)


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("profile", ".json", profile_files(), check_profile, takes_column=False),
    Target("txt", ".txt", txt_files(), _check_reader()),
    Target("csv", ".csv", _delimited(",")(), _check_reader()),
    Target("tsv", ".tsv", _delimited("\t")(), _check_reader()),
    Target("jsonl", ".jsonl", jsonl_files(), _check_reader()),
    Target("parquet", ".parquet", parquet_files(), _check_reader()),
)}


@dataclass
class Tally:
    counts: collections.Counter = field(default_factory=collections.Counter)
    failures: list[tuple[bytes, str]] = field(default_factory=list)


def run_case(target: Target, folder: Path, data: bytes, text_column: str = "", limit: int = 50,
             tally: Tally | None = None) -> str:
    """Write ``data`` as the target's file and read it back; the outcome (raises on a bug unless a
    tally is given, which records it)."""
    path = folder / f"input{target.suffix}"
    path.write_bytes(data)
    try:
        try:
            outcome = target.check(path) if not target.takes_column else target.check(path, text_column, limit)
        except BadInput as exc:
            msg = str(exc)
            if "\n" in msg or "\r" in msg or not msg.strip() or len(msg) > 1000:
                raise AssertionError(f"BadInput is not one short line: {msg[:300]!r}") from None
            outcome = "refused"
    except Exception:  # noqa: BLE001 - that is what is being looked for
        if tally is None:
            raise
        tally.counts["unexpected"] += 1
        if len(tally.failures) < 5:
            tally.failures.append((data, traceback.format_exc()))
        return "unexpected"
    if tally is not None:
        tally.counts[outcome] += 1
    return outcome


def fuzz(target: Target, examples: int, folder: Path, seed: int | None = None) -> Tally:
    tally = Tally()

    @settings(max_examples=examples, deadline=None, database=None, derandomize=seed is not None,
              suppress_health_check=list(HealthCheck))
    @given(data=target.contents, text_column=_TEXT_COLUMNS, limit=st.sampled_from([1, 3, 50]))
    def case(data, text_column, limit):
        run_case(target, folder, data, text_column, limit, tally)

    case()
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000, help="cases per target")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated: " + ", ".join(TARGETS))
    parser.add_argument("--json", metavar="PATH", help="also write the counts as JSON")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    results: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                               "machine": f"{platform.node()} ({platform.machine()}, {platform.system()})",
                               "python": platform.python_version(), "examples_per_target": args.examples,
                               "targets": {}}
    bad = 0
    with tempfile.TemporaryDirectory(prefix="headroom-fuzz-") as tmp:
        for name in names:
            started = time.perf_counter()
            tally = fuzz(TARGETS[name], args.examples, Path(tmp))
            took = time.perf_counter() - started
            total = sum(tally.counts.values())
            results["targets"][name] = {**dict(tally.counts), "cases": total, "seconds": round(took, 1)}
            print(f"{name:8} cases {total:6,}  ok {tally.counts['ok']:6,}  refused (BadInput) "
                  f"{tally.counts['refused']:6,}  unexpected {tally.counts['unexpected']}  ({took:.0f} s)",
                  flush=True)
            for data, tb in tally.failures:  # the whole input, base64, to replay it with run_case
                print(f"  input ({len(data)} bytes, base64) {base64.b64encode(data[:8192]).decode()}\n"
                      + "\n".join("    " + line for line in tb.splitlines()[-12:]))
            bad += tally.counts["unexpected"]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
