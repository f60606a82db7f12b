"""Measured runs on CPU (tiny models, a few steps): what each technique does to the measured peak."""

from __future__ import annotations

import json
import math

import pytest
import torch

from engine.errors import BadInput, Cancelled
from engine.measure import run_measure
from engine.measure.probes import LiveBytesTracker, SimulatedOutOfMemory
from engine.profile import Profile
from engine.results import ALLOCATED_CATEGORIES, MeasureResult


def cpu(**kw) -> Profile:
    base = dict(target="cpu", batch=4, seq=64, steps=2, model="tiny-llama")
    base.update(kw)
    return Profile(**base)


@pytest.fixture(scope="module")
def deep_small_vocab(tmp_path_factory):
    """A GPT-2 shape where activations dominate: 6 layers, a 256-token vocabulary (small logits)."""
    folder = tmp_path_factory.mktemp("deep-gpt2")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "vocab_size": 256, "n_positions": 512, "n_embd": 64, "n_layer": 6,
        "n_head": 4, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}))
    return str(folder)


@pytest.fixture(scope="module")
def small_vocab_llama(tmp_path_factory):
    """tiny-llama's shape with a 256-token vocabulary, so the logits do not dominate."""
    folder = tmp_path_factory.mktemp("small-llama")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 176,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 4096, "tie_word_embeddings": False}))
    return str(folder)


def test_tracker_counts_params_grads_states_exactly():
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters())
    tracker = LiveBytesTracker()
    for p in model.parameters():
        tracker.track(p)
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert tracker.live_bytes == weights
    with tracker:
        model(torch.ones(16, 32)).sum().backward()
        opt.step()
        states = sum(t.untyped_storage().nbytes() for s in opt.state.values() for t in s.values())
        assert tracker.live_bytes == 2 * weights + states  # weights, grads, states
        opt.zero_grad(set_to_none=True)
    assert tracker.live_bytes == weights + states
    capped = LiveBytesTracker(cap_bytes=1000)
    with pytest.raises(SimulatedOutOfMemory), capped:
        torch.zeros(1000)


def test_tracker_source_runs_standalone_with_torch_only():
    """The exported script embeds ``probes.portable_source()``: it must define a working tracker
    from torch alone (no engine import), counting what the engine's copy counts."""
    from engine.measure import probes

    source = probes.portable_source()
    assert "from engine" not in source and "import engine" not in source
    space: dict = {}
    exec("import weakref\nimport torch\nfrom torch.utils._python_dispatch import TorchDispatchMode\n"
         + source, space)
    standalone, ours = space["LiveBytesTracker"](), LiveBytesTracker()
    for tracker in (standalone, ours):
        with tracker:
            x = torch.ones(256)  # 1 KiB
            y = x[:10] * 2  # a view counts nothing; the product 40 bytes
            del x
        assert (tracker.live_bytes, tracker.peak_bytes) == (40, 1024 + 40)
        del y
    capped = space["LiveBytesTracker"](cap_bytes=1000)
    with pytest.raises(torch.OutOfMemoryError, match="simulated capacity of 1000 B exceeded"), capped:
        torch.zeros(1000)


