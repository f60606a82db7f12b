"""Estimators: traced (meta tensors) against a real CPU run, analytic against traced, the allocator
model, and the result contract. Timings are measured in bench/bench_estimators.py, not here."""

import pytest
import torch

from engine.errors import BadInput, Cancelled
from engine.estimate import allocator, analytic, estimate, estimate_shape, traced
from engine.estimate.allocator import KLARGE_BUFFER, KSMALL_BUFFER, simulate
from engine.profile import Profile
from engine.results import ALLOCATED_CATEGORIES

MiB = 1 << 20
TINY = ("tiny-gpt2", "tiny-llama", "tiny-bert")


def _real_cpu_peak(profile: Profile, shape) -> int:
    """The same protocol on real CPU tensors, counted by the same tracker (no emulation)."""
    from engine.models import build_model

    torch.manual_seed(0)
    model = build_model(profile, "cpu")
    model.config.use_cache = False
    return traced.trace_step(profile, shape, model=model, fake=False).peak_allocated


# ----- traced vs a real CPU run ------------------------------------------------------------
@pytest.mark.parametrize("model", TINY)
@pytest.mark.parametrize("precision,mode,ckpt", [
    ("fp32", "train", False), ("bf16-amp", "train", False), ("fp32", "train", True),
    ("bf16-amp", "infer", False)])
def test_traced_matches_real_cpu_run(model, precision, mode, ckpt):
    p = Profile(model=model, target="cpu", precision=precision, mode=mode, checkpointing=ckpt,
                batch=3, seq=48)
    real = _real_cpu_peak(p, (3, 48))
    fake = traced.trace_step(p, (3, 48)).peak_allocated
    assert abs(fake - real) / real < 0.02, (fake, real)


def test_traced_matches_measure_cpu_run():
    from engine import measure

    p = Profile(model="tiny-llama", target="cpu", precision="fp32", batch=2, seq=32, steps=2)
    measured = measure.run_measure(p).peak_allocated_bytes
    est = estimate(p, "traced").peak_allocated_bytes
    assert abs(est - measured) / measured < 0.03, (est, measured)


def test_traced_allocates_nothing_real():
    # Qwen2.5-0.5B: 2 GB of fp32 weights; a meta trace must not allocate them.
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = estimate(Profile(model="Qwen2.5-0.5B", batch=1, seq=64), "traced")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert r.peak_allocated_bytes > 4 * 2**30
    assert (after - before) * 1024 < 600 * MiB


# ----- analytic vs traced ------------------------------------------------------------------
GRID = [{"model": m, "precision": pr, "mode": mo, "checkpointing": ck, "target": tg,
         "batch": 4, "seq": 128}
        for m in TINY for pr in ("fp32", "bf16-amp", "bf16") for mo in ("train", "infer")
        for ck in (False, True) for tg in ("cuda", "cpu")
        if not (ck and mo == "infer") and not (tg == "cpu" and pr == "bf16")]


@pytest.mark.parametrize("fields", GRID[::3], ids=lambda f: "-".join(str(v) for v in f.values()))
def test_analytic_close_to_traced(fields):
    p = Profile(**fields)
    a = estimate(p, "analytic").peak_allocated_bytes
    t = estimate(p, "traced").peak_allocated_bytes
    assert abs(a - t) / t < 0.15, (a, t)


def test_analytic_close_to_traced_real_size_model():
    p = Profile(model="gpt2", batch=2, seq=256, precision="bf16-amp")
    a = estimate(p, "analytic").peak_allocated_bytes
    t = estimate(p, "traced").peak_allocated_bytes
    assert abs(a - t) / t < 0.15, (a, t)


# ----- result contract ---------------------------------------------------------------------
@pytest.mark.parametrize("method", ["analytic", "traced"])
def test_result_contract(method):
    r = estimate(Profile(model="tiny-gpt2", batch=2, seq=32), method)
    d = r.to_dict()
    for key in ("peak_allocated_bytes", "peak_reserved_bytes", "breakdown", "device_used_bytes",
                "elapsed_s", "peak_batch_shape", "peak_phase", "layers", "params"):
        assert key in d
    assert r.method == method
    assert set(r.breakdown) == {c.value for c in ALLOCATED_CATEGORIES}
    assert sum(r.breakdown.values()) == r.peak_allocated_bytes
    assert r.peak_reserved_bytes >= r.peak_allocated_bytes
    assert r.device_used_bytes > r.peak_reserved_bytes  # CUDA context on top
    assert r.peak_batch_shape == (2, 32)
    assert r.peak_phase in ("forward", "backward", "optimizer")
    blocks = [x for x in r.layers if x.name.startswith("transformer.h.")]  # between embeddings and logits
    assert len(blocks) == 2 and blocks[0].params > 0


def test_auto_picks_traced_for_small_work_and_cpu_has_no_context():
    r = estimate(Profile(model="tiny-gpt2", batch=2, seq=32, target="cpu"))
    assert r.method == "traced"
    assert r.device_used_bytes == r.peak_reserved_bytes == r.peak_allocated_bytes


def test_bad_method_and_cancel():
    with pytest.raises(BadInput):
        estimate(Profile(model="tiny-gpt2"), "guess")
    with pytest.raises(Cancelled):
        estimate(Profile(model="tiny-gpt2", batch=2, seq=32), "traced", should_stop=lambda: True)


