"""The GPU catalog (engine/gpus.py), --gpu, and the speed estimate (engine/estimate/speed.py)."""

import json
import warnings

import pytest

from engine import gpus
from engine.errors import BadInput
from engine.estimate import estimate
from engine.profile import Profile
from tests._cli import run_cli

TINY = dict(model="tiny-gpt2", batch=2, seq=8)


def test_every_entry_has_every_field_with_a_source():
    assert len(gpus.CATALOG) >= 19
    for want in ("t4", "v100-16gb", "v100-32gb", "a10g", "l4", "l40s", "rtx3090", "rtx4090",
                 "rtx5090", "a100-40gb-sxm", "a100-40gb-pcie", "a100-80gb-sxm", "a100-80gb-pcie",
                 "h100-sxm", "h100-pcie", "h100-nvl", "h200", "b200", "custom"):
        assert want in gpus.CATALOG
    for g in gpus.CATALOG.values():
        for name in gpus.CITED_FIELDS:
            src = g.source(name)
            assert src, (g.key, name)
            assert "http" in src or "measured here" in src or "calibrated here" in src \
                or g.key == "custom", (g.key, name, src)
        assert g.fp32_tflops > 0 and g.half_tflops >= g.fp32_tflops and g.bandwidth_gbps > 0
        assert g.pcie_gbps > 0 and g.context.base_mib > 0
        assert g.bf16 == (g.sm >= 80) and g.flash_attention == (g.sm >= 80)
        if g.key != "custom":
            assert g.memory_mib > 10_000
    assert gpus.get("h200").memory_mib == 143_771  # measured
    assert gpus.get("H100").key == "h100-sxm" and gpus.get("a100").key == "a100-80gb-sxm"


def test_detection_maps_device_names():
    assert gpus.detect_key("NVIDIA H200") == "h200"
    assert gpus.detect_key("NVIDIA H100 80GB HBM3") == "h100-sxm"
    assert gpus.detect_key("NVIDIA GeForce RTX 4090") == "rtx4090"
    assert gpus.detect_key("NVIDIA A100-SXM4-40GB", 40 * 2**30) == "a100-40gb-sxm"
    assert gpus.detect_key("Tesla T4") == "t4"
    assert gpus.detect_key("NVIDIA L40S") == "l40s"
    assert gpus.detect_key("Some New GPU") is None


def test_bf16_on_t4_is_one_line_offering_fp16():
    code, out, err = run_cli(["estimate", "--model", "tiny-gpt2", "--gpu", "t4",
                              "--precision", "bf16-amp", "--json"])
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "bf16" in err and "--precision fp16-amp" in err
    code, _, err = run_cli(["estimate", "--model", "tiny-gpt2", "--gpu", "v100-32gb",
                            "--precision", "bf16", "--method", "analytic"])
    assert code == 2 and "--precision fp16" in err
    # the same profile on a GPU with bf16, and on the CPU target, is fine
    assert run_cli(["estimate", "--model", "tiny-gpt2", "--gpu", "l4", "--precision", "bf16-amp",
                    "--seq", "8", "--method", "analytic"])[0] == 0


def test_unknown_gpu_lists_the_known_ones():
    code, out, err = run_cli(["estimate", "--model", "tiny-gpt2", "--gpu", "gtx-9999"])
    assert code == 2 and err.count("\n") == 1
    assert "gtx-9999" in err and all(k in err for k in ("t4", "h200", "b200", "custom"))
    with pytest.raises(BadInput, match="known: t4"):
        Profile(gpu="nope").replace()


