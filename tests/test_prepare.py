"""One gate: every entry point refuses the same incompatible profiles with the same one-line
message (engine.prepare). Before it, `estimate --seq 8 --ffn-chunks 16` returned numbers while
measure and export refused the profile."""

from __future__ import annotations

import json

import pytest

from engine import cli
from engine.errors import BadInput
from engine.prepare import prepare
from engine.profile import Profile, save

#: (profile fields, the one-line refusal): a technique rule that needs no model, one that needs the
#: config, one of the core rules (positions), and a teacher with another vocabulary.
REFUSED = [
    ({"seq": 8, "ffn_chunks": 16}, "ffn_chunks (16) cannot exceed the sequence length (8): each "
                                   "chunk needs at least one token"),
    ({"seq": 4096}, "sequence length 4096 exceeds tiny-gpt2's limit of"),
    ({"distill_from": "gpt2"}, "distillation needs teacher and student to share a vocabulary"),
]


def _message(fn) -> str:
    with pytest.raises(BadInput) as caught:
        fn()
    return str(caught.value)


@pytest.mark.parametrize("fields, expected", REFUSED)
def test_every_engine_entry_point_refuses_with_the_same_line(fields, expected):
    from engine.compare import compare_profiles
    from engine.estimate import estimate
    from engine.export import export_script
    from engine.measure import run_measure
    from engine.models import model_facts
    from engine.plan import plan

    p = Profile(model="tiny-gpt2", target="cpu", batch=2, **fields)
    gate = _message(lambda: prepare(p))
    assert gate.startswith(expected) and "\n" not in gate
    for name, call in {
        "estimate analytic": lambda: estimate(p, method="analytic"),
        "estimate traced": lambda: estimate(p, method="traced"),
        "measure": lambda: run_measure(p),
        "plan": lambda: plan(p, budget_bytes=2**30),
        "export": lambda: export_script(p),
        "compare": lambda: compare_profiles([p]),
        "model facts (the app's model panel)": lambda: model_facts(p),
    }.items():
        assert _message(call) == gate, name


@pytest.mark.parametrize("fields, expected", REFUSED[:1])
def test_every_cli_command_refuses_with_the_same_line(tmp_path, capsys, fields, expected):
    path = tmp_path / "p.json"
    save(Profile(model="tiny-gpt2", target="cpu", batch=2, **fields), path)
    lines = []
    for argv in (["estimate", str(path), "--json"], ["measure", str(path), "--json"],
                 ["plan", str(path), "--budget", "1GiB", "--json"],
                 ["export", str(path), "-o", str(tmp_path / "train.py")],
                 ["export", str(path), "--format", "md", "-o", str(tmp_path / "p.md")],
                 ["inspect", str(path)], ["compare", str(path)]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, argv
        lines.append(err[0])
    assert set(lines) == {f"headroom: error: {prepare_message(fields)}"}
    assert not (tmp_path / "train.py").exists()


def prepare_message(fields) -> str:
    return _message(lambda: prepare(Profile(model="tiny-gpt2", target="cpu", batch=2, **fields)))


def test_prepared_holds_the_resolved_settings_and_notes():
    p = Profile(model="tiny-llama", target="cpu", seq=64, attn="local:128", prune="unstructured:0.5",
                mode="infer", chunk_input=32)
    prepared = prepare(p)
    assert prepared.task == "causal-lm" and prepared.family == "decoder"
    assert prepared.per_forward == 32 and prepared.max_positions > 0
    assert prepared.active == ("pruning", "chunked_input", "local_attention")
    assert any("no memory saved" in n for n in prepared.notes)
    assert any("covers the whole sequence (32 tokens)" in n for n in prepared.notes)
    assert prepare(p) is prepared  # cached per profile
    json.dumps(prepared.notes)