def test_progress_reaches_one():
    seen = []
    estimate(Profile(model="tiny-gpt2", batch=2, seq=32), "analytic",
             progress=lambda f, m: seen.append(f))
    assert seen and seen[-1] == 1.0


# ----- techniques move the estimate the right way -------------------------------------------
@pytest.mark.parametrize("method", ["analytic", "traced"])
def test_techniques_directions(method):
    base = Profile(model="tiny-llama", batch=8, seq=256, precision="bf16-amp")
    peak = estimate(base, method).peak_allocated_bytes
    assert estimate(base.replace(checkpointing=True), method).peak_allocated_bytes < peak
    assert estimate(base.replace(micro_batches=4), method).peak_allocated_bytes < peak
    assert estimate(base.replace(mode="infer"), method).peak_allocated_bytes < peak
    assert estimate(base.replace(batch=16), method).peak_allocated_bytes > peak
    assert estimate(base.replace(attn="eager", seq=512), method).peak_allocated_bytes > \
        estimate(base.replace(seq=512), method).peak_allocated_bytes
    assert estimate(base.replace(optimizer="sgd"), method).peak_allocated_bytes < peak


def test_logits_dominate_big_vocab():
    # Qwen's 152k vocabulary: the loss temporaries are several times the logits' size.
    r = estimate(Profile(model="Qwen2.5-0.5B", batch=4, seq=512, precision="bf16-amp"), "analytic")
    logits = 4 * 512 * 151936 * 4
    assert r.breakdown["temporaries"] > 2 * logits


def test_dynamic_padding_peak_shape_is_a_real_batch():
    p = Profile(model="tiny-gpt2", batch=4, seq=128, padding="dynamic")
    r = estimate(p, "analytic")
    b, t = r.peak_batch_shape
    assert 1 <= b <= 4 and 1 <= t <= 128
    assert list(r.peak_batch_shape) in r.extra["candidates"]


def test_distillation_adds_teacher():
    p = Profile(model="tiny-gpt2", batch=2, seq=32)
    plain = estimate(p, "traced")
    dist = estimate(p.replace(distill_from="tiny-gpt2"), "traced")
    assert dist.breakdown["weights"] > plain.breakdown["weights"]


@pytest.mark.parametrize("method", ["analytic", "traced"])
def test_teacher_precision_halves_the_teacher_weights(method):
    base = Profile(model="tiny-llama", distill_from="tiny-gpt2", batch=2, seq=32, target="cpu")
    plain = estimate(base.replace(distill_from=""), method).breakdown["weights"]
    by = {tp: estimate(base.replace(teacher_precision=tp), method) for tp in ("auto", "fp32", "bf16")}
    teacher = {tp: r.breakdown["weights"] - plain for tp, r in by.items()}
    assert teacher["auto"] == teacher["fp32"] > 0  # auto on CPU: the fp32 student's dtype
    assert teacher["bf16"] * 2 == pytest.approx(teacher["fp32"], rel=0.01)
    assert by["bf16"].peak_allocated_bytes < by["fp32"].peak_allocated_bytes
    # on CUDA a bf16-amp student already gets a bf16 teacher (auto); fp32 asks for the full copy
    cuda = base.replace(target="cuda", precision="bf16-amp")
    assert estimate(cuda.replace(teacher_precision="fp32"), method).breakdown["weights"] > \
        estimate(cuda, method).breakdown["weights"] == estimate(cuda.replace(teacher_precision="bf16"),
                                                                 method).breakdown["weights"]


def test_analytic_teacher_precision_close_to_traced():
    for tp, precision in (("bf16", "fp32"), ("fp32", "bf16"), ("fp16", "bf16-amp")):
        p = Profile(model="tiny-gpt2", distill_from="tiny-llama", batch=2, seq=128, target="cpu",
                    precision=precision, teacher_precision=tp)
        a = estimate(p, "analytic").peak_allocated_bytes
        t = estimate(p, "traced").peak_allocated_bytes
        assert abs(a - t) / t < 0.10, (tp, precision, a, t)


# ----- the allocator model -----------------------------------------------------------------
def test_round_and_segment_sizes():
    assert allocator.round_size(1) == 512
    assert allocator.round_size(513) == 1024
    assert allocator.allocation_size(1000) == KSMALL_BUFFER
    assert allocator.allocation_size(5 * MiB) == KLARGE_BUFFER
    assert allocator.allocation_size(11 * MiB + 1) == 12 * MiB


def test_simulate_small_blocks_share_a_segment_and_cache_is_kept():
    s = simulate([(i, 1000) for i in range(100)] + [(i, -1000) for i in range(100)])
    assert s.peak_reserved == KSMALL_BUFFER and s.peak_allocated == 100 * 1024
    s = simulate([(0, 5 * MiB), (1, 5 * MiB), (2, 5 * MiB), (3, 5 * MiB), (4, 5 * MiB)])
    assert s.peak_reserved == 2 * KLARGE_BUFFER  # four 5 MiB blocks per 20 MiB segment


def test_simulate_reuses_freed_blocks_and_fragments():
    # Free the middle of three 100 MiB blocks: a 150 MiB request cannot use the hole.
    s = simulate([(0, 100 * MiB), (1, 100 * MiB), (2, 100 * MiB), (1, -100 * MiB),
                  (3, 50 * MiB), (4, 150 * MiB)])
    assert s.peak_reserved == 450 * MiB
    assert s.peak_allocated == 400 * MiB


