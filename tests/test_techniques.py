"""Model-side techniques on small real models: they change what they claim, and nothing else.

Peaks are live tensor bytes counted by ``engine.measure.probes.LiveBytesTracker`` (the same
counter a measured CPU run uses).
"""

from __future__ import annotations

import pytest
import torch

from engine.errors import BadInput
from engine.measure.probes import LiveBytesTracker
from engine.models import build_model, count_parameters
from engine.profile import Profile
from engine.techniques import apply_model_techniques
from engine.techniques import distillation, ffn_chunking, local_attention, memory_pool
from engine.prepare import prepare
from engine.techniques import explanations


def check_compatible(profile):
    return list(prepare(profile).notes)

FAMILIES = ("tiny-gpt2", "tiny-llama", "tiny-bert")


def _peak(fn) -> int:
    """Peak of live tensor bytes created while ``fn`` runs (pre-existing tensors excluded)."""
    tracker = LiveBytesTracker("cpu")
    with tracker:
        base = tracker.live_bytes
        tracker.reset_peak()
        fn()
    return tracker.peak_bytes - base


def _build(model: str, seed: int = 0, **fields):
    torch.manual_seed(seed)
    return build_model(Profile(model=model, target="cpu", **fields), "cpu")


def _train_step(model, batch: int = 2, seq: int = 64):
    ids = torch.randint(0, 8000, (batch, seq), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach()


# ----- structured pruning -------------------------------------------------------------------
@pytest.mark.parametrize("model_name", FAMILIES)
@pytest.mark.parametrize("kind", ["heads", "ffn"])
def test_structured_pruning_removes_parameters_and_lowers_peak(model_name, kind):
    base = _build(model_name)
    pruned = _build(model_name, prune=f"{kind}:0.5")
    assert count_parameters(pruned) < count_parameters(base)
    # the meta build (what estimators see) has the same shapes as the real one
    meta = build_model(Profile(model=model_name, prune=f"{kind}:0.5"), "meta")
    assert count_parameters(meta) == count_parameters(pruned)
    peak_base = _peak(lambda: _train_step(base))
    peak_pruned = _peak(lambda: _train_step(pruned))
    assert peak_pruned < peak_base
    assert all(p.grad is not None for p in pruned.parameters() if p.requires_grad)


def test_head_pruning_removes_whole_gqa_groups():
    model = _build("tiny-llama", prune="heads:0.5")  # 4 query heads in 2 key/value groups
    attn = model.model.layers[0].self_attn
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 1
    assert attn.q_proj.out_features == 2 * 16 and attn.k_proj.out_features == 16
    assert attn.o_proj.in_features == 2 * 16 and attn.num_key_value_groups == 2
    _train_step(model)


def test_head_pruning_keeps_the_strongest_heads():
    model = _build("tiny-gpt2")
    attn = model.transformer.h[0].attn
    with torch.no_grad():  # make head 2 the one with the largest weights
        attn.c_attn.weight[:, 2 * 16:3 * 16] *= 10
    from engine.techniques import pruning

    pruning.prune_heads(model, 0.75)
    assert attn.c_attn.weight.shape == (64, 3 * 16) and attn.c_proj.weight.shape == (16, 64)
    assert attn.c_attn.weight[:, :16].abs().mean() > 0.1  # the scaled head survived
    _train_step(model)


def test_unstructured_pruning_zeros_but_keeps_dense_bytes():
    base = _build("tiny-gpt2")
    pruned = _build("tiny-gpt2", prune="unstructured:0.5")
    nbytes = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    assert nbytes(pruned) == nbytes(base)
    weights = [m.weight for m in pruned.transformer.h.modules() if type(m).__name__ == "Conv1D"]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert abs(zeros - 0.5) < 0.01
    notes = apply_model_techniques(_build("tiny-gpt2"), Profile(model="tiny-gpt2",
                                                                prune="unstructured:0.3"))
    assert any("saves no dense memory" in n for n in notes)


# ----- local attention ----------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
def test_blocked_local_attention_equals_dense_band(causal):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 150, 16, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 150, 16, generator=g, requires_grad=True)  # grouped-query: 2 kv heads
    v = torch.randn(2, 2, 150, 16, generator=g, requires_grad=True)
    keep = torch.ones(2, 150, dtype=torch.bool)
    keep[1, -20:] = False  # padding in the second sequence
    out = local_attention.blocked_local_attention(q, k, v, 24, causal, attention_mask=keep)
    ref = local_attention.dense_masked_attention(q, k, v, 24, causal, attention_mask=keep)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("t, window, causal", [(40, 1000, False), (40, 1000, True), (64, 16, True),
                                                (150, 24, False)])