def test_headroom_device_still_works_with_a_deprecation_note(monkeypatch):
    monkeypatch.setenv("HEADROOM_DEVICE", "h200")
    monkeypatch.setattr(gpus, "_warned_env", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = estimate(Profile(**TINY), "analytic")
    assert r.gpu == "h200"
    assert any("HEADROOM_DEVICE is deprecated" in n for n in r.notes)
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    # an explicit --gpu wins over the variable, without the note
    r2 = estimate(Profile(**TINY, gpu="l4"), "analytic")
    assert r2.gpu == "l4" and not any("HEADROOM_DEVICE" in n for n in r2.notes)
    monkeypatch.delenv("HEADROOM_DEVICE")
    assert estimate(Profile(**TINY), "analytic").gpu == "h100-sxm"


def test_estimate_json_has_speed_and_gpu():
    code, out, _ = run_cli(["estimate", "--model", "tiny-gpt2", "--seq", "8", "--gpu", "h200",
                            "--json", "--method", "analytic"])
    d = json.loads(out)
    assert code == 0 and d["gpu"] == "h200" and d["tokens_per_s"] > 0 and d["step_s"] > 0
    assert d["extra"]["speed"]["median_error"] >= 0


def test_speed_is_deterministic_and_monotonic():
    base = Profile(model="gpt2", batch=8, seq=256, precision="bf16-amp", gpu="h100-sxm")
    a, b = estimate(base, "analytic"), estimate(base, "analytic")
    assert a.step_s == b.step_s and a.tokens_per_s == b.tokens_per_s
    longer = estimate(base.replace(seq=512), "analytic")
    bigger = estimate(base.replace(batch=32), "analytic")
    assert longer.step_s > a.step_s and bigger.step_s > a.step_s
    ckpt = estimate(base.replace(checkpointing=True), "analytic")
    assert ckpt.step_s > a.step_s and ckpt.tokens_per_s < a.tokens_per_s
    slow = estimate(base.replace(gpu="t4", precision="fp16-amp", batch=32), "analytic")
    assert slow.step_s > bigger.step_s  # a T4 is slower than an H100 at the same work
    assert estimate(base.replace(target="cpu"), "analytic").tokens_per_s == 0  # no GPU, no claim


def test_closed_form_host_ops_follow_the_block_modules():
    """The committed host-op model counts a block by its modules: a Qwen3-like block (four
    RMSNorms) issues more ops than a Llama block (two), autocast adds casts, and both land near
    the traced count of the same step."""
    from engine.estimate import speed
    from engine.estimate.analytic import arch_of

    cal = speed.calibration()
    assert set(cal.host_ops_model) == {"infer_forward", "train_forward", "backward"}
    llama = arch_of(Profile(model="tiny-llama"))
    assert dict(llama.block_modules)["rmsnorm"] == 2 and llama.rotary
    four = llama.__class__(**{**llama.__dict__, "block_modules": tuple(
        (k, 4 if k == "rmsnorm" else n) for k, n in llama.block_modules)})
    for phase in cal.host_ops_model:
        assert speed.analytic_host_ops(four, phase, False, cal) > speed.analytic_host_ops(llama, phase, False, cal)
        assert speed.analytic_host_ops(llama, phase, True, cal) >= speed.analytic_host_ops(llama, phase, False, cal)
    p = Profile(model="tiny-llama", batch=2, seq=32, precision="bf16-amp", gpu="h100-sxm")
    traced = estimate(p, "traced").extra["speed"]
    closed = speed.analytic_costs(p, arch_of(p), (2, 32))
    host_s = speed.step_time(closed, gpus.get("h100-sxm"), cal)["host_s"]
    assert 0.6 < host_s / traced["host_s"] < 1.6
    bare = llama.__class__(**{**llama.__dict__, "block_modules": ()})  # no census: the old constants
    assert speed.analytic_host_ops(bare, "train_forward", False, cal) is None


def test_an_inference_op_costs_the_host_its_no_grad_time():
    from engine.estimate import speed

    cal = speed.calibration()
    infer = speed.StepCosts()
    infer.add("forward", speed.MEMORY, False, 0.0, 1.0, host=100.0)
    train = speed.StepCosts()
    train.add("forward", speed.MEMORY, False, 0.0, 1.0, host=100.0)
    train.add("optimizer", speed.MEMORY, False, 0.0, 1.0, host=0.0)
    gpu = gpus.get("h100-sxm")
    assert speed.step_time(infer, gpu, cal)["host_s"] == pytest.approx(100 * cal.host_op_infer_s)
    assert speed.step_time(train, gpu, cal)["host_s"] == pytest.approx(100 * cal.host_op_s)
    assert cal.host_op_infer_s < cal.host_op_s  # no autograd graph to record


def test_traced_speed_counts_flops_and_recompute():
    p = Profile(model="tiny-gpt2", batch=2, seq=64, precision="bf16-amp")
    r = estimate(p, "traced")
    rc = estimate(p.replace(checkpointing=True), "traced")
    s, sc = r.extra["speed"], rc.extra["speed"]
    assert s["method"] == "traced" and s["flops"] > 0 and s["bytes"] > 0
    assert sc["flops"] > s["flops"]  # checkpointing runs the blocks' forward again


def test_flash_follows_the_gpu():
    # texts longer than seq: no padding, no mask: flash where the GPU has it
    p = Profile(model="tiny-gpt2", batch=2, seq=8, precision="fp16-amp")
    assert "flash" in estimate(p.replace(gpu="h100-sxm"), "traced").extra["sdpa_backends"]
    t4 = estimate(p.replace(gpu="t4"), "traced").extra["sdpa_backends"]
    assert "flash" not in t4 and t4


# ----- planner: fastest settings that fit, which GPU ------------------------------------------
def test_fastest_returns_fitting_settings_best_first():
    from engine.plan_search import fastest

    budget = 3 * 2**30
    r = fastest(Profile(model="tiny-gpt2", batch=4, seq=64, gpu="h100-sxm"), budget, top=4)
    assert 1 <= len(r.candidates) <= 4 and r.gpu == "h100-sxm"
    # ranked by real (non-pad) tokens/s over the dataset's plan, where the dataset says
    speeds = [c.score for c in r.candidates]
    assert speeds == sorted(speeds, reverse=True) and all(c.useful_tokens_per_s for c in r.candidates)
    paddings = {c.profile.padding for c in r.candidates}
    assert "token-budget" in paddings  # the builtin texts are short: token budgets waste less
    for c in r.candidates:
        assert c.device_used_bytes <= budget and c.margin_bytes == budget - c.device_used_bytes
        again = estimate(c.profile, "analytic")  # each candidate is a real, estimable profile
        assert again.device_used_bytes == c.device_used_bytes and again.tokens_per_s == c.tokens_per_s
    code, out, err = run_cli(["plan", "--model", "tiny-gpt2", "--seq", "64", "--goal", "fastest",
                              "--budget", "3GiB", "--json"])
    d = json.loads(out)
    assert code == 0 and d["goal"] == "fastest" and d["candidates"][0]["tokens_per_s"] > 0
    # the fit goal keeps its contract: it needs a budget
    code, _, err = run_cli(["plan", "--model", "tiny-gpt2"])
    assert code == 2 and "--budget" in err and err.count("\n") == 1


def test_which_gpu_lists_every_catalog_gpu():
    from engine.plan_search import which_gpu

    p = Profile(model="Llama-3.2-1B", batch=8, seq=512, precision="bf16-amp")
    rows = {r.gpu: r for r in which_gpu(p)}
    assert set(rows) == set(gpus.CATALOG) - {"custom"}
    assert not rows["t4"].fits and rows["h200"].fits  # ~30 GB of training state
    assert "fp16" in rows["t4"].note  # no bf16 on a T4: estimated with fp16
    assert rows["h200"].tokens_per_s > rows["t4"].tokens_per_s > 0
    code, out, _ = run_cli(["plan", "--model", "tiny-gpt2", "--seq", "8", "--which-gpu", "--json"])
    assert code == 0 and len(json.loads(out)["gpus"]) == len(gpus.CATALOG) - 1