def test_expandable_segments_grow_in_place():
    # A cached 100 MiB segment cannot serve 150 MiB: a second segment is made (250 MiB);
    # an expandable segment maps 50 MiB more after the free tail (20 MiB pages: 160 MiB).
    events = [(0, 100 * MiB), (0, -100 * MiB), (1, 150 * MiB)]
    assert simulate(events).peak_reserved == 250 * MiB
    exp = simulate(events, expandable=True).peak_reserved
    assert exp == 160 * MiB and exp % KLARGE_BUFFER == 0


def test_pool_prereserves():
    s = simulate([(0, 30 * MiB), (0, -30 * MiB)], pool_bytes=1 << 30)
    assert s.peak_reserved == 1 << 30
    r = estimate(Profile(model="tiny-gpt2", batch=2, seq=32, alloc="pool:2GiB"), "traced")
    assert r.peak_reserved_bytes >= 2 << 30


def test_max_split_size_keeps_big_blocks_whole():
    # CUDACachingAllocator with max_split_size_mb:256: a cached 300 MiB block is not split for two
    # 100 MiB tensors (get_free_block refuses an oversize block for a smaller request), and a
    # 300 MiB request is not served by a 512 MiB block (20 MiB rounding limit for oversize ones).
    events = [("a", 300 * MiB), ("a", -1), ("b", 100 * MiB), ("c", 100 * MiB)]
    assert simulate(events).peak_reserved == 300 * MiB
    assert simulate(events, max_split=256 * MiB).peak_reserved == 500 * MiB
    events = [("a", 512 * MiB), ("a", -1), ("b", 300 * MiB), ("b", -1), ("c", 500 * MiB)]
    assert simulate(events, max_split=256 * MiB).peak_reserved == 812 * MiB
    assert simulate(events).peak_reserved == 512 * MiB
    # below the limit, blocks split as before; an oversize block within 20 MiB is reused whole
    small = [("a", 200 * MiB), ("a", -1), ("b", 50 * MiB), ("c", 50 * MiB)]
    assert simulate(small, max_split=256 * MiB).peak_reserved == 200 * MiB
    near = [("a", 300 * MiB), ("a", -1), ("b", 290 * MiB)]
    s = simulate(near, max_split=256 * MiB)
    assert s.peak_reserved == 300 * MiB and s.peak_allocated == 300 * MiB  # handed out unsplit
    # a pre-reserved pool at or above the limit is never carved up
    pool = [("x", 30 * MiB)]
    assert simulate(pool, pool_bytes=512 * MiB).peak_reserved == 512 * MiB
    assert simulate(pool, pool_bytes=512 * MiB, max_split=256 * MiB).peak_reserved == 542 * MiB
    assert allocator.reserved_from_sizes([30 * MiB], [], pool_bytes=512 * MiB,
                                         max_split=256 * MiB) == 542 * MiB
    assert allocator.reserved_from_sizes([30 * MiB], [], pool_bytes=512 * MiB) == 512 * MiB
    # expandable segments split regardless (should_split): the limit is not modelled there
    assert simulate(events, expandable=True, max_split=256 * MiB).peak_reserved == \
        simulate(events, expandable=True).peak_reserved
    # both estimators pass the profile's setting to the model
    p = Profile(model="tiny-gpt2", batch=2, seq=32, alloc="pool:512MiB")
    for method in ("analytic", "traced"):
        with_limit = estimate(p.replace(alloc_max_split="256MiB"), method).peak_reserved_bytes
        assert with_limit > estimate(p, method).peak_reserved_bytes, method


def test_analytic_arch_uses_built_shapes():
    arch = analytic.arch_of(Profile(model="Qwen2.5-0.5B"))
    assert (arch.family, arch.heads, arch.kv_heads, arch.head_dim) == ("llama", 14, 2, 64)
    assert arch.gated and arch.ffn == 4864 and arch.layers == 24


# ----- fixes from the H100 comparison (bench/results/estimates_vs_h100_2026-11-25.md) -----------
@pytest.mark.parametrize("method", ["analytic", "traced"])
def test_fp32_gqa_without_mask_runs_math_on_cuda(method):
    # transformers passes enable_gqa without a mask; CUDA's efficient kernel rejects GQA, so fp32
    # runs the math path and keeps T x T probabilities (Qwen2.5/Llama fp32 on the H100: the
    # estimate was 12-13% low). bf16 takes flash (GQA allowed): no T x T.
    from engine.estimate import estimate_shape

    b, t = 4, 512
    p = Profile(model="tiny-llama", batch=b, seq=t, precision="fp32")
    gqa = estimate_shape(p, (b, t), False, method)
    padded = estimate_shape(p, (b, t), True, method)  # repeat_kv + efficient: no T x T
    probs = b * 4 * t * t * 4  # (B, heads, T, T) fp32, per layer
    first_block = 1  # after the embeddings row
    assert gqa.layers[first_block].activation_bytes > probs > padded.layers[first_block].activation_bytes
    assert gqa.peak_allocated_bytes > padded.peak_allocated_bytes
    if method == "traced":
        r = estimate_shape(p, (b, t), False, method)
        assert r.extra["sdpa_backends"] == ["math"]
        r = estimate_shape(p.replace(precision="bf16-amp"), (b, t), False, method)
        assert r.extra["sdpa_backends"] == ["flash"]


