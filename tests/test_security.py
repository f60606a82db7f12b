"""A model folder's code runs only by the user's hand in this session; pickled weights never load.

Every case plants a marker: the folder's ``auto_map`` module (or a pickle's ``__reduce__``) writes
a file when it runs. Opening the folder through a profile that says ``trust_remote_code: true``
(CLI estimate, measure, export, inspect; the app's profile loading) must never create it. The
positive controls show the marker does appear once the user grants the folder, so the checks can
fail.
"""

from __future__ import annotations

import json
import re
import pickle
import shutil
from pathlib import Path

import pytest
from _cli import run_cli, run_cli_process

from engine import remote_code
from engine.errors import BadInput
from engine.measure import MeasureProcess
from engine.models import PRESET_DIR, build_model
from engine.profile import Profile

EVIL_CODE = '''
import pathlib
pathlib.Path({marker!r}).write_text("the folder's code ran")
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast


class EvilConfig(GPT2Config):
    model_type = "gpt2"


class EvilModel(GPT2LMHeadModel):
    config_class = EvilConfig


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
'''


@pytest.fixture(autouse=True)
def _no_grants():
    remote_code.revoke_all()
    yield
    remote_code.revoke_all()


def evil_folder(tmp_path: Path, model_type: str = "gpt2", tokenizer: bool = True) -> tuple[Path, Path]:
    """A tiny GPT-2 folder whose auto_map points at code that writes a marker; (folder, marker)."""
    folder = tmp_path / f"evil-{model_type}"
    folder.mkdir()
    marker = tmp_path / "MARKER"
    config = json.loads((PRESET_DIR / "tiny-gpt2" / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "evilcode.EvilConfig",
                                                   "AutoModelForCausalLM": "evilcode.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evilcode.py").write_text(EVIL_CODE.format(marker=str(marker)))
    if tokenizer:
        from engine.data import FALLBACK_PATH

        shutil.copy(FALLBACK_PATH, folder / "tokenizer.json")
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "EvilTokenizer",
             "auto_map": {"AutoTokenizer": ["evilcode.EvilTokenizer", "evilcode.EvilTokenizer"]}}))
    return folder, marker


def profile_file(tmp_path: Path, folder: Path, **fields) -> Path:
    data = {"name": "hostile", "model": str(folder), "trust_remote_code": True, "target": "cpu",
            "batch": 2, "seq": 16, "steps": 2, "padding": "dynamic"} | fields
    path = tmp_path / "hostile.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("command", ["estimate", "inspect", "export", "measure"])
def test_a_profile_file_never_runs_a_known_architectures_folder_code(tmp_path, command):
    folder, marker = evil_folder(tmp_path)
    path = profile_file(tmp_path, folder)
    extra = {"export": ["-o", tmp_path / "train.py"], "inspect": ["--dataset", "builtin"]}.get(command, [])
    code, _out, err = run_cli([command, path, *extra])
    assert code == 0, err
    assert not marker.exists()
    if command == "export":  # the script it writes does not enable the code either
        script = (tmp_path / "train.py").read_text()
        # (the embedded tokenizer loader names it, as trust_remote_code=False)
        assert not re.search(r"""trust_remote_code["']?\s*[=:]\s*True""", script)


def test_a_profile_file_never_runs_an_unknown_architectures_folder_code(tmp_path):
    folder, marker = evil_folder(tmp_path, model_type="evilarch")
    path = profile_file(tmp_path, folder)
    for command in ("estimate", "measure", "plan"):
        extra = ["--budget", "1GiB"] if command == "plan" else []
        code, _out, err = run_cli([command, path, *extra])
        assert code == 2 and err.count("\n") == 1, err
        assert "--trust-remote-code" in err and "only you can allow it" in err
    assert not marker.exists()


def test_the_engine_needs_the_grant_not_just_the_field(tmp_path):
    folder, marker = evil_folder(tmp_path, model_type="evilarch", tokenizer=False)
    profile = Profile(model=str(folder), trust_remote_code=True, target="cpu")
    with pytest.raises(BadInput, match="needs the folder's own code"):
        build_model(profile, "meta")
    assert not marker.exists()
    assert remote_code.model_folders(profile) == [folder.resolve()]
    assert not remote_code.profile_granted(profile)


