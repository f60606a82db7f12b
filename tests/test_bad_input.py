"""Bad input, as a careless or hostile user gives it: every case is one line on stderr, exit 2, no
traceback, and nothing written (the working folder is byte-for-byte and mode-for-mode unchanged).

Each case builds its files in a fresh working folder, then the CLI runs there in this process
(engine.cli.main with captured streams: fast). Library chatter on the real stderr is checked
separately, in a child process (test_library_chatter_stays_out_of_stderr_unless_verbose).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from _cli import run_cli, run_cli_process, snapshot

from engine.models import PRESET_DIR

TINY = ["--model", "tiny-gpt2", "--target", "cpu", "--batch", "2", "--seq", "16"]
MEASURE = ["measure", "--target", "cpu", "--batch", "1", "--seq", "8", "--steps", "1"]
DIGITS_400 = "7" * 400


def write(path: Path, content) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(json.dumps(content))
    return path


def profile(tmp: Path, text: str | bytes, name: str = "p.json") -> list[str]:
    return ["estimate", str(write(tmp / name, text))]


def model_dir(tmp: Path, base: str = "tiny-gpt2", **changes) -> Path:
    folder = tmp / "model"
    folder.mkdir()
    config = json.loads((PRESET_DIR / base / "config.json").read_text())
    config.update(changes)
    write(folder / "config.json", config)
    return folder


def config_text(tmp: Path, text: str) -> list[str]:
    folder = tmp / "model"
    folder.mkdir()
    write(folder / "config.json", text)
    return ["estimate", "--model", str(folder)]


def dataset(tmp: Path, name: str, content, command: str = "estimate") -> list[str]:
    path = write(tmp / name, content)
    if command == "export":
        return ["export", *TINY, "--dataset", str(path), "--padding", "dynamic", "-o", str(tmp / "out.py")]
    return [command, *TINY, "--dataset", str(path), "--padding", "dynamic"]


def parquet_with_duplicate_columns(tmp: Path) -> list[str]:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.Table.from_arrays([pa.array(["a text", "b text"]), pa.array(["c text", "d text"])],
                                 names=["text", "text"])
    pq.write_table(table, tmp / "dup.parquet")
    return ["estimate", *TINY, "--dataset", str(tmp / "dup.parquet"), "--padding", "dynamic"]


def parquet_with_invalid_utf8(tmp: Path) -> list[str]:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    column = pa.array([b"good text here", b"\xff\xfe bad"], type=pa.binary()).view(pa.string())
    pq.write_table(pa.table({"text": column}), tmp / "bad-utf8.parquet")
    return ["estimate", *TINY, "--dataset", str(tmp / "bad-utf8.parquet"), "--padding", "dynamic"]


def tokenizer_folder(tmp: Path, files: dict[str, str], base: str = "tiny-gpt2") -> list[str]:
    folder = model_dir(tmp, base)
    for name, text in files.items():
        write(folder / name, text)
    return ["inspect", "--model", str(folder), "--dataset", "builtin"]


def read_only_target(tmp: Path) -> list[str]:
    target = write(tmp / "keep.json", '{"name": "mine"}\n')
    target.chmod(0o444)
    return ["estimate", *TINY, "--save", str(target)]


def immutable_target(tmp: Path) -> list[str]:
    target = write(tmp / "frozen.json", '{"name": "mine"}\n')
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(target)],
                                                        capture_output=True).returncode != 0:
        pytest.skip("cannot make an immutable file here (chattr +i)")
    return ["estimate", *TINY, "--save", str(target)]


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


CASES = {
    # ----- profile files
    "profile-int-5000-digits": lambda t: profile(t, '{"batch": ' + "9" * 5000 + "}"),
    "profile-int-4000-digits": lambda t: profile(t, '{"batch": ' + "9" * 4000 + "}"),
    "profile-nested-100000": lambda t: profile(t, '{"name": ' + nested(100_000) + "}"),
    "profile-nested-200-in-field": lambda t: profile(t, '{"model": ' + nested(200) + "}"),
    "profile-is-a-folder": lambda t: ["estimate", str(t)],
    "profile-missing": lambda t: ["estimate", str(t / "nope.json")],
    "profile-not-utf8": lambda t: profile(t, b'{"name": "\xff\xfe"}'),
    "profile-not-json": lambda t: profile(t, "{batch: 8"),
    "profile-empty-file": lambda t: profile(t, ""),
    "profile-json-array": lambda t: profile(t, "[1, 2]"),
    "profile-unknown-field": lambda t: profile(t, '{"bacth": 8}'),
    "profile-wrong-type": lambda t: profile(t, '{"batch": "8"}'),
    "profile-bool-for-int": lambda t: profile(t, '{"batch": true}'),
    "profile-nan": lambda t: profile(t, '{"batch": NaN}'),
    "profile-1e400": lambda t: profile(t, '{"batch": 1e400}'),
    "profile-newer-schema": lambda t: profile(t, '{"schema_version": 99}'),
    "profile-long-name": lambda t: profile(t, json.dumps({"name": "x" * 100_000})),
    "profile-nul-in-model": lambda t: profile(t, '{"model": "gpt2\\u0000"}'),
    "profile-attn-newline": lambda t: profile(t, '{"attn": "eager\\n"}'),
    "profile-huge-file": lambda t: profile(t, '{"name": "' + "x" * (2 << 20) + '"}'),
    # ----- flags
    "batch-10**12": lambda t: ["estimate", *TINY, "--batch", str(10**12)],
    "batch-zero": lambda t: ["estimate", *TINY, "--batch", "0"],
    "batch-not-a-number": lambda t: ["estimate", *TINY, "--batch", "eight"],
    "seq-negative": lambda t: ["estimate", *TINY, "--seq", "-1"],
    "memory-cap-negative": lambda t: ["estimate", *TINY, "--memory-cap", "-5"],
    "memory-cap-400-digits": lambda t: ["estimate", *TINY, "--memory-cap", DIGITS_400],
    "memory-cap-bad-unit": lambda t: ["estimate", *TINY, "--memory-cap", "12XB"],
    "budget-400-digits": lambda t: ["plan", *TINY, "--budget", DIGITS_400],
    "budget-negative": lambda t: ["plan", *TINY, "--budget=-1GiB"],
    "pool-400-digits": lambda t: ["estimate", *TINY, "--alloc", "pool:" + DIGITS_400],
    "alloc-expandable-newline": lambda t: ["estimate", *TINY, "--alloc", "expandable\n"],
    "attn-eager-newline": lambda t: ["estimate", *TINY, "--attn", "eager\n"],
    "attn-local-zero": lambda t: ["estimate", *TINY, "--attn", "local:0"],
    "attn-local-huge": lambda t: ["estimate", *TINY, "--attn", "local:" + "9" * 30],
    "prune-above-one": lambda t: ["estimate", *TINY, "--prune", "heads:1.5"],
    "prune-newline": lambda t: ["estimate", *TINY, "--prune", "ffn:0.5\n"],
    "max-split-too-small": lambda t: ["estimate", *TINY, "--alloc-max-split", "10MiB"],
    "precision-unknown": lambda t: ["estimate", *TINY, "--precision", "fp8"],
    "unknown-flag": lambda t: ["estimate", *TINY, "--bacth", "4"],
    "no-command": lambda t: [],
    "model-unknown-preset": lambda t: ["estimate", "--model", "gpt-17"],
    "model-folder-without-config": lambda t: ["estimate", "--model", str(t)],
    "model-is-a-file": lambda t: ["estimate", "--model", str(write(t / "weights.bin", b"x"))],
    # Hub ids (HF_HUB_OFFLINE=1 in tests: nothing is fetched; tests/test_hub.py has the cached cases)
    "hub-id-not-cached-offline": lambda t: ["estimate", "--model", "headroom-tests/never-cached"],
    "hub-id-empty-revision": lambda t: ["estimate", "--model", "org/name@"],
    "hub-id-revision-dotdot": lambda t: ["estimate", "--model", "org/name@../../etc"],
    "hub-id-revision-newline": lambda t: ["estimate", "--model", "org/name@main\nx"],
    # ----- config.json
    "config-n_embd-10**9": lambda t: ["estimate", "--model", str(model_dir(t, n_embd=10**9, n_head=1))],
    "config-n_head-zero": lambda t: ["estimate", "--model", str(model_dir(t, n_head=0))],
    "config-n_head-string": lambda t: ["estimate", "--model", str(model_dir(t, n_head="four"))],
    "config-n_layer-negative": lambda t: ["estimate", "--model", str(model_dir(t, n_layer=-2))],
    "config-int-5000-digits": lambda t: config_text(t, '{"model_type": "gpt2", "n_embd": ' + "9" * 5000 + "}"),
    "config-nested": lambda t: config_text(t, '{"model_type": "gpt2", "x": ' + nested(50_000) + "}"),
    "config-not-json": lambda t: config_text(t, "model_type = gpt2"),
    "config-array": lambda t: config_text(t, "[]"),
    "config-no-model-type": lambda t: config_text(t, '{"n_embd": 64}'),
    "config-heads-not-dividing": lambda t: ["estimate", "--model", str(model_dir(t, n_embd=65, n_head=4))],
    # ----- weights and tokenizers
    "fake-model-safetensors": lambda t: (write(model_dir(t) / "model.safetensors", b"\x00" * 100),
                                         [*MEASURE, "--model", str(t / "model")])[1],
    "stray-safetensors": lambda t: (write(model_dir(t) / "copy.safetensors", b"junk"),
                                    [*MEASURE, "--model", str(t / "model")])[1],
    "index-points-at-bin": lambda t: (write(model_dir(t) / "model.safetensors.index.json",
                                            {"weight_map": {"w": "pytorch_model.bin"}}),
                                      [*MEASURE, "--model", str(t / "model")])[1],
    "malformed-tokenizer-json": lambda t: tokenizer_folder(t, {"tokenizer.json": '{"model": {"type": "BPE"'}),
    "tokenizer-json-wrong-shape": lambda t: tokenizer_folder(t, {"tokenizer.json": '{"model": 3}'}),
    "vocab-txt-without-unk": lambda t: tokenizer_folder(t, {"vocab.txt": "[CLS]\n[SEP]\n[PAD]\nhello\n"},
                                                        base="tiny-bert"),
    # ----- datasets
    "csv-header-only": lambda t: dataset(t, "d.csv", "text,label\n"),
    "csv-not-utf8": lambda t: dataset(t, "d.csv", b"text\n\xff\xfe bad bytes\n"),
    "export-csv-not-utf8": lambda t: dataset(t, "d.csv", b"text\n\xff\xfe bad bytes\n", "export"),
    "export-fake-parquet": lambda t: dataset(t, "d.parquet", b"PAR1 this is not parquet", "export"),
    "fake-parquet": lambda t: dataset(t, "d.parquet", b"not a parquet file at all"),
    "parquet-duplicate-columns": parquet_with_duplicate_columns,
    "parquet-invalid-utf8": parquet_with_invalid_utf8,
    "jsonl-int-5000-digits": lambda t: dataset(t, "d.jsonl", '{"text": "a", "n": ' + "9" * 5000 + "}\n"),
    "jsonl-nested": lambda t: dataset(t, "d.jsonl", '{"text": ' + nested(100_000) + "}\n"),
    "jsonl-array-line": lambda t: dataset(t, "d.jsonl", "[1, 2, 3]\n"),
    "jsonl-not-json": lambda t: dataset(t, "d.jsonl", "{text: oops}\n"),
    "dataset-missing": lambda t: ["estimate", *TINY, "--dataset", str(t / "none.csv"), "--padding", "dynamic"],
    "dataset-is-a-folder": lambda t: ["estimate", *TINY, "--dataset", str(t), "--padding", "dynamic"],
    "dataset-unsupported-suffix": lambda t: dataset(t, "d.xlsx", "text\nhello\n"),
    "dataset-empty-file": lambda t: dataset(t, "d.txt", ""),
    "text-column-missing": lambda t: dataset(t, "d.csv", "body\nhello there\n") + ["--text-column", "text"],
    # ----- saving and exporting
    "save-onto-a-folder": lambda t: ["estimate", *TINY, "--save", str((t / "dir").mkdir() or t / "dir")],
    "save-into-proc": lambda t: ["estimate", *TINY, "--save", "/proc/headroom-profile.json"],
    "save-onto-proc-file": lambda t: ["estimate", *TINY, "--save", "/proc/self/status"],
    "save-onto-read-only-file": read_only_target,
    "save-onto-immutable-file": immutable_target,
    "save-into-missing-folder": lambda t: ["estimate", *TINY, "--save", str(t / "no" / "such" / "p.json")],
    "export-into-missing-folders": lambda t: ["export", *TINY, "-o", str(t / "a" / "b" / "c.py")],
    "export-onto-a-folder": lambda t: ["export", *TINY, "-o", str(t)],
    "snapshot-into-missing-folder": lambda t: [*MEASURE, "--model", "tiny-gpt2", "--snapshot",
                                               str(t / "no" / "snap.pickle")],
    "compare-bad-profile": lambda t: ["compare", str(write(t / "a.json", "{}")), str(write(t / "b.json", "{"))],
    "compare-csv-onto-a-folder": lambda t: ["compare", str(write(t / "a.json", "{}")), "--csv", str(t)],
}


def _assert_one_line_error(code: int, out: str, err: str) -> None:
    assert code == 2, f"exit {code}; stderr: {err!r}"
    assert err.count("\n") == 1 and err.endswith("\n"), f"not exactly one stderr line: {err!r}"
    assert err.startswith("headroom: error: "), err
    assert "Traceback" not in err and "Traceback" not in out
    assert len(err) < 600, f"an error line of {len(err)} characters"


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, case):
    work = tmp_path / "work"
    work.mkdir()
    argv = CASES[case](work)
    before = snapshot(work)
    try:
        code, out, err = run_cli(argv, cwd=work)
    finally:
        for path in work.rglob("*"):  # undo chattr/chmod so pytest can clean up
            if path.name == "frozen.json":
                subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    _assert_one_line_error(code, out, err)
    assert snapshot(work) == before, "the working folder changed"


def test_there_are_at_least_fifty_distinct_cases():
    assert len(CASES) >= 50


def test_a_read_only_file_keeps_its_content_and_mode(tmp_path):
    argv = read_only_target(tmp_path)
    target = tmp_path / "keep.json"
    code, out, err = run_cli(argv, cwd=tmp_path)
    _assert_one_line_error(code, out, err)
    assert target.read_text() == '{"name": "mine"}\n'
    assert stat.S_IMODE(target.stat().st_mode) == 0o444
    assert "read-only" in err


@pytest.mark.parametrize("flag, value, words", [
    ("--memory-cap", "-5", "cannot be negative"),
    ("--memory-cap", DIGITS_400, "beyond any memory"),
    ("--batch", str(10**12), "batch must be at most"),
    ("--alloc", "expandable\n", "alloc must be"),
    ("--attn", "eager\n", "attn must be"),
])
def test_the_messages_say_what_is_wrong(flag, value, words):
    code, out, err = run_cli(["estimate", *TINY, flag, value])
    _assert_one_line_error(code, out, err)
    assert words in err
    assert "invalid parse_bytes value" not in err


def test_messages_name_the_folder_and_the_empty_csv(tmp_path):
    _code, _out, err = run_cli(["estimate", str(tmp_path)])
    assert "is a folder" in err
    _code, _out, err = run_cli(dataset(tmp_path, "h.csv", "text,label\n"))
    assert "no rows" in err


def test_a_good_save_keeps_the_mode_and_leaves_no_temp_files(tmp_path):
    target = write(tmp_path / "p.json", "{}")
    target.chmod(0o640)
    stale = write(tmp_path / ".p.json.abc123.headroom-tmp", "half a profile")
    os.utime(stale, (1, 1))  # a temp file of a save killed long ago
    code, _out, err = run_cli(["estimate", *TINY, "--method", "analytic", "--save", str(target)])
    assert code == 0, err
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert json.loads(target.read_text())["batch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]


def test_a_new_save_gets_the_usual_mode_not_0600(tmp_path):
    code, _out, err = run_cli(["estimate", *TINY, "--method", "analytic", "--save", str(tmp_path / "n.json")])
    assert code == 0, err
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "n.json").stat().st_mode) == 0o666 & ~umask


def test_an_interrupted_save_removes_its_temp_file(tmp_path, monkeypatch):
    from engine import atomic_file

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic_file.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_file.atomic_write_text(tmp_path / "x.json", "{}")
    assert list(tmp_path.iterdir()) == []


def test_library_chatter_stays_out_of_stderr_unless_verbose():
    """A successful estimate prints nothing on stderr (transformers' loss_type warning and the
    like); --verbose lets it through."""
    done = run_cli_process(["estimate", "--model", "tiny-llama", "--target", "cpu", "--batch", "1",
                            "--seq", "16", "--json"])
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr
    json.loads(done.stdout)


def test_a_50_mb_one_line_text_is_cut_and_read_in_pieces(tmp_path):
    import time

    from engine import data
    from engine.data.files import MAX_TEXT_CHARS

    path = tmp_path / "one-line.txt"
    with path.open("w") as fh:
        for _ in range(50):
            fh.write("tokens " * ((1 << 20) // 7 + 1) + " ")  # ~1 MiB per piece, no newline anywhere
    started = time.perf_counter()
    texts = data.load_texts(str(path))
    assert time.perf_counter() - started < 5.0
    assert len(texts) == 1 and len(texts[0]) == MAX_TEXT_CHARS