def _texts(tmp_path, name: str, words: int, n: int = 12) -> str:
    import json

    path = tmp_path / name
    path.write_text("".join(json.dumps({"text": " ".join(["memory"] * words)}) + "\n"
                            for _ in range(n)), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("method", ["analytic", "traced"])
def test_fixed_padding_of_full_texts_is_estimated_without_a_mask(tmp_path, method):
    # Fixed padding used to be estimated as padded whatever the data. Texts that all reach seq
    # give an all-ones mask, which transformers drops; for fp32 grouped-query attention it then
    # passes enable_gqa and CUDA runs the math kernel (the H200 matrix's fp32 Qwen/Llama/SmolLM
    # rows on long texts were 8-15% low). Short texts keep the mask: repeat_kv + efficient.
    from engine.estimate import batch_candidates

    base = Profile(model="tiny-llama", batch=4, seq=256, precision="fp32", padding="fixed")
    full = base.replace(dataset=_texts(tmp_path, "long.jsonl", 600))
    short = base.replace(dataset=_texts(tmp_path, "short.jsonl", 20))
    assert batch_candidates(full)[0] == [((4, 256), False)]
    assert batch_candidates(short)[0] == [((4, 256), True)]
    r_full, r_short = estimate(full, method), estimate(short, method)
    assert not r_full.extra["padded"] and r_short.extra["padded"]
    assert r_full.peak_allocated_bytes == estimate_shape(base, (4, 256), False, method).peak_allocated_bytes
    assert r_short.peak_allocated_bytes == estimate_shape(base, (4, 256), True, method).peak_allocated_bytes
    assert r_full.peak_allocated_bytes > r_short.peak_allocated_bytes  # T x T fp32 probabilities
    if method == "traced":
        assert r_full.extra["sdpa_backends"] == ["math"]
        assert r_short.extra["sdpa_backends"] == ["efficient"]


def test_a_shape_seen_padded_and_full_keeps_both(tmp_path):
    import json

    from engine.estimate import batch_candidates

    path = tmp_path / "mixed.jsonl"  # batch 2 in seeded order: some batches all long, some not
    path.write_text("".join(json.dumps({"text": " ".join(["memory"] * w)}) + "\n"
                            for w in [600] * 8 + [10] * 8), encoding="utf-8")
    p = Profile(model="tiny-llama", batch=2, seq=128, precision="fp32", dataset=str(path))
    for padding in ("fixed", "dynamic"):
        shapes, _note = batch_candidates(p.replace(padding=padding))
        assert ((2, 128), True) in shapes and ((2, 128), False) in shapes, shapes
    r = estimate(p, "analytic")  # the larger of the two: no mask (math, T x T) for fp32 GQA
    assert r.extra["padded"] is False


def test_traced_local_attention_takes_the_cuda_path():
    # On CUDA local:W runs FlexAttention (measured: as much as dense flash attention); the traced
    # estimate used to run the blocked CPU fallback there (+18% at gpt2 8x1024).
    base = Profile(model="tiny-gpt2", batch=4, seq=1024, precision="bf16-amp")
    dense = estimate(base, "traced").peak_allocated_bytes
    local = estimate(base.replace(attn="local:128"), "traced").peak_allocated_bytes
    assert abs(local - dense) / dense < 0.03, (local, dense)
    cpu = base.replace(target="cpu")
    assert estimate(cpu.replace(attn="local:128"), "traced").peak_allocated_bytes != \
        estimate(cpu, "traced").peak_allocated_bytes  # CPU keeps the blocked implementation


def test_analytic_distillation_close_to_traced():
    # Teacher weights in bf16 on CUDA for bf16-amp (distillation.teacher_dtype) and every N x V
    # tensor of distillation_loss (the analytic was 10% low on gpt2 <- gpt2-medium).
    p = Profile(model="tiny-gpt2", batch=4, seq=256, precision="bf16-amp", distill_from="tiny-gpt2")
    a = estimate(p, "analytic").peak_allocated_bytes
    t = estimate(p, "traced").peak_allocated_bytes
    assert abs(a - t) / t < 0.10, (a, t)
    a_plain = estimate(p.replace(distill_from=""), "analytic")
    a_dist = estimate(p, "analytic")
    teacher_bytes = a_dist.breakdown["weights"] - a_plain.breakdown["weights"]
    assert teacher_bytes <= a_plain.breakdown["weights"] * 0.6  # bf16 teacher: half the fp32 bytes


def test_analytic_unstructured_pruning_saves_and_costs_nothing():
    # pruning.apply makes it permanent (prune.remove): no weight_orig or mask stays.
    p = Profile(model="tiny-gpt2", batch=2, seq=64, precision="bf16-amp")
    assert estimate(p.replace(prune="unstructured:0.5"), "analytic").peak_allocated_bytes == \
        estimate(p, "analytic").peak_allocated_bytes


def test_device_used_context_by_mode_and_precision():
    from engine.estimate import device

    MiB_ = 1 << 20
    assert device.context_bytes("cuda", False, False, "h100") == 687 * MiB_
    assert device.context_bytes("cuda", False, True, "h100") == 695 * MiB_
    assert device.context_bytes("cuda", True, False, "h100") == 751 * MiB_
    assert device.context_bytes("cuda", True, True, "h100") == 767 * MiB_
    assert device.context_bytes("cpu", True, True) == 0
    r = estimate(Profile(model="tiny-gpt2", batch=2, seq=32, precision="bf16-amp"), "analytic")
    assert r.device_used_bytes - r.peak_reserved_bytes == device.context_bytes("cuda", True, True)


# ----- reserved over the plan's batch shapes (fragmentation.py) ------------------------------
def _varied_dataset(tmp_path) -> str:
    import json

    words = "the allocator keeps every segment it has reserved until empty cache".split()
    path = tmp_path / "varied.jsonl"
    with path.open("w") as fh:
        for i in range(48):
            n = 4 + (i * 37) % 70  # 4..73 words: many distinct padded lengths
            fh.write(json.dumps({"text": " ".join(words[j % len(words)] for j in range(n))}) + "\n")
    return str(path)


def _replayed(p, seq):
    from engine.estimate import _traced_reserved, fragmentation

    worst = max(seq, key=lambda s: s[0][0] * s[0][1])
    ev = traced.trace_step(p, worst[0], has_padding=worst[1]).events
    events, _info = fragmentation.sequence_events(p, worst, ev, seq=seq)
    single = _traced_reserved(p, ev)
    return single if events is None else max(single, _traced_reserved(p, events))


def test_plan_replay_more_shapes_never_lowers_reserved():
    p = Profile(model="tiny-gpt2", batch=8, seq=128, precision="bf16-amp", padding="dynamic")
    base = [((2, 96), True), ((4, 96), True)]
    more = base + [((5, 100), True), ((7, 112), True)]
    r1, r2 = _replayed(p, base), _replayed(p, more)
    assert r2 >= r1
    # growing batches: every one is a record, and the replay is above one step at the largest
    single = _replayed(p, [((7, 112), True)])
    assert r2 > single


def test_dynamic_reserved_at_least_fixed_and_deterministic(tmp_path):
    data = _varied_dataset(tmp_path)
    p = Profile(model="tiny-gpt2", batch=8, seq=128, precision="bf16-amp", padding="dynamic",
                dataset=data)
    r = estimate(p, "traced")
    fixed = estimate_shape(p.replace(padding="fixed"), r.peak_batch_shape, True, "traced")
    assert r.peak_allocated_bytes == fixed.peak_allocated_bytes
    assert r.peak_reserved_bytes >= fixed.peak_reserved_bytes
    assert r.extra["distinct_shapes"] > 1 and len(r.extra["replayed"]) > 1
    again = estimate(p, "traced")
    assert again.peak_reserved_bytes == r.peak_reserved_bytes
    assert again.extra.get("replayed") == r.extra.get("replayed")
    a = estimate(p, "analytic")
    assert any("distinct batch shapes" in n for n in a.notes)


def test_traced_estimate_stops_within_the_forward_when_asked():
    """The app cancels a traced estimate on every edit: ``should_stop`` is read before every
    transformer block, not only once a step, and a True answer ends it with Cancelled."""
    p = Profile(model="tiny-gpt2", target="cpu", batch=2, seq=32)
    layers = analytic.arch_of(p).layers
    calls = []
    estimate(p, "traced", should_stop=lambda: calls.append(1) and False)
    # the gate and the shape (2), then per traced step (2): one per micro-batch and one per block
    assert len(calls) >= 2 + 2 * (1 + layers)
    asked = []

    def stop_at_second_block():
        asked.append(1)
        return len(asked) > len(calls) - 2 * layers + 1

    with pytest.raises(Cancelled):
        estimate(p, "traced", should_stop=stop_at_second_block)
    assert len(asked) < len(calls)  # it stopped before the trace's end


# ----- the analytic per-layer model of architectures outside the three templates --------------
def _tiny_config(tmp_path, name: str, **fields) -> str:
    """A folder holding the config.json of a small real architecture (the bench/configs kind)."""
    import json

    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(fields), encoding="utf-8")
    return str(folder)