def test_the_flag_grants_it_and_then_the_code_runs(tmp_path):
    """Positive control: with the user's --trust-remote-code the same folder's code does run."""
    folder, marker = evil_folder(tmp_path, model_type="evilarch", tokenizer=False)
    path = profile_file(tmp_path, folder)
    done = run_cli_process(["estimate", path, "--trust-remote-code", "--method", "analytic"],
                           env={"HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert marker.exists(), done.stderr


def test_a_measure_child_gets_the_grant_only_from_this_process():
    profile = Profile(model=str(PRESET_DIR / "tiny-gpt2"), trust_remote_code=True, target="cpu")
    proc = MeasureProcess(profile, start=False)
    assert "--trust-remote-code" not in proc.command("p.json")
    remote_code.grant_profile(profile)
    assert proc.command("p.json")[-1] == "--trust-remote-code"
    untrusting = MeasureProcess(profile.replace(trust_remote_code=False), start=False)
    assert "--trust-remote-code" not in untrusting.command("p.json")


def test_cli_grants_only_for_its_own_invocation(tmp_path):
    folder, _marker = evil_folder(tmp_path)
    code, _out, err = run_cli(["estimate", "--model", folder, "--trust-remote-code", "--method", "analytic"])
    assert code == 0, err
    assert not remote_code.is_granted(folder)  # in-process callers get their state back


# ----- pickles -----------------------------------------------------------------------------------
class _PickleBomb:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('the pickle ran')",))


def weights_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "weights"
    folder.mkdir()
    shutil.copy(PRESET_DIR / "tiny-gpt2" / "config.json", folder / "config.json")
    return folder


def test_an_index_pointing_at_a_pickle_is_one_line_and_never_unpickled(tmp_path):
    import torch
    from safetensors.torch import save_file

    folder = weights_folder(tmp_path)
    marker = tmp_path / "MARKER"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_PickleBomb(marker)))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"transformer.wte.weight": "pytorch_model.bin"}}))
    save_file({"x": torch.zeros(2)}, str(folder / "stray.safetensors"))
    code, _out, err = run_cli(["measure", "--model", folder, "--target", "cpu", "--batch", "1",
                               "--seq", "8", "--steps", "1"])
    assert code == 2 and err.count("\n") == 1, err
    assert "pytorch_model.bin" in err and "never pickles" in err
    assert not marker.exists()


@pytest.mark.parametrize("case", ["outside", "missing", "fake", "stray"])
def test_weights_that_are_not_safetensors_are_one_line(tmp_path, case):
    folder = weights_folder(tmp_path)
    if case == "outside":
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"a": "../elsewhere.safetensors"}}))
    elif case == "missing":
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    elif case == "fake":
        (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    else:
        (folder / "weights-copy.safetensors").write_bytes(b"junk")
    code, _out, err = run_cli(["measure", "--model", folder, "--target", "cpu", "--batch", "1",
                               "--seq", "8", "--steps", "1"])
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert str(folder) in err


def test_real_safetensors_weights_still_load(tmp_path):
    folder = weights_folder(tmp_path)
    profile = Profile(model=str(folder), target="cpu")
    model = build_model(profile, "cpu")
    model.save_pretrained(str(folder), safe_serialization=True)
    assert (folder / "model.safetensors").is_file()
    again = build_model(profile, "cpu")
    first = next(iter(model.state_dict().values()))
    assert (next(iter(again.state_dict().values())) == first).all()


# ----- the app -----------------------------------------------------------------------------------
def test_the_app_loading_a_hostile_profile_runs_nothing_until_confirmed(qtbot, tmp_path, monkeypatch):
    pytest.importorskip("PySide6")
    from app.main_window import MainWindow
    from app.widgets import model_panel

    folder, marker = evil_folder(tmp_path)
    path = profile_file(tmp_path, folder, padding="fixed")
    asked: list[dict] = []
    answer = [False]

    def fake_confirm(parent, folders):
        asked.append(folders)
        return answer[0]

    monkeypatch.setattr(model_panel, "confirm_remote_code", fake_confirm)
    w = MainWindow(Profile(name="tiny", model="tiny-gpt2", target="cpu", batch=2, seq=32, steps=2))
    qtbot.addWidget(w)
    try:
        w.state.load_file(path)
        panel = w.model_panel
        qtbot.waitUntil(lambda: not (panel._runner.is_running or w.estimator._runner.is_running
                                     or w.estimator._timer.isActive()), timeout=60000)
        qtbot.waitUntil(lambda: "layers" in panel.facts.text(), timeout=30000)
        assert w.state.profile.trust_remote_code  # the profile remembers the wish...
        assert not panel.trust_code.isChecked()  # ...but it is not granted
        assert not panel.trust_note.isHidden() and "nothing runs" in panel.trust_note.text()
        assert not marker.exists()
        panel.trust_code.setChecked(True)  # declined: nothing granted, box back off
        assert asked and list(asked[0]) == [folder.resolve()] and asked[0][folder.resolve()] == ["evilcode.py"]
        assert not panel.trust_code.isChecked() and not remote_code.is_granted(folder)
        answer[0] = True
        # Granted, the code would run in any worker that reads the model: keep them all idle.
        from app.worker import TaskRunner

        monkeypatch.setattr(TaskRunner, "start", lambda *a, **k: None)
        panel.trust_code.setChecked(True)
        assert remote_code.is_granted(folder) and panel.trust_code.isChecked()
        assert panel.trust_note.isHidden()
        panel.trust_code.setChecked(False)  # unticking takes the grant back
        assert not remote_code.is_granted(folder) and not w.state.profile.trust_remote_code
    finally:
        w.shutdown()
    assert not marker.exists()


def test_the_confirmation_names_the_folder_and_its_python_files(tmp_path):
    pytest.importorskip("PySide6")
    from app.widgets.model_panel import remote_code_question

    folder, _ = evil_folder(tmp_path)
    text = remote_code_question({folder: remote_code.python_files(folder)})
    assert str(folder) in text and "evilcode.py" in text and "trust" in text
