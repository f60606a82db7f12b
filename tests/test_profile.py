import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine import profile as pm
from engine.errors import BadInput
from engine.profile import Profile
from engine.techniques.precision import PRECISIONS


def test_defaults_validate_and_roundtrip(tmp_path):
    p = Profile()
    assert pm.validate(p) is p
    path = tmp_path / "p.json"
    pm.save(p, path)
    assert pm.load(path) == p
    assert json.loads(path.read_text())["schema_version"] == pm.SCHEMA_VERSION


def test_every_field_has_a_one_line_help():
    import dataclasses

    # the record is built from the core fields and each technique's; each carries its comment
    for f in dataclasses.fields(Profile):
        text = f.metadata["help"]
        assert text.strip() and "\n" not in text, f.name
    assert [f.name for f in dataclasses.fields(Profile)] == [f.name for f in pm.FIELDS]


@pytest.mark.parametrize("data, message", [
    ({"bogus": 1}, "unknown profile field 'bogus'"),
    ({"batch": "8"}, "must be int"),
    ({"batch": 0}, "batch must be >= 1"),
    ({"checkpointing": 1}, "must be bool"),
    ({"precision": "fp8"}, "precision must be one of"),
    ({"attn": "local:0"}, "window"),
    ({"attn": "flash"}, "attn must be"),
    ({"prune": "heads:1.5"}, "prune must be"),
    ({"alloc": "pool:lots"}, "alloc must be"),
    ({"micro_batches": 4, "batch": 2}, "cannot exceed batch"),
    ({"schema_version": 99}, "newer"),
    ({"teacher_precision": "int8", "distill_from": "gpt2"}, "teacher_precision must be one of"),
    ({"teacher_precision": "bf16"}, "needs a distillation teacher"),
    ({"alloc_max_split": "lots"}, "alloc_max_split must be a size"),
    ({"alloc_max_split": "512MB"}, "whole number of MiB"),
    ({"alloc_max_split": "20MiB"}, "above 20 MiB"),
    ({"alloc_max_split": "512"}, "above 20 MiB"),  # a bare number is bytes, as everywhere
])
def test_bad_fields_are_one_line_errors(data, message):
    with pytest.raises(BadInput) as exc:
        pm.from_dict(data)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_load_missing_and_broken_files(tmp_path):
    with pytest.raises(BadInput, match="not found"):
        pm.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(BadInput, match="not valid JSON"):
        pm.load(bad)


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "p.json"
    pm.save(Profile(batch=2), path)
    before = path.read_text()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pm.os, "replace", boom)
    with pytest.raises(BadInput, match="disk full"):  # one line for the user, not an OSError
        pm.save(Profile(batch=4), path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]


def test_derived_views():
    p = Profile(attn="local:256", prune="heads:0.25", alloc="pool:2GiB")
    assert p.local_window == 256
    assert p.prune_kind == "heads" and p.prune_fraction == 0.25
    assert p.alloc_pool_bytes == 2 * 1024**3
    assert p.non_defaults() == {"attn": "local:256", "prune": "heads:0.25", "alloc": "pool:2GiB"}


@given(st.integers(1, 4096), st.integers(1, 4096), st.sampled_from(PRECISIONS), st.booleans())
def test_json_roundtrip_property(batch, seq, precision, ckpt):
    p = Profile(batch=batch, seq=seq, precision=precision, checkpointing=ckpt)
    assert pm.from_dict(json.loads(pm.dumps(p))) == p


def test_parse_bytes():
    assert pm.parse_bytes("24GiB") == 24 * 1024**3
    assert pm.parse_bytes("80GB") == 80 * 1000**3
    assert pm.parse_bytes("512") == 512
    with pytest.raises(BadInput):
        pm.parse_bytes("lots")


def test_teacher_precision_and_max_split_fields():
    p = Profile(distill_from="gpt2", teacher_precision="bf16", alloc_max_split="1GiB")
    assert pm.validate(p) is p
    assert p.alloc_max_split_bytes == 1 << 30 and p.alloc_max_split_mib == 1024
    assert Profile().alloc_max_split_bytes == 0 and Profile().teacher_precision == "auto"
    assert p.non_defaults() == {"distill_from": "gpt2", "teacher_precision": "bf16",
                                "alloc_max_split": "1GiB"}
    assert pm.from_dict(json.loads(pm.dumps(p))) == p
    # the teacher precision goes with the teacher: inference (no teacher) refuses it too
    with pytest.raises(BadInput, match="applies to training only"):
        p.replace(mode="infer")


def test_cli_flags_for_teacher_precision_and_max_split():
    from engine import cli

    args = cli.build_parser().parse_args(
        ["estimate", "--distill-from", "tiny-gpt2", "--teacher-precision", "fp16",
         "--alloc", "expandable", "--alloc-max-split", "256MiB"])
    p = cli.profile_from_args(args)
    assert (p.teacher_precision, p.alloc, p.alloc_max_split) == ("fp16", "expandable", "256MiB")
    args = cli.build_parser().parse_args(["estimate", "--alloc-max-split", "none"])
    assert cli.profile_from_args(args).alloc_max_split == ""
    assert cli.main(["estimate", "--teacher-precision", "bf16"]) == cli.EXIT_BAD_INPUT