_TINY_ARCHS = {
    # phi: parallel attention + MLP under one LayerNorm, partial RoPE, gelu_new (was 18% low)
    "phi": dict(model_type="phi", hidden_size=128, intermediate_size=512, num_attention_heads=4,
                num_key_value_heads=4, num_hidden_layers=2, vocab_size=512, hidden_act="gelu_new",
                resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
                rope_parameters={"partial_rotary_factor": 0.5, "rope_theta": 10000.0,
                                 "rope_type": "default"}, max_position_embeddings=512),
    # qwen3: per-head q/k RMSNorm; GQA (repeat_kv's copies are saved, not k and v)
    "qwen3": dict(model_type="qwen3", hidden_size=128, intermediate_size=384, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, num_hidden_layers=2, vocab_size=512,
                  max_position_embeddings=512, tie_word_embeddings=True),
    # gemma3: q/k norms, four norms per block, one kv head
    "gemma3": dict(model_type="gemma3_text", hidden_size=128, intermediate_size=384,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=64, num_hidden_layers=2,
                   vocab_size=512, max_position_embeddings=512, sliding_window=512,
                   layer_types=["sliding_attention", "full_attention"]),
    # modernbert: fused Wqkv kept whole, GLU MLP with Wi = 2 x intermediate (was 13-17% low)
    "modernbert": dict(model_type="modernbert", hidden_size=128, intermediate_size=192,
                       num_attention_heads=2, num_hidden_layers=3, vocab_size=512,
                       max_position_embeddings=512, global_attn_every_n_layers=3,
                       local_attention=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       cls_token_id=1, sep_token_id=2),
    # opt: ReLU saves one tensor; project_in/out around 64-wide embeddings (was 9-13% high)
    "opt": dict(model_type="opt", hidden_size=128, ffn_dim=512, num_attention_heads=4,
                num_hidden_layers=2, vocab_size=512, word_embed_proj_dim=64,
                do_layer_norm_before=False, activation_function="relu",
                max_position_embeddings=512, dropout=0.0, attention_dropout=0.0),
}


