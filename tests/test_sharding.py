"""Data parallelism (engine.techniques.sharding): profile rules, the per-rank estimate, and real
torchrun runs on CPU with gloo (``distributed`` marker: a few short multi-process runs, seq 8,
batch 2, two steps) compared with both estimators and with the DTensor local shards."""

from __future__ import annotations

import pytest

from engine.errors import BadInput
from engine.estimate import estimate
from engine.estimate.sharding import padded_shard_numel, rank_model
from engine.profile import Profile, validate

TINY = dict(seq=8, batch=2, target="cpu", steps=2, padding="fixed")


def _p(**kw) -> Profile:
    return validate(Profile(**{**TINY, **kw}))


def test_profile_rules_are_one_line_bad_input():
    with pytest.raises(BadInput, match="--shard ddp or --shard fsdp2"):
        _p(model="tiny-llama", gpus=2)
    with pytest.raises(BadInput, match="FSDP2 option"):
        _p(model="tiny-llama", gpus=2, shard="ddp", offload="params")
    with pytest.raises(BadInput, match="multiple of nodes"):
        _p(model="tiny-llama", gpus=6, shard="fsdp2", nodes=4)
    with pytest.raises(BadInput, match="training"):
        _p(model="tiny-llama", gpus=2, shard="ddp", mode="infer")
    assert _p(model="tiny-llama", gpus=4, shard="fsdp2").dp_batch == 8


def test_fsdp2_pads_every_rank_to_the_ceiling():
    assert padded_shard_numel(13, 13 * 7, 2) == 7 * 7  # rank 1 holds 6 rows in 7 rows of storage
    assert padded_shard_numel(5, 5, 8) == 1


def test_sharded_state_shrinks_with_ranks_and_hsdp_shards_within_a_node():
    one = rank_model(_p(model="tiny-llama", gpus=1, shard="fsdp2"))
    four = rank_model(_p(model="tiny-llama", gpus=4, shard="fsdp2"))
    hsdp = rank_model(_p(model="tiny-llama", gpus=8, shard="fsdp2", nodes=2))
    assert four.weights < one.weights // 3
    assert hsdp.weights == four.weights and hsdp.n == 4
    ddp = rank_model(_p(model="tiny-llama", gpus=4, shard="ddp"))
    assert ddp.weights == one.weights and ddp.buckets == ddp.grads


def test_offload_moves_state_off_a_cuda_device_only():
    cuda = _p(model="tiny-llama", gpus=2, shard="fsdp2", offload="params", target="cuda")
    on_cpu = _p(model="tiny-llama", gpus=2, shard="fsdp2", offload="params")
    plain = _p(model="tiny-llama", gpus=2, shard="fsdp2", target="cuda")
    e_off, e_plain = (estimate(x, method="analytic") for x in (cuda, plain))
    assert e_off.peak_allocated_bytes < e_plain.peak_allocated_bytes
    assert e_off.extra["sharding"]["host_bytes"] > 0
    assert (estimate(on_cpu, method="analytic").peak_allocated_bytes
            == estimate(_p(model="tiny-llama", gpus=2, shard="fsdp2"),
                        method="analytic").peak_allocated_bytes)


# ----- real runs under torchrun (gloo) -------------------------------------------------------------
CASES = [
    ("tiny-llama", 2, dict(shard="fsdp2")),
    ("tiny-llama", 2, dict(shard="fsdp2", reshard_after_forward="off", offload="optimizer")),
    ("tiny-llama", 2, dict(shard="fsdp2", offload="params")),  # CPUOffloadPolicy(pin_memory=False)
    ("tiny-llama", 2, dict(shard="fsdp2", mp_param_dtype="bf16", mp_reduce_dtype="fp32")),
    ("tiny-llama", 2, dict(shard="ddp")),
    ("tiny-gpt2", 2, dict(shard="ddp")),
    ("tiny-gpt2", 2, dict(shard="fsdp2")),  # tied embeddings: the gradient sum in the root's backward
    ("tiny-llama", 4, dict(shard="fsdp2")),
]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("model,gpus,kw", CASES, ids=lambda x: str(x))
def test_torchrun_rank_peak_matches_both_estimates(model, gpus, kw):
    from engine.measure.process import measure_in_child

    profile = _p(model=model, gpus=gpus, **kw)
    measured = measure_in_child(profile)
    ranks = measured.extra["ranks"]
    assert len(ranks) == gpus and measured.extra["worst_rank"] in range(gpus)
    assert measured.peak_allocated_bytes == max(r["peak_allocated_bytes"] for r in ranks)
    for method in ("analytic", "traced"):
        est = estimate(profile, method=method)
        assert est.peak_allocated_bytes == pytest.approx(measured.peak_allocated_bytes, rel=0.03), method
    # the per-rank state the estimate counts is what every rank held: DTensor local shards'
    # storages (FSDP2 pads every rank to the same size), the full tensors under DDP
    rm = rank_model(profile)
    for r in ranks:
        assert r["param_shard_bytes"] == rm.weights
        if kw.get("offload") != "optimizer":
            assert r["optimizer_shard_bytes"] == rm.states


@pytest.mark.slow
@pytest.mark.distributed
def test_exported_script_runs_under_torchrun_with_two_cpu_ranks(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from engine.export import export_script

    profile = _p(model="tiny-llama", gpus=2, shard="fsdp2")
    script = tmp_path / "train.py"
    script.write_text(export_script(profile))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the script stands alone
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node=2", str(script), "--device", "cpu", "--steps", "2"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in rows) == [0, 1] and {r["world_size"] for r in rows} == {2}
    est = estimate(profile, method="analytic").peak_allocated_bytes
    for r in rows:
        assert r["peak_allocated_bytes"] == pytest.approx(est, rel=0.03)


def test_plan_finds_the_fewest_gpus_and_ranks_the_fitting_options():
    from engine.plan_gpus import plan_gpus

    base = validate(Profile(model="tiny-llama", seq=64, batch=2, padding="fixed", gpu="H100-SXM"))
    two = estimate(base.replace(gpus=2, shard="fsdp2"), method="analytic").device_used_bytes
    one = estimate(base, method="analytic").device_used_bytes
    assert two < one
    result = plan_gpus(base, budget_bytes=two, max_gpus=8)
    assert result.gpus == 2 and "fsdp2" in result.fitting and "ddp" not in result.fitting
    assert result.fastest in result.fitting
    assert all(row[4] > 0 and row[3] > 0 for row in result.speed)
    with pytest.raises(BadInput):
        plan_gpus(base, budget_bytes=two, max_gpus=0)
