"""Generation (--mode generate): the decode loop equals model.generate; the estimates' KV cache bytes
equal the measured cache tensors' bytes exactly and the traced peaks are within 3% in prefill and
in decode (CPU, live-bytes tracker); a static cache is allocated at its full length; sliding
layers stop growing at their window; bad input is one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _cli import run_cli

from engine.errors import BadInput
from engine.estimate import estimate
from engine.measure import run_measure
from engine.profile import Profile

GEMMA = str(Path(__file__).resolve().parent / "data" / "tiny-gemma3")  # 2 sliding (window 8), 1 full
B, P, N = 2, 12, 6


def gen(model: str, **kw) -> Profile:
    fields = dict(model=model, mode="generate", target="cpu", batch=B, prompt_len=P,
                  new_tokens=N, steps=1)
    fields.update(kw)
    return Profile(**fields)


@pytest.mark.parametrize("model,cache", [("tiny-llama", "dynamic"), ("tiny-llama", "static"),
                                         ("tiny-gpt2", "dynamic"), (GEMMA, "dynamic"),
                                         (GEMMA, "static")])
def test_estimates_match_the_measured_generation(model, cache):
    profile = gen(model, cache=cache)
    measured = run_measure(profile)
    traced = estimate(profile, method="traced")
    analytic = estimate(profile, method="analytic")
    assert measured.kv_cache_bytes > 0
    assert traced.kv_cache_bytes == measured.kv_cache_bytes
    assert analytic.kv_cache_bytes == measured.kv_cache_bytes
    assert traced.extra["kv_cache_storage_bytes"] == measured.extra["kv_cache_storage_bytes"]
    assert analytic.extra["kv_cache_storage_bytes"] == measured.extra["kv_cache_storage_bytes"]
    for phase in ("prefill", "decode"):
        key = f"{phase}_peak_allocated_bytes"
        assert abs(traced.extra[key] - measured.extra[key]) <= 0.03 * measured.extra[key], phase
    assert traced.extra["cache_growth_bytes"] == measured.extra["cache_growth_bytes"]
    assert measured.time_to_first_token_s > 0 and measured.decode_tokens_per_s > 0
    assert measured.prefill_tokens_per_s > 0
    assert [p.phase for p in measured.timeline] == ["prefill"] + ["decode"] * (N - 1)
    d = measured.to_dict()
    for key in ("kv_cache_bytes", "prefill_tokens_per_s", "decode_tokens_per_s",
                "time_to_first_token_s"):
        assert key in d
    assert measured.breakdown["kv_cache"] == measured.extra["kv_cache_storage_bytes"] \
        or measured.extra["peak_phase"] == "prefill"


def test_decode_loop_equals_model_generate():
    from engine.measure import decode
    from engine.models import build_model

    for model, kind in (("tiny-llama", "dynamic"), (GEMMA, "static")):
        profile = gen(model, cache=kind)
        torch.manual_seed(0)
        m = build_model(profile, "cpu").eval()
        ids = torch.randint(0, 1000, (2, 10))
        mask = torch.ones_like(ids)
        ours = decode.greedy_generate(m, ids, mask, decode.make_cache(m, kind, 16), 6)
        ref = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                         do_sample=False, cache_implementation="static" if kind == "static" else None)
        assert torch.equal(ours, ref)


def test_static_cache_is_preallocated_at_full_length():
    measured = run_measure(gen("tiny-llama", cache="static"))
    per_token = 2 * B * 2 * 16 * 4 * 2  # k+v x B x kv_heads x head_dim x fp32 x layers
    assert measured.extra["cache_growth_bytes"] == [(P + N) * per_token] * N
    assert measured.kv_cache_bytes == (P + N) * per_token
    dynamic = run_measure(gen("tiny-llama"))
    assert dynamic.kv_cache_bytes == (P + N - 1) * per_token
    assert dynamic.extra["cache_growth_bytes"] == [(P + i) * per_token for i in range(N)]


def test_sliding_layers_stop_growing_at_the_window():
    from engine.estimate.generate import cache_kinds
    from engine.measure import decode
    from engine.models import build_model

    profile = gen(GEMMA, prompt_len=3, new_tokens=12)
    assert [k.kind for k in cache_kinds(profile)] == ["sliding", "sliding", "full"]
    m = build_model(profile, "cpu").eval()
    cache = decode.make_cache(m, "dynamic", 15)
    lengths = []
    decode.greedy_generate(m, torch.ones((1, 3), dtype=torch.long), torch.ones((1, 3), dtype=torch.long),
                           cache, 12, lambda i: lengths.append([lay.keys.shape[-2] for lay in cache.layers]))
    assert [x[0] for x in lengths] == [3, 4, 5, 6, 7, 7, 7, 7, 7, 7, 7, 7]  # window 8: last 7 kept
    assert [x[2] for x in lengths] == list(range(3, 15))
    measured = run_measure(profile)
    assert estimate(profile, method="analytic").kv_cache_bytes == measured.kv_cache_bytes


def test_prompts_from_the_dataset_are_left_padded():
    profile = gen("tiny-llama", prompt_len=0, seq=24, batch=3)
    from engine.estimate.generate import prompt_shape
    from engine.measure.generate import prompt_tensors
    from engine.models import load_config

    ids, mask, real = prompt_tensors(profile, load_config("tiny-llama"), None, [])
    b, p, padded = prompt_shape(profile)
    assert tuple(ids.shape) == (b, p) == (3, mask.shape[1]) and p <= 24
    assert bool((mask[:, -1] == 1).all())  # left padding: every prompt ends at the last column
    assert padded == bool((mask == 0).any())
    assert estimate(profile, method="traced").kv_cache_bytes == run_measure(profile).kv_cache_bytes


@pytest.mark.parametrize("argv,expect", [
    (["--model", "tiny-gpt2", "--prompt-len", "1000", "--new-tokens", "100"], "exceeds"),
    (["--model", "tiny-gpt2", "--new-tokens", "0"], "new_tokens must be >= 1"),
    (["--model", "tiny-bert"], "encoder"),
    (["--model", "tiny-llama", "--checkpointing"], "checkpointing means nothing"),
    (["--model", "tiny-llama", "--micro-batches", "2"], "micro_batches means nothing"),
    (["--model", "tiny-llama", "--chunk-input", "64"], "chunk_input"),
    (["--model", "tiny-llama", "--padding", "dynamic"], "padding"),
])
def test_bad_generation_input_is_one_line(argv, expect):
    code, out, err = run_cli(["estimate", "--mode", "generate", "--target", "cpu", *argv])
    assert code == 2, err
    assert expect in err and err.count("\n") == 1 and out == ""


def test_generation_fields_outside_generate_mode_are_refused():
    code, _, err = run_cli(["estimate", "--model", "tiny-gpt2", "--prompt-len", "64"])
    assert code == 2 and "--mode generate only" in err
    with pytest.raises(BadInput):
        Profile(mode="infer", cache="static").replace()


def test_oom_under_a_simulated_capacity_is_a_result():
    profile = gen("tiny-llama", memory_cap_bytes=4_600_000)
    r = run_measure(profile)
    assert r.oom and r.oom_phase in ("prefill", "decode")


@pytest.mark.parametrize("vary", ["batch", "context"])
def test_plan_answer_fits_under_a_simulated_cap_and_the_next_size_does_not(vary):
    from engine.plan import plan

    budget = 6_000_000
    profile = gen("tiny-llama", prompt_len=16, new_tokens=4)
    result = plan(profile, budget_bytes=budget, vary=vary, method="traced")
    assert result.fits and result.next_value == result.value + 1

    def at(value):
        if vary == "batch":
            return profile.replace(batch=value, memory_cap_bytes=budget)
        return profile.replace(prompt_len=value - profile.new_tokens, memory_cap_bytes=budget)

    assert not run_measure(at(result.value)).oom
    assert run_measure(at(result.next_value)).oom


def test_plan_vary_context_needs_generate_mode():
    code, _, err = run_cli(["plan", "--model", "tiny-gpt2", "--target", "cpu", "--budget", "1GiB",
                            "--vary", "context"])
    assert code == 2 and "batch or seq" in err


def test_exported_generation_script_runs_on_cpu_and_prints_the_measure_json(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from engine.export import export_script

    profile = gen(GEMMA, cache="dynamic")
    script = tmp_path / "generate.py"
    script.write_text(export_script(profile))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # Headroom is not imported
    done = subprocess.run([sys.executable, str(script), "--device", "cpu"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["kv_cache_bytes"] == estimate(profile, method="analytic").kv_cache_bytes
    for key in ("peak_allocated_bytes", "decode_tokens_per_s", "prefill_tokens_per_s",
                "time_to_first_token_s"):
        assert result[key] > 0, key
    assert "import engine" not in script.read_text() and "greedy_generate" in script.read_text()


@pytest.mark.parametrize("model,cache", [("tiny-llama", "dynamic"), (GEMMA, "dynamic"), (GEMMA, "static")])
def test_long_generations_trace_the_first_and_last_decode_steps(model, cache):
    from engine.estimate.generate import TRACED_FULL_STEPS

    profile = gen(model, cache=cache, new_tokens=TRACED_FULL_STEPS + 14)
    measured = run_measure(profile)
    traced = estimate(profile, method="traced")
    assert traced.kv_cache_bytes == measured.kv_cache_bytes
    for phase in ("prefill", "decode"):
        key = f"{phase}_peak_allocated_bytes"
        assert abs(traced.extra[key] - measured.extra[key]) <= 0.03 * measured.extra[key], phase
    assert traced.extra["cache_growth_bytes"] == measured.extra["cache_growth_bytes"]


def test_generation_in_the_measure_child_reports_progress_and_oom_as_a_result():
    from engine.measure.process import measure_in_child

    progress = []
    r = measure_in_child(gen("tiny-llama", memory_cap_bytes=4_690_000),
                         progress=lambda f, m: progress.append(m))
    assert r.oom and r.oom_phase in ("prefill", "decode")
    assert any("generation 1/1" in m for m in progress) or r.oom_phase == "prefill"


def test_cancel_stops_a_generation_between_tokens():
    from engine.errors import Cancelled

    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Cancelled):
        run_measure(gen("tiny-llama", new_tokens=50), should_stop=stop)


def test_int8_base_weights_generate_and_match_the_traced_estimate():
    profile = gen("tiny-llama", quant="int8")
    measured = run_measure(profile)
    traced = estimate(profile, method="traced")
    assert traced.kv_cache_bytes == measured.kv_cache_bytes
    assert abs(traced.peak_allocated_bytes - measured.peak_allocated_bytes) \
        <= 0.03 * measured.peak_allocated_bytes
    assert measured.breakdown["weights"] < run_measure(gen("tiny-llama")).breakdown["weights"]


def test_multi_gpu_generation_is_refused():
    code, _, err = run_cli(["estimate", "--mode", "generate", "--model", "tiny-llama", "--target",
                            "cpu", "--gpus", "2"])
    assert code == 2 and "one GPU" in err