@pytest.mark.parametrize("arch", sorted(_TINY_ARCHS))
@pytest.mark.parametrize("precision", ["fp32", "bf16-amp"])
def test_analytic_block_activations_match_traced(tmp_path, arch, precision):
    # Each block's bytes saved for backward: the analytic formulas against the traced step (whose
    # per-block bytes under autocast also hold the block's cached bf16 weight copies).
    from engine.estimate import analytic as an

    model = _tiny_config(tmp_path, arch, **_TINY_ARCHS[arch])
    p = Profile(model=model, batch=4, seq=128, precision=precision, optimizer="sgd")
    shape = (4, 128)
    a = estimate_shape(p, shape, True, "analytic")
    t = estimate_shape(p, shape, True, "traced")
    arch_facts = an.arch_of(p)
    copies = [n * 2 for n in arch_facts.layer_params] if precision != "fp32" else \
        [0] * arch_facts.layers
    blocks_a = [x.activation_bytes for x in a.layers[1:1 + arch_facts.layers]]
    blocks_t = [x.activation_bytes - c for x, c in zip(t.layers[1:1 + arch_facts.layers], copies)]
    if precision == "fp32":  # tensor by tensor; under autocast the casts blur it (totals only)
        for i, (x, y) in enumerate(zip(blocks_a, blocks_t)):
            assert abs(x - y) / y < 0.08, (arch, precision, i, x, y)
    assert abs(a.peak_allocated_bytes - t.peak_allocated_bytes) / t.peak_allocated_bytes < 0.08


def test_autocast_copies_are_the_linear_layers_only():
    # autocast casts F.linear's weight and bias; embeddings and norms stay fp32 (bert-base
    # classification inference was 20% high: its 23M-parameter word embedding was counted)
    from engine.estimate import analytic as an

    p = Profile(model="tiny-bert", task="classification", mode="infer", precision="bf16-amp",
                batch=2, seq=32)
    arch = an.arch_of(p)
    import torch

    from engine.models import build_model

    model = build_model(p, "meta")
    linear = sum(q.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)
                 for q in m.parameters(recurse=False))
    embed = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    assert sum(n for n, _ in arch.matmul_tensors) == linear
    assert linear + embed < arch.params + 1 and embed > 0
    a = estimate(p, "analytic").peak_allocated_bytes
    t = estimate(p, "traced").peak_allocated_bytes
    assert abs(a - t) / t < 0.05, (a, t)


def test_head_dim_over_256_repeats_kv_and_skips_flash(tmp_path):
    # transformers passes enable_gqa only for head dims <= 256 (use_gqa_in_sdpa); beyond, it
    # repeats k/v, and flash (head dim <= 256 in sdp_utils.cpp) is out: the efficient kernel runs
    # even in bf16 without a mask. The analytic model follows the same rule.
    cfg = dict(model_type="llama", hidden_size=128, intermediate_size=256, num_attention_heads=2,
               num_key_value_heads=1, head_dim=320, num_hidden_layers=2, vocab_size=512,
               max_position_embeddings=512)
    wide = Profile(model=_tiny_config(tmp_path, "wide", **cfg), batch=2, seq=128,
                   precision="bf16-amp")
    narrow = Profile(model=_tiny_config(tmp_path, "narrow", **dict(cfg, head_dim=64)), batch=2,
                     seq=128, precision="bf16-amp")
    assert estimate_shape(wide, (2, 128), False, "traced").extra["sdpa_backends"] == ["efficient"]
    assert estimate_shape(narrow, (2, 128), False, "traced").extra["sdpa_backends"] == ["flash"]
    for p in (wide, narrow):
        a = estimate_shape(p, (2, 128), False, "analytic")
        t = estimate_shape(p, (2, 128), False, "traced")
        blocks_a = [x.activation_bytes for x in a.layers[1:3]]
        copies = [n * 2 for n in analytic.arch_of(p).layer_params]
        blocks_t = [x.activation_bytes - c for x, c in zip(t.layers[1:3], copies)]
        for x, y in zip(blocks_a, blocks_t):
            assert abs(x - y) / y < 0.10, (p.model, x, y)


@pytest.mark.parametrize("upcast, kept, fwd_peak, bwd_peak", [
    (False, 1.5, 1.5, 2.5),  # F.cross_entropy on half logits (BertForMaskedLM)
    (True, 1.0, 2.0, 3.0),   # logits.float() first (transformers' ForCausalLMLoss)
])
def test_cross_entropy_under_cuda_autocast_matches_the_h200(upcast, kept, fwd_peak, bwd_peak):
    # bench/diag_cross_entropy.py on an H200 (results/verify_h200_2026-12-02/call12), in units of
    # one fp32 (N, V) tensor, beside the logits: bert masked-LM bf16 rows were 4-8% high because
    # the emulation ran the whole cross-entropy in fp32.
    import torch
    import torch.nn.functional as F

    from engine.estimate.cuda_emulation import CudaEmulation
    from engine.measure.probes import LiveBytesTracker

    n, v = 64, 1000
    unit = n * v * 4
    emu = CudaEmulation(autocast_dtype=torch.bfloat16, target="cuda")
    tracker = LiveBytesTracker()
    with torch.device("meta"):
        logits = torch.randn(n, v, dtype=torch.bfloat16, requires_grad=True)
        labels = torch.randint(0, v, (n,))
    with emu, tracker:
        base = tracker.live_bytes
        emu.set_autocast(True)
        x = logits.float() if upcast else logits
        loss = F.cross_entropy(x, labels, ignore_index=-100)
        del x
        emu.set_autocast(False)
        assert (tracker.live_bytes - base) / unit == pytest.approx(kept, abs=0.01)
        assert (tracker.peak_bytes - base) / unit == pytest.approx(fwd_peak, abs=0.01)
        tracker.reset_peak()
        emu.backward(loss)
        assert (tracker.peak_bytes - base) / unit == pytest.approx(bwd_peak, abs=0.01)
        assert logits.grad.dtype == torch.bfloat16


