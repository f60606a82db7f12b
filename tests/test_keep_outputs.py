"""keep_outputs: a loop that keeps ``outputs = model(**batch)`` through backward and into the next
forward. Measured (CPU live-bytes tracker) and both estimates agree, and the difference to the
default loop is the output object's bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from engine.errors import BadInput
from engine.estimate import estimate
from engine.estimate.analytic import arch_of
from engine.measure import run_measure
from engine.profile import Profile
from engine.techniques.keep_outputs import outputs_bytes


def _peaks(p: Profile) -> tuple[int, int, int]:
    return (estimate(p, method="analytic").peak_allocated_bytes,
            estimate(p, method="traced").peak_allocated_bytes, run_measure(p).peak_allocated_bytes)


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_measured_and_both_estimates_agree_and_the_difference_is_the_outputs(model):
    base = Profile(model=model, target="cpu", batch=4, seq=64, steps=3)
    keep = base.replace(keep_outputs=True)
    held = outputs_bytes(arch_of(base), 4, 64, "fp32", cuda=False)
    assert held == 4 * 64 * arch_of(base).vocab * 4 + 4  # fp32 logits and the scalar loss
    a0, t0, m0 = _peaks(base)
    a1, t1, m1 = _peaks(keep)
    for estimated in (a1, t1):
        assert estimated == pytest.approx(m1, rel=0.02)
    assert m1 - m0 == held  # the measured loop: exactly the output object's bytes more
    assert a1 - a0 == held
    assert t1 - t0 == pytest.approx(held, abs=16)  # the traced step: the logits (its loss scalar aside)


def test_under_autocast_the_kept_logits_are_half_precision():
    base = Profile(model="tiny-llama", target="cpu", batch=4, seq=64, steps=3, precision="bf16-amp")
    held = outputs_bytes(arch_of(base), 4, 64, "bf16-amp", cuda=False)
    a0, t0, m0 = _peaks(base)
    a1, t1, m1 = _peaks(base.replace(keep_outputs=True))
    assert m1 - m0 == held == 4 * 64 * arch_of(base).vocab * 2 + 4
    assert a1 - a0 == held and t1 - t0 == pytest.approx(held, abs=16)


def test_cuda_estimates_round_to_the_allocator_and_explain_the_option():
    p = Profile(model="gpt2", target="cuda", batch=8, seq=512, precision="bf16-amp")
    a0 = estimate(p, method="analytic").peak_allocated_bytes
    a1 = estimate(p.replace(keep_outputs=True), method="analytic").peak_allocated_bytes
    assert a1 - a0 == 8 * 512 * 50257 * 2 + 512  # the logits and the loss, in 512-byte blocks
    from engine.techniques.keep_outputs import EXPLANATION

    assert "393 MiB" in EXPLANATION and (8 * 512 * 50257 * 2) // 2**20 == 392  # 392.6 MiB


def test_training_only_not_with_distillation_and_the_flag(tmp_path):
    with pytest.raises(BadInput, match="training only"):
        Profile(model="tiny-gpt2", mode="infer", keep_outputs=True).replace()
    with pytest.raises(BadInput, match="distillation"):
        Profile(model="tiny-gpt2", keep_outputs=True, distill_from="tiny-gpt2").replace()
    from engine.cli import build_parser, profile_from_args

    args = build_parser().parse_args(["estimate", "--model", "tiny-gpt2", "--keep-outputs"])
    assert profile_from_args(args).keep_outputs is True


def test_exported_script_keeps_the_outputs_and_matches_measure(tmp_path):
    from engine.export import export_script

    p = Profile(model="tiny-gpt2", target="cpu", batch=2, seq=32, steps=2, keep_outputs=True)
    text = export_script(p)
    assert 'KEPT["outputs"] = outputs' in text and "loss = outputs.loss" in text
    path = tmp_path / "train.py"
    path.write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no Headroom on the path
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(path), "--steps", "2", "--device", "cpu"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    measured = run_measure(p)
    assert result["losses"] == pytest.approx(list(measured.losses), rel=1e-5)
    assert result["peak_allocated_bytes"] == pytest.approx(measured.peak_allocated_bytes, rel=0.02)
    # the script prints the settings it ran with: an import into Headroom checks them
    from engine.measurement_file import differences, read_measurement

    log = tmp_path / "run.log"
    log.write_text(proc.stdout)
    imported, settings = read_measurement(log)
    assert settings["keep_outputs"] is True and differences(p, settings, imported) == []
    assert differences(p.replace(keep_outputs=False), settings, imported) == \
        ["loop keeps the model outputs True in the file, False here"]
    default = run_measure(p.replace(keep_outputs=False)).peak_allocated_bytes
    assert result["peak_allocated_bytes"] > default  # the script's loop holds the outputs too