def test_result_fields_timeline_and_json_round_trip():
    r = run_measure(cpu(steps=3, batch=2, seq=32))
    assert not r.oom and r.device == "cpu" and r.steps == 3
    assert r.peak_allocated_bytes > 0 and r.peak_reserved_bytes >= 0
    assert sum(r.breakdown[c.value] for c in ALLOCATED_CATEGORIES) == r.peak_allocated_bytes
    assert r.breakdown["weights"] == r.extra["weights_bytes"] > 0
    assert r.breakdown["optimizer"] == 2 * r.breakdown["weights"] or r.breakdown["optimizer"] > 0
    phases = [(p.step, p.phase) for p in r.timeline]
    assert phases[0] == (0, "start")
    assert (2, "forward") in phases and (2, "backward") in phases and (2, "optimizer") in phases
    assert len(r.losses) == 3 and all(math.isfinite(x) for x in r.losses)
    assert 0 < r.real_tokens <= r.padded_tokens == 2 * 2 * 32  # timed steps exclude the first
    assert r.tokens_per_s > 0 and r.useful_tokens_per_s <= r.tokens_per_s
    assert r.first_step_s > 0 and r.step_time_s > 0 and r.distinct_shapes >= 1
    assert MeasureResult.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_checkpointing_lowers_the_measured_peak(deep_small_vocab):
    kw = dict(model=deep_small_vocab, batch=4, seq=128, attn="eager")
    plain = run_measure(cpu(**kw))
    ckpt = run_measure(cpu(checkpointing=True, **kw))
    assert ckpt.peak_allocated_bytes < 0.7 * plain.peak_allocated_bytes
    assert ckpt.breakdown["weights"] == plain.breakdown["weights"]
    assert any("modulo 256" in n for n in plain.notes)  # fallback tokenizer ids exceed the vocab


def test_pure_bf16_halves_the_weights():
    fp32 = run_measure(cpu())
    bf16 = run_measure(cpu(precision="bf16"))
    assert bf16.breakdown["weights"] * 2 == fp32.breakdown["weights"]
    assert bf16.peak_allocated_bytes < fp32.peak_allocated_bytes


def test_inference_needs_less_than_training():
    train = run_measure(cpu())
    infer = run_measure(cpu(mode="infer"))
    assert infer.peak_allocated_bytes < train.peak_allocated_bytes
    assert infer.breakdown["gradients"] == infer.breakdown["optimizer"] == 0
    assert infer.losses == ()


def test_impossible_batch_on_a_limited_budget_is_an_oom_result():
    r = run_measure(cpu(batch=16, seq=256, memory_cap_bytes=12 * 2**20))
    assert r.oom and r.oom_step == 0 and r.oom_phase in ("forward", "backward", "optimizer")
    assert 0 < r.peak_allocated_bytes <= 12 * 2**20
    assert r.breakdown["weights"] > 0
    assert any("out of memory" in n for n in r.notes)


@pytest.mark.parametrize("model,task", [("tiny-gpt2", "causal-lm"), ("tiny-bert", "masked-lm"),
                                        ("tiny-llama", "classification"), ("tiny-bert", "classification")])
def test_each_head_trains(model, task):
    r = run_measure(cpu(model=model, task="auto" if task != "classification" else task))
    assert r.extra["task"] == task
    assert len(r.losses) == 2 and all(math.isfinite(x) for x in r.losses)
    if task == "classification":
        assert r.losses[0] < 2.0  # cross-entropy over 2 classes, not over the vocabulary


def test_micro_batches_lower_the_peak(deep_small_vocab):
    kw = dict(model=deep_small_vocab, batch=8, seq=64)
    whole = run_measure(cpu(**kw))
    micro = run_measure(cpu(micro_batches=4, **kw))
    assert micro.peak_allocated_bytes < whole.peak_allocated_bytes
    assert micro.padded_tokens == whole.padded_tokens  # same batches, accumulated
    assert sum(1 for p in micro.timeline if p.step == 1 and p.phase == "backward") == 4


def test_chunked_input_lowers_inference_peak(small_vocab_llama):
    kw = dict(model=small_vocab_llama, mode="infer", seq=1024, batch=2, padding="fixed")
    whole = run_measure(cpu(**kw))
    chunked = run_measure(cpu(chunk_input=128, **kw))
    assert chunked.peak_allocated_bytes < whole.peak_allocated_bytes
    assert chunked.padded_tokens == whole.padded_tokens


def test_fp16_autocast_with_grad_scaler_or_an_honest_fallback():
    r = run_measure(cpu(precision="fp16-amp"))
    assert not r.oom and all(math.isfinite(x) for x in r.losses)
    if r.extra.get("precision_ran", "fp16-amp") != "fp16-amp":
        assert any("autocast" in n for n in r.notes)
        pytest.skip(f"CPU autocast fp16 unsupported here: {r.notes}")
    assert r.extra["precision"] == "fp16-amp"