def test_traced_reserved_replays_the_build_as_a_device_makes_it(tmp_path):
    # build_model makes the weights in the config's dtype on the device, then converts them one
    # by one, and a tied LM head's own weight is made, then dropped by tie_weights; those blocks
    # stay cached (on an H200: Llama-3.2-1B fp32 inference 10% low without the first copies,
    # Gemma-3-like bf16-amp keeps a 640 MiB segment for its dropped head)
    import dataclasses

    from engine.estimate import _device_events

    # a 32 MiB fp32 embedding: its 16 MiB bf16 first copy and the head's 16 MiB bf16 weight
    cfg = dict(model_type="llama", hidden_size=256, intermediate_size=512, num_attention_heads=2,
               num_key_value_heads=1, num_hidden_layers=2, vocab_size=32768,
               max_position_embeddings=512, dtype="bfloat16", tie_word_embeddings=True)
    p = Profile(model=_tiny_config(tmp_path, "bf16cfg", **cfg), mode="infer", batch=1, seq=16,
                target="cuda", gpu="h200", precision="fp32")
    o = traced.trace_step(p, (1, 16), has_padding=False)
    head = 32768 * 256 * 2
    build = list(o.build_events)
    transient = [(u, d) for u, d in build if isinstance(u, tuple)]
    # the bf16 head weight (made, then freed at tying) and the embedding's bf16 first copy
    assert sum(1 for _u, d in transient if d == head) == 2
    made = {u for u, d in transient if d > 0}
    assert made == {u for u, d in transient if d < 0}  # every transient is freed
    kept = [(u, d) for u, d in build if not isinstance(u, tuple)]
    # the survivors, under the trace's ids, in the order they were made
    assert sorted(kept) == sorted((u, n) for u, n, _ in o.weights)
    ev = _device_events(p, o, 0)
    assert ev == build + list(o.events[len(o.weights):])
    # the cached copies count: reserved covers the weights and the two 16 MiB bf16 blocks
    assert allocator.simulate(build).peak_reserved >= sum(n for _u, n, _ in o.weights) + 2 * head
    # weights already in the config's dtype: the head's transient only; a CPU target: nothing
    same = dataclasses.replace(p, precision="bf16")
    o16 = traced.trace_step(same, (1, 16), has_padding=False)
    assert [d for u, d in o16.build_events if isinstance(u, tuple) and abs(d) >= 1 << 20] \
        == [head, -head]
    cpu = dataclasses.replace(p, target="cpu", gpu="")
    oc = traced.trace_step(cpu, (1, 16), has_padding=False)
    assert _device_events(cpu, oc, 0) == list(oc.events)


def test_cublas_workspaces_come_at_the_first_gemm_of_forward_and_backward():
    # on an H200 each cuBLAS workspace is allocated just after the first GEMM's output of the
    # forward (main thread) and of the backward (autograd's thread); placed first instead, the
    # backward's was not in the freed 4 GiB logits block where the real one lands, and Gemma-3-
    # like bf16-amp reserved read 16.5% low (results/verify_h200_2026-12-02/call13)
    from engine.estimate import _device_events

    p = Profile(model="tiny-gpt2", batch=2, seq=32, target="cuda", gpu="h200",
                precision="bf16-amp")
    o = traced.trace_step(p, (2, 32), has_padding=False)
    assert len(o.workspace_at) == 2
    fwd, bwd = o.workspace_at
    assert len(o.weights) < fwd < bwd < len(o.events)
    ev = _device_events(p, o, 64 << 20)
    shift = len(o.build_events) - len(o.weights)
    assert ev[fwd + shift] == ("__ws0__", 32 << 20)
    assert ev[bwd + shift + 1] == ("__ws1__", 32 << 20)
    assert [e for e in ev if isinstance(e[0], str)] == [("__ws0__", 32 << 20), ("__ws1__", 32 << 20)]
    infer = Profile(model="tiny-gpt2", mode="infer", batch=2, seq=32, target="cuda", gpu="h200")
    oi = traced.trace_step(infer, (2, 32), has_padding=False)
    assert len(oi.workspace_at) == 1
    assert sum(1 for u, _d in _device_events(infer, oi, 32 << 20) if isinstance(u, str)) == 1


@pytest.mark.parametrize("trace", ["call13/qwen_bf16", "call13/gemma_bf16",
                                   "call15/qwen_lora_fp32", "call15/llama_sgd_fp32"])
