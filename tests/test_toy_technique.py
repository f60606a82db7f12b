"""A technique is one module: a toy one (tests/data/toy_technique/toy_ballast.py), put on
``engine.techniques``' package path in a fresh interpreter, appears in the CLI flags, the Profile,
validation, the GUI panel, both estimates, measure (in-process and in the measure child) and the
exported script, with no other file edited. Its ballast buffer adds exactly 64 KiB of weights, which every estimate and the measured
run must see."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TOY_DIR = Path(__file__).resolve().parent / "data" / "toy_technique"
KIB = 64

_CHILD = textwrap.dedent('''
    import contextlib, io, json, sys
    import engine.techniques as pkg
    pkg.__path__.append(sys.argv[1])  # the toy module, discovered like any technique module
    from engine import cli
    from engine.errors import BadInput
    from engine.estimate import estimate
    from engine.export import export_script
    from engine.measure import run_measure
    from engine.prepare import prepare
    from engine.profile import Profile, dumps, from_dict
    kib = int(sys.argv[2])
    out = {"flag": "--toy-ballast-kib" in cli.PROFILE_FLAGS}
    base = Profile(model="tiny-gpt2", batch=1, seq=16, target="cpu", steps=2, optimizer="sgd")
    toy = base.replace(toy_ballast_kib=kib)
    out["json"] = from_dict(json.loads(dumps(toy))) == toy
    errors = {}
    for name, fn in (("negative", lambda: base.replace(toy_ballast_kib=-1)),
                     ("infer", lambda: prepare(toy.replace(mode="infer")))):
        try:
            fn()
        except BadInput as exc:
            errors[name] = str(exc)
    out["errors"] = errors
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        out["cli_rc"] = cli.main(["estimate", "--model", "tiny-gpt2", "--mode", "infer",
                                  "--toy-ballast-kib", "4", "--json"])
    out["cli_err"] = stderr.getvalue().strip()
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        cli.main(["estimate", "--model", "tiny-gpt2", "--target", "cpu", "--batch", "1", "--seq", "16",
                  "--toy-ballast-kib", str(kib), "--method", "analytic", "--json"])
    out["cli_weights"] = json.loads(printed.getvalue())["breakdown"]["weights"]
    for method in ("analytic", "traced"):
        out[method] = [estimate(p, method=method).breakdown["weights"] for p in (base, toy)]
    out["measure"] = [run_measure(p).breakdown["weights"] for p in (base, toy)]
    # the measure child (sys.executable -P -m engine measure) finds the toy too: the parent passes
    # the folders on the package path in HEADROOM_TECHNIQUE_PATH
    from engine.measure.process import measure_in_child
    out["child"] = [measure_in_child(p).breakdown["weights"] for p in (base, toy)]
    script = export_script(toy)
    out["script"] = ["def add_ballast(model, kib):" in script, f"add_ballast(model, {kib})" in script,
                     "engine" not in script.split("def add_ballast", 1)[1].split("\\n\\n\\n", 1)[0]]
    from PySide6.QtWidgets import QApplication
    app = QApplication.instance() or QApplication([])
    from app.state import AppState
    from app.widgets.technique_panel import TechniquePanel
    state = AppState()
    panel = TechniquePanel(state)
    panel.toy_ballast_kib.setValue(8)
    out["panel"] = ["toy_ballast" in panel.groups, state.profile.toy_ballast_kib,
                    "exactly its size" in panel.notes()["toy_ballast"].full_text]
    print("RESULT " + json.dumps(out))
''')


@pytest.mark.slow
def test_a_toy_technique_module_reaches_every_consumer(tmp_path):
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "HEADROOM_SETTINGS_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", _CHILD, str(TOY_DIR), str(KIB)], capture_output=True,
                          text=True, env=env, timeout=300, cwd=Path(__file__).resolve().parent.parent)
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["flag"] and out["json"]
    assert "toy_ballast_kib must be >= 0" in out["errors"]["negative"]
    assert out["errors"]["infer"] == "toy_ballast_kib (toy ballast) applies to training only"
    assert out["cli_rc"] == 2 and out["cli_err"].endswith(out["errors"]["infer"])
    extra = KIB * 1024
    for part in ("analytic", "traced", "measure", "child"):
        plain, with_toy = out[part]
        assert with_toy - plain == extra, part
    assert out["cli_weights"] == out["analytic"][1]
    assert out["script"] == [True, True, True]
    assert out["panel"] == [True, 8, True]


def test_the_toy_is_not_a_registered_technique():
    """Only the test puts the toy on the path: the shipped registry never holds it."""
    from engine import techniques

    assert "toy_ballast" not in {t.name for t in techniques.registry()}