def test_bf16_autocast_runs():
    r = run_measure(cpu(precision="bf16-amp", optimizer="sgd"))
    # SGD with momentum keeps one fp32 buffer per parameter
    assert not r.oom and r.extra["optimizer_state_bytes"] == 4 * r.params


def test_should_stop_cancels_and_progress_reports():
    seen = []
    with pytest.raises(Cancelled):
        run_measure(cpu(steps=5), progress=lambda f, m: seen.append((f, m)),
                    should_stop=lambda: any(m.startswith("step 2") for _, m in seen))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and all(0 <= f <= 1 for f in fractions)


def test_snapshot_and_cuda_need_cuda():
    with pytest.raises(BadInput, match="snapshots need CUDA"):
        run_measure(cpu(), snapshot="x.pickle")
    if not torch.cuda.is_available():
        with pytest.raises(BadInput, match="no CUDA device"):
            run_measure(cpu(target="cuda"))


def test_distillation_without_its_module_is_bad_input():
    import importlib.util

    if importlib.util.find_spec("engine.techniques.distillation") is not None:
        r = run_measure(cpu(model="tiny-gpt2", distill_from="tiny-gpt2"))
        assert not r.oom and len(r.losses) == 2
    else:
        with pytest.raises(BadInput, match="distillation not available"):
            run_measure(cpu(distill_from="tiny-llama"))


@pytest.mark.gpu
def test_cuda_run_matches_protocol():
    r = run_measure(Profile(model="tiny-gpt2", target="cuda", batch=4, seq=64, steps=3))
    assert r.device == "cuda" and r.peak_allocated_bytes > 0
    assert r.peak_reserved_bytes >= r.peak_allocated_bytes
    assert r.device_used_bytes >= r.peak_reserved_bytes


def test_first_pass_reported_apart_from_the_steady_state(tmp_path):
    """12 texts, batch 4, dynamic padding: a plan of 3 batches; 7 steps = first pass (3) + 4 more."""
    lines = ["the quick brown fox", "jumps over the lazy dog and keeps running far away", "a",
             "memory planners estimate peaks before the run starts on any device", "short text",
             "another line with several more words than the one before it", "padding wastes compute",
             "bucketing groups similar lengths together so batches pad less", "x y z",
             "token budgets hold many short or few long sequences", "one more line here",
             "the last line of this tiny dataset file"]
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    r = run_measure(cpu(model="tiny-gpt2", dataset=str(path), padding="dynamic", batch=4, steps=7))
    passes = r.extra["passes"]
    first, steady = passes["first_pass"], passes["steady"]
    assert passes["plan_batches"] == 3
    assert first["steps"] == 3 and first["complete"] and steady["steps"] == 4
    assert first["new_shapes"] == r.distinct_shapes == r.extra["distinct_shapes"]
    assert steady["new_shapes"] == 0  # the steady state cycles the same batches
    # The headline counts exclude the warm-up step 0; the passes count every completed step.
    step0_real = first["real_tokens"] - (r.real_tokens - steady["real_tokens"])
    assert 0 < step0_real < first["real_tokens"]
    # Steps 3..6 are batches 0..2 then 0 again: the steady tokens are one pass plus batch 0.
    assert steady["real_tokens"] == first["real_tokens"] + step0_real
    assert steady["padded_tokens"] - first["padded_tokens"] == \
        first["padded_tokens"] - (r.padded_tokens - steady["padded_tokens"])
    from engine import data

    profile = cpu(model="tiny-gpt2")
    expected = sum(min(len(t), profile.seq) for t in data.tokenize(lines, data.tokenizer_for(profile)))
    assert first["real_tokens"] == expected  # the first pass is one pass over every text
    for part in (first, steady):
        assert part["time_s"] > 0 and part["useful_tokens_per_s"] > 0
        assert part["tokens_per_s"] >= part["useful_tokens_per_s"]
        assert math.isclose(part["useful_tokens_per_s"], part["real_tokens"] / part["time_s"])
    assert passes["first_over_steady"] > 0

    short = run_measure(cpu(model="tiny-gpt2", dataset=str(path), padding="dynamic", batch=4, steps=2))
    assert short.extra["passes"]["steady"] is None
    assert short.extra["passes"]["first_pass"]["complete"] is False