def test_allocator_replays_real_h200_traces_to_their_measured_reserved(trace):
    # allocator traces of real runs (torch.cuda.memory._record_memory_history on an H200): the
    # simulator, given their allocations and frees only, reaches the measured max reserved
    # (exactly, or gemma's 10 MiB of small segments). New segments go below older ones (cudaMalloc's addresses mostly go down), which
    # decides best fit's ties; with increasing addresses qwen_bf16 read 9% low, qwen_lora +10.5%.
    import gzip
    import json
    from pathlib import Path

    base = Path(__file__).resolve().parent.parent / "bench/results/verify_h200_2026-12-02"
    with gzip.open(base / f"{trace}_events.json.gz", "rt", encoding="utf-8") as fh:
        raw = json.load(fh)
    measured = json.loads((base / f"{trace}.json").read_text())["peak_reserved_bytes"]
    events = [(addr, size if act == "alloc" else -1) for act, addr, size in raw
              if act in ("alloc", "free_completed")]
    assert allocator.simulate(events).peak_reserved == pytest.approx(measured, rel=1e-3)


def test_safe_softmax_makes_its_masks_as_on_cuda():
    # SDPA's math path calls _safe_softmax, one op on meta; on CUDA its composite also makes a
    # bool eq(-inf) mask of the input's shape (and the rows' all), freed on return: on an H200,
    # Qwen2.5-0.5B LoRA fp32 reserved read +10.6% without those blocks, -0.0% with them
    from engine.estimate.traced import _Tracker

    x = torch.empty((2, 4, 64, 64), device="meta")
    tracker = _Tracker(cuda=True, block_bytes=512, record=True)
    with tracker:
        out = torch.ops.aten._safe_softmax(x, -1)
    sizes = [d for _u, d in tracker.events]
    assert sizes[0] == out.numel() * 4
    assert sizes[1:] == [x.numel(), 512, -512, -x.numel()]
    cpu = _Tracker(cuda=False, record=True)  # a CPU target: the op alone
    with cpu:
        kept = torch.ops.aten._safe_softmax(x, -1)
    assert [d for _u, d in cpu.events] == [kept.numel() * 4]


def test_analytic_stream_frees_all_but_the_persistent_tensors():
    # the replayed stream is balanced: after two steps only the weights, the optimizer's states
    # and the cuBLAS workspaces are alive; the tied head's build copy and every activation,
    # gradient and temporary are freed
    from engine.estimate import analytic_stream as S

    z = S.StreamSizes(weights=[4 << 20, 64 << 20], build_dropped=[64 << 20], inputs=[4096] * 3,
                      workspace=32 << 20, workspaces=2, layers=3, saved=[8 << 20, 2 << 20],
                      layer_in=1 << 20, checkpointed=[True, False, False],
                      fwd_transient=[16 << 20], bwd_transient=[24 << 20], embed_saved=[4096],
                      head_saved=[1 << 20], loss_fwd=[100 << 20, 200 << 20, 200 << 20],
                      loss_bwd=[200 << 20] * 3, layer_grads=[[4 << 20]] * 3, embed_grads=[64 << 20],
                      head_grads=[], states=[64 << 20] * 2, opt_temp=[64 << 20])
    events = S.training_events(z)
    alive = {}
    for u, d in events:
        if d > 0:
            assert u not in alive
            alive[u] = d
        else:
            del alive[u]
    assert sorted(alive.values()) == sorted(z.weights + z.states + [z.workspace] * 2)
    assert S.coalesce([1000, 2000, 3 << 20, 4 << 20, 5 << 20, 64 << 20, 500]) == \
        [3000, 7 << 20, 5 << 20, 64 << 20, 500]


@pytest.mark.parametrize("label, precision, optimizer, ckpt, shape, data, sign", [
    # the H200's held-out rows (bench/results/verify_h200_2026-12-02), with the side on which the
    # closed form (no order) misses them: -18%, +18% and -9% when the replay came in
    ("gemma-3-270m-like", "bf16", "adamw", False, (8, 512), "long", -1),
    ("Llama-3.2-1B", "fp32", "sgd", False, (4, 512), "long", +1),
    ("Qwen2.5-0.5B", "bf16-amp", "adamw", True, (8, 1024), "long", -1),
])
def test_analytic_reserved_replays_the_step_order_like_the_h200(label, precision, optimizer, ckpt,
                                                                shape, data, sign, tmp_path):
    # reserved from the analytic sizes in the protocol's order (analytic_stream): Gemma-3's
    # backward workspace in a freed 262k-vocabulary logits block costs step 2 a new one; SGD's
    # gradients reuse the activations' blocks; the closed form saw neither
    import json
    import sys
    from pathlib import Path

    from engine.estimate import analytic

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "bench"))
    from gpu_estimator_matrix import long_texts, model_arg

    rows = []
    for name in ("heldout2_72rows.jsonl", "call9/estimator_matrix_80rows.jsonl"):
        for line in (root / "bench/results/verify_h200_2026-12-02" / name).read_text().splitlines():
            r = json.loads(line)
            if (r["label"], r["precision"], r["optimizer"], r["checkpointing"], r["batch"], r["seq"],
                    r["data"], r.get("lora", 0)) == (label, precision, optimizer, ckpt, *shape, data, 0):
                rows.append(r)
    row = rows[0]
    long_path = tmp_path / "long.jsonl"
    long_texts(long_path)
    profile = Profile(model=model_arg(row["model"]), precision=precision, optimizer=optimizer,
                      checkpointing=ckpt, batch=shape[0], seq=shape[1], padding="fixed",
                      target="cuda", gpu="h200", dataset=str(long_path))
    err = {m: analytic.estimate_shape(profile, shape, False, reserved_model=m).peak_reserved
           / row["peak_reserved_bytes"] - 1 for m in ("stream", "sizes")}
    assert err["sizes"] * sign > 0.07
    assert abs(err["stream"]) < 0.04
