"""The command line contract of DESIGN.md: exit codes, one-line errors, JSON keys."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import cli
from engine.models import PRESET_DIR

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True,
                          env=env, cwd=cwd or ROOT, timeout=120)


def test_inspect_gpt2_builtin_json():
    proc = run_cli("inspect", "--model", "gpt2", "--dataset", "builtin", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["model"]["params"] == 124_439_808
    assert out["dataset"]["count"] >= 2000
    for key in ("mean", "median", "p90", "p99", "max"):
        assert out["dataset"][key] > 0
    assert out["headroom_version"]


def test_inspect_config_only_folder(tmp_path):
    cfg = (PRESET_DIR / "gpt2" / "config.json").read_text()
    (tmp_path / "config.json").write_text(cfg)
    code = cli.main(["inspect", "--model", str(tmp_path), "--json"])
    assert code == 0


def _bad_inputs(tmp_path):
    (tmp_path / "noconfig").mkdir()
    badjson = tmp_path / "badjson"
    badjson.mkdir()
    (badjson / "config.json").write_text("{nope")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("a,b\n1,2\n3,4\n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    badprofile = tmp_path / "bad.json"
    badprofile.write_text(json.dumps({"batch": 8, "flux": 3}))
    return [
        ["inspect", "--model", str(tmp_path / "missing")],
        ["inspect", "--model", str(tmp_path / "noconfig")],
        ["inspect", "--model", str(badjson)],
        ["inspect", "--model", "no-such-preset"],
        ["inspect", "--model", "tiny-gpt2", "--dataset", str(tmp_path / "nothere.txt")],
        ["inspect", "--model", "tiny-gpt2", "--dataset", str(empty)],
        ["inspect", "--model", "tiny-gpt2", "--dataset", str(nocol), "--text-column", "text"],
        ["inspect", "--model", "tiny-gpt2", "--dataset", str(latin)],
        ["inspect", str(badprofile)],
        ["inspect", "--model", "gpt2", "--seq", "4096"],
        ["inspect", "--batch", "0"],
        ["inspect", "--precision", "fp8"],
        ["frobnicate"],
    ]


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    saved = tmp_path / "saved.json"
    for args in _bad_inputs(tmp_path):
        code = cli.main([*args, "--save", str(saved)] if args[0] == "inspect" else args)
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert err.startswith("headroom: error: ") and err.count("\n") == 1, (args, err)
        assert "Traceback" not in err
        assert not saved.exists()


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    proc = run_cli("estimate", "--model", str(tmp_path / "nope"), "--json")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_flags_override_profile_and_save(tmp_path):
    base = tmp_path / "base.json"
    out = tmp_path / "out.json"
    from engine import profile as pm

    pm.save(pm.Profile(model="tiny-gpt2", batch=2, seq=64), base)
    args = cli.build_parser().parse_args(["estimate", str(base), "--batch", "4", "--checkpointing",
                                          "--attn", "local:16", "--alloc", "pool:1GiB"])
    p = cli.profile_from_args(args)
    assert (p.model, p.batch, p.seq, p.checkpointing, p.attn) == ("tiny-gpt2", 4, 64, True, "local:16")
    assert cli.main(["inspect", str(base), "--batch", "3", "--save", str(out)]) == 0
    assert pm.load(out).batch == 3


def test_every_design_flag_is_parsed():
    design_flags = ["--model", "--mode", "--batch", "--seq", "--precision", "--checkpointing", "--attn",
                    "--optimizer", "--target", "--dataset", "--text-column", "--padding", "--pad-multiple",
                    "--max-tokens", "--micro-batches", "--chunk-input", "--prune", "--mlp", "--ffn-chunks",
                    "--distill-from", "--alloc", "--checkpoint-every", "--steps", "--save"]
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["estimate"].format_help()
    for flag in design_flags:
        assert flag in help_text, flag


def test_engine_imports_no_qt():
    code = ("import sys, pkgutil, importlib, engine\n"
            "for m in pkgutil.walk_packages(engine.__path__, 'engine.'):\n"
            "    if not m.name.endswith('__main__'):\n"
            "        importlib.import_module(m.name)\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('PySide6', 'pyqtgraph', 'app', 'shiboken6')]\n"
            "print(bad); sys.exit(1 if bad else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("argv", [["--version"]])
def test_version(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