def test_incompatible_techniques_are_bad_input_before_running():
    with pytest.raises(BadInput, match="ffn_chunks"):
        run_measure(cpu(model="tiny-llama", ffn_chunks=8, seq=4))


def test_cuda_probe_reads_the_counters_torch_reads(monkeypatch):
    """The CUDA probe indexes the allocator's nested stats once per point; the numbers must be the
    ones torch.cuda.memory_allocated / max_memory_allocated / memory_reserved / max_memory_reserved
    give for the same stats (checked here through torch's own flattening, without a GPU)."""
    from types import SimpleNamespace

    from engine.measure.probes import CudaProbe

    def pools(current, peak):
        return {p: {"current": current, "peak": peak, "allocated": 0, "freed": 0}
                for p in ("all", "small_pool", "large_pool")}

    stats = {"allocated_bytes": pools(5_000, 9_000), "reserved_bytes": pools(20_000, 40_000),
             "active_bytes": pools(1, 2), "num_ooms": 0}
    resets = []
    fake = SimpleNamespace(cuda=SimpleNamespace(memory_stats_as_nested_dict=lambda device: stats,
                                                reset_peak_memory_stats=resets.append))
    monkeypatch.setattr(torch.cuda.memory, "memory_stats_as_nested_dict", lambda device=None: stats)

    probe = CudaProbe(fake, "cuda:0")
    probe.baseline = 1_000
    assert probe.allocated() == torch.cuda.memory_allocated() - 1_000 == 4_000
    assert probe.reserved() == torch.cuda.memory_reserved() == 20_000
    end = probe.phase_end()
    assert end.peak == torch.cuda.max_memory_allocated() - 1_000 == 8_000
    assert end.peak_reserved == torch.cuda.max_memory_reserved() == 40_000
    assert (end.allocated, end.reserved) == (4_000, 20_000)
    assert resets == ["cuda:0"]  # the peaks are reset after they are read


@pytest.mark.parametrize("kw", [dict(), dict(padding="dynamic", batch=2, seq=64, steps=7)])
def test_quiet_repeats_keep_the_peak_and_its_breakdown(monkeypatch, kw):
    """Repeated shapes run without the bookkeeping (CUDA's default): the peak, the peak's
    breakdown and the steps are those of the fully instrumented run; only repeats are quiet."""
    from engine.measure import runner

    profile = cpu(**{"steps": 5, **kw})
    full = run_measure(profile)
    monkeypatch.setattr(runner, "quiet_repeats", lambda p: True)
    quiet = run_measure(profile)
    assert quiet.peak_allocated_bytes == full.peak_allocated_bytes
    assert quiet.breakdown == full.breakdown
    assert quiet.steps == full.steps and quiet.losses == pytest.approx(full.losses)
    quiet_steps = {r[0] for r in quiet.extra["phase_peaks"] if r[1] == "step"}
    assert quiet_steps, "no step ran quiet"
    assert 0 not in quiet_steps and 1 not in quiet_steps  # step 0 and the first repeat: measured
    # Each quiet step's peak equals the peak of the instrumented step of the same shape.
    full_peaks = {}
    for s, _, peak in full.extra["phase_peaks"]:
        full_peaks[s] = max(full_peaks.get(s, 0), peak)
    for s, phase, peak in quiet.extra["phase_peaks"]:
        if phase == "step":
            assert peak == full_peaks[s]