def test_blocked_local_attention_reads_no_stale_memory(t, window, causal):
    """Freed memory filled with NaN first: a kernel of the blocked path that read a buffer it did
    not write (pads, overlapping windows) would show here as NaN or a wrong output."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, t, 8, generator=g) for _ in range(3))
    keep = torch.ones(2, t, dtype=torch.bool)
    keep[1, -6:] = False
    ref = local_attention.dense_masked_attention(q, k, v, window, causal, attention_mask=keep)
    for _ in range(3):
        for n in (10**5, 10**6, 10**7):
            stale = torch.full((n,), float("nan"))
            del stale
        out = local_attention.blocked_local_attention(q, k, v, window, causal, attention_mask=keep)
        torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out[1, :, :t - 6], ref[1, :, :t - 6], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_name", FAMILIES)
def test_local_attention_in_models(model_name):
    ids = torch.randint(0, 8000, (2, 40), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, -6:] = 0
    dense = _build(model_name).eval()
    wide = _build(model_name, attn="local:1000").eval()  # window wider than the input: = dense
    narrow = _build(model_name, attn="local:4").eval()
    assert wide.config._attn_implementation == "headroom_local"
    with torch.no_grad():
        ref = dense(input_ids=ids, attention_mask=mask).logits
        got = wide(input_ids=ids, attention_mask=mask).logits
        other = narrow(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0], ref[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1, :34], ref[1, :34], atol=1e-4, rtol=1e-4)
    assert (other[0] - ref[0]).abs().max() > 1e-3  # the window really cuts context
    narrow.train()
    _train_step(narrow)
    build_model(Profile(model=model_name, attn="local:4"), "meta")


def test_cuda_emulation_switches_only_the_traced_model():
    """A traced CUDA estimate (an app estimate in a background thread) sends only its own model's
    local attention to the FlexAttention emulation: another model's real attention, computed
    meanwhile, is unchanged, and nothing stays switched afterwards. (It used to swap the module's
    ``local_attention`` for every thread: real models then got ``torch.empty`` outputs.)"""
    from engine.estimate.cuda_emulation import EMULATED_LOCAL, cuda_local_attention

    original = local_attention.local_attention
    ids = torch.randint(0, 8000, (2, 24), generator=torch.Generator().manual_seed(4))
    traced = _build("tiny-llama", attn="local:8")
    other = _build("tiny-llama", attn="local:8").eval()
    with torch.no_grad():
        ref = other(input_ids=ids).logits
    first, second = cuda_local_attention(traced), cuda_local_attention(traced)
    first.__enter__()
    assert traced.config._attn_implementation == EMULATED_LOCAL
    assert other.config._attn_implementation == "headroom_local"
    with torch.no_grad():
        torch.testing.assert_close(other(input_ids=ids).logits, ref, atol=0, rtol=0)
    second.__enter__()  # interleaved: entered again, left in the other order
    first.__exit__(None, None, None)
    second.__exit__(None, None, None)
    assert traced.config._attn_implementation == "headroom_local"
    assert local_attention.local_attention is original


def test_local_attention_peak_grows_linearly():
    def peak_of(impl, t):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 4, t, 32, generator=g, requires_grad=True) for _ in range(3))
        return _peak(lambda: impl(q, k, v, 64, True).sum().backward())

    local = [peak_of(local_attention.blocked_local_attention, t) for t in (512, 1024, 2048)]
    dense = [peak_of(local_attention.dense_masked_attention, t) for t in (512, 1024, 2048)]
    for small, big in zip(local, local[1:]):
        assert 1.8 < big / small < 2.3
    assert dense[2] / dense[1] > 3.5
    assert local[2] < dense[2] / 2


# ----- GeGLU --------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", FAMILIES)
def test_geglu_matches_parameter_count_and_trains(model_name):
    base = _build(model_name)
    geglu = _build(model_name, mlp="geglu")
    assert abs(count_parameters(geglu) / count_parameters(base) - 1) < 0.02
    if model_name == "tiny-llama":
        assert isinstance(geglu.model.layers[0].mlp.act_fn, torch.nn.GELU)
    else:
        assert any(type(m).__name__ == "GatedProjection" for m in geglu.modules())
        for layers_name in ("ffn", "heads"):  # pruning composes after GeGLU
            pruned = _build(model_name, mlp="geglu", prune=f"{layers_name}:0.5")
            assert count_parameters(pruned) < count_parameters(geglu)
            _train_step(pruned)
    loss = _train_step(geglu)
    assert torch.isfinite(loss)


# ----- feed-forward chunking ----------------------------------------------------------------
@pytest.mark.parametrize("model_name,seq", [("tiny-llama", 2048), ("tiny-gpt2", 1024),
                                            ("tiny-bert", 512)])
def test_ffn_chunking_same_output_lower_inference_peak(model_name, seq):
    plain = _build(model_name, mode="infer").eval()
    chunked = _build(model_name, mode="infer", ffn_chunks=4).eval()
    ids = torch.randint(0, 8000, (2, seq), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = plain.base_model(input_ids=ids).last_hidden_state
        b = chunked.base_model(input_ids=ids).last_hidden_state
        torch.testing.assert_close(a, b)
        peak_plain = _peak(lambda: plain.base_model(input_ids=ids))
        peak_chunked = _peak(lambda: chunked.base_model(input_ids=ids))
    assert peak_chunked < 0.85 * peak_plain
    assert set(dict(plain.named_parameters())) == set(dict(chunked.named_parameters()))
    import copy

    clone = copy.deepcopy(chunked)  # the wrappers rebind to the copy's own modules
    wrapped = [m for m in clone.modules() if hasattr(m, "_headroom_chunk_attr")]
    assert wrapped and all(getattr(m, m._headroom_chunk_attr).__self__ is m for m in wrapped)


def test_ffn_chunking_trains_and_says_it_saves_little():
    model = _build("tiny-bert", ffn_chunks=3)
    _train_step(model)
    note = ffn_chunking.apply(_build("tiny-gpt2"), Profile(model="tiny-gpt2", ffn_chunks=2))
    assert "saves little" in note


# ----- distillation -------------------------------------------------------------------------
def test_distillation_trains_student_and_freezes_teacher():
    profile = Profile(model="tiny-gpt2", distill_from="tiny-llama", target="cpu")
    student = _build("tiny-gpt2")
    teacher = distillation.build_teacher(profile, "cpu")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    ids = torch.randint(0, 8000, (4, 32), generator=torch.Generator().manual_seed(4))
    losses = []
    for _ in range(5):
        with torch.no_grad():
            t_logits = teacher(input_ids=ids).logits
        loss = distillation.distillation_loss(student(input_ids=ids).logits, t_logits, ids, profile)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    assert distillation.apply(student, profile) is None
    # the traced estimator's call form: (s, t, labels, student's own loss, profile)
    out = student(input_ids=ids, labels=ids)
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits
    loss = distillation.distillation_loss(out.logits, t_logits, ids, out.loss, profile)
    assert torch.isfinite(loss) and loss.requires_grad


def test_distillation_rules():
    p = Profile(model="tiny-gpt2", distill_from="gpt2", precision="bf16-amp")
    assert distillation.teacher_dtype(p, "cuda") == torch.bfloat16
    assert distillation.teacher_dtype(p.replace(precision="fp32"), "cuda") == torch.float32
    assert distillation.teacher_dtype(p, "cpu") == torch.float32
    assert distillation.check_vocab(50257, 50304) == 50257  # padding rows only
    with pytest.raises(BadInput):
        distillation.check_vocab(8192, 50257)
    with pytest.raises(BadInput):
        check_compatible(p)  # tiny-gpt2 (8192 tokens) cannot learn from gpt2 (50257)
    s = torch.randn(2, 5, 10)
    assert float(distillation.distillation_loss(s, s.clone())) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("student", ["tiny-gpt2", "tiny-llama"])
def test_teacher_precision_builds_the_teacher_in_that_dtype(student):
    base = Profile(model=student, distill_from="tiny-gpt2", target="cpu", precision="bf16-amp")
    assert distillation.teacher_dtype(base, "cpu") == torch.float32  # auto on CPU: the student's
    ids = torch.randint(0, 8000, (2, 16), generator=torch.Generator().manual_seed(1))
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        p = base.replace(teacher_precision=name)
        assert distillation.teacher_dtype(p, "cuda") == dtype == distillation.teacher_dtype(p, "cpu")
        teacher = distillation.build_teacher(p, "cpu")
        assert {t.dtype for t in teacher.parameters()} == {dtype}
        assert not any(t.requires_grad for t in teacher.parameters())
        if name != "fp32":
            with torch.no_grad():
                logits = teacher(input_ids=ids).logits
            assert logits.dtype == dtype and torch.isfinite(logits.float()).all()
    # auto keeps today's rule: on CUDA the student's half dtype
    assert distillation.teacher_dtype(base, "cuda") == torch.bfloat16


# ----- memory pooling, explanations, composition --------------------------------------------
def test_max_split_size_in_the_allocator_conf(monkeypatch):
    from engine.measure import runner

    p = Profile(model="tiny-gpt2", alloc_max_split="512MiB")
    assert memory_pool.applies(p)
    assert memory_pool.alloc_conf(p) == "max_split_size_mb:512"
    both = p.replace(alloc="expandable")
    assert memory_pool.alloc_conf(both) == "expandable_segments:True,max_split_size_mb:512"
    assert memory_pool.alloc_conf(p.replace(alloc="pool:256MiB")) == "max_split_size_mb:512"
    user = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64,garbage_collection_threshold:0.6"}
    env = memory_pool.child_env(both, user)
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == ("garbage_collection_threshold:0.6,"
                                             "expandable_segments:True,max_split_size_mb:512")
    # measure sets it before CUDA starts, keeping the user's other keys
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:64,roundup_power2_divisions:4")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    notes: list[str] = []
    runner.configure_process(p, notes)
    import os

    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "roundup_power2_divisions:4,max_split_size_mb:512"
    assert notes == ["PYTORCH_CUDA_ALLOC_CONF=roundup_power2_divisions:4,max_split_size_mb:512"]
    notes = []
    runner.configure_process(p.replace(target="cpu"), notes)
    assert notes == ["allocator settings apply to CUDA only; ignored on CPU"]
    assert any("never splits it" in n for n in check_compatible(p.replace(alloc="pool:1GiB")))


def test_memory_pool_settings():
    p = Profile(model="tiny-gpt2")
    assert memory_pool.alloc_conf(p) is None
    assert memory_pool.alloc_conf(p.replace(alloc="expandable")) == "expandable_segments:True"
    assert memory_pool.alloc_conf(p.replace(alloc="pool:1GiB")) is None
    env = memory_pool.child_env(p.replace(alloc="expandable"), {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64"})
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:64,expandable_segments:True"
    assert memory_pool.prereserve(p.replace(alloc="pool:1MiB"), "cpu") == ""
    assert memory_pool.fragmentation(100, 75) == pytest.approx(0.25)
    assert memory_pool.fragmentation(0, 0) == 0.0


def test_explanations_and_compatibility():
    texts = explanations()
    for name in ("checkpointing", "pruning", "local_attention", "geglu", "ffn_chunking",
                 "distillation", "memory_pool", "amp", "dynamic_padding", "micro_batching",
                 "chunked_input"):
        assert len(texts[name]) > 150, name
    notes = check_compatible(Profile(model="tiny-llama", prune="unstructured:0.5",
                                     attn="local:2048", seq=512))
    assert any("no memory saved" in n for n in notes) and any("whole sequence" in n for n in notes)
    with pytest.raises(BadInput):
        check_compatible(Profile(model="tiny-llama", ffn_chunks=8, seq=4))


def test_all_model_techniques_compose():
    profile = Profile(model="tiny-llama", target="cpu", mlp="geglu", prune="heads:0.5",
                      ffn_chunks=2, attn="local:16", checkpointing=True)
    assert check_compatible(profile) == []
    model = build_model(profile, "cpu")
    meta = build_model(profile, "meta")
    assert count_parameters(meta) == count_parameters(model)
    loss = _train_step(model)
    assert torch.isfinite(loss)
