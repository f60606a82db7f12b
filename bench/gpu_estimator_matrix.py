"""The estimator matrix: `headroom measure` over 11 architectures x 6 settings plus the fp32
grouped-query rows (SGD padded, LoRA on full masks), one process per row: 74 rows.

Rows are what the estimators are scored against (bench/score_estimator_matrix.py compares them with
both estimates on any machine, no GPU needed). Architectures: the bert-base, gpt2, Qwen2.5-0.5B and
Llama-3.2-1B presets, plus configs written for this matrix under bench/configs/ (OPT-350m-like with
projected embeddings, Pythia-410m-like GPT-NeoX, Phi-1.5-like, Qwen3-0.6B-like, Gemma-3-270m-like
with sliding layers and a 262k vocabulary, ModernBERT-base-like with local layers, SmolLM-360m-like
Llama), bert-base as a sequence classifier. Settings per architecture (SETTINGS below): fp32 and
bf16-amp training with AdamW, bf16-amp with checkpointing at seq 1024, fp32 SGD on full masks (the
peak in backward, where optimizer state is small), bf16-amp and fp32 inference. The grouped-query
models (GQA_MODELS) add fp32 SGD on the padded corpus and (LORA_MODELS) fp32 LoRA r=16 on full
masks, run first: the SDPA kernel differs between the two (issue 15). 74 rows took ~7.5 minutes
at -j 4 by the H200 timing of 2026-12-01 (61 rows in 347 s).

Data: rows alternate between generated long texts (every batch full, an all-ones mask: the same
texts on every machine, from a fixed seed) and the built-in corpus with fixed padding (real masks).

Several rows run at once (-j): max_memory_allocated/reserved are per process, so peaks are clean;
device-used and tokens/s of a parallel sweep are not comparable and are not scored. Run solo
(-j 1) for those.

    PYTHONPATH=. python3 bench/gpu_estimator_matrix.py --out $OUT/matrix.jsonl -j 4   # ~7.5 min
    .venv/bin/python bench/gpu_estimator_matrix.py --target cpu --smoke --out /tmp/m.jsonl   # local check
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_measure_matrix import KEEP, last_json, last_line, long_texts, recorder, run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = Path(__file__).resolve().parent / "configs"

#: (label, model, task): presets by name, bench/configs/<name> as folders.
MODELS = (
    ("bert-base-cls", "bert-base-uncased", "classification"),
    # The H100's masked-LM rows were 4-8% high under bf16 autocast (issue 15); the classifier rows
    # on the H200 were not, so the masked-LM head runs too.
    ("bert-base-mlm", "bert-base-uncased", "auto"),
    ("gpt2", "gpt2", "auto"),
    ("Qwen2.5-0.5B", "Qwen2.5-0.5B", "auto"),
    ("Llama-3.2-1B", "Llama-3.2-1B", "auto"),
    ("opt-350m-like", "configs/opt-350m-like", "auto"),
    ("pythia-410m-like", "configs/pythia-410m-like", "auto"),
    ("phi-1_5-like", "configs/phi-1_5-like", "auto"),
    ("qwen3-0_6b-like", "configs/qwen3-0_6b-like", "auto"),
    ("gemma-3-270m-like", "configs/gemma-3-270m-like", "auto"),
    ("modernbert-base-like", "configs/modernbert-base-like", "auto"),
    ("smollm-360m-like", "configs/smollm-360m-like", "auto"),
)
#: (mode, precision, checkpointing, optimizer, batch, seq, data)
SETTINGS = (
    ("train", "fp32", False, "adamw", 4, 512, "long"),
    ("train", "bf16-amp", False, "adamw", 8, 512, "builtin"),
    ("train", "bf16-amp", True, "adamw", 8, 1024, "long"),
    ("train", "fp32", False, "sgd", 4, 512, "long"),  # full masks: fp32 GQA runs SDPA math
    ("infer", "bf16-amp", False, "adamw", 16, 512, "long"),
    ("infer", "fp32", False, "adamw", 8, 1024, "builtin"),
)
#: Grouped-query models: fp32 with the peak in backward (SGD, LoRA) on full masks, where
#: transformers passes enable_gqa and CUDA's SDPA falls back to math (T x T probabilities), beside
#: SGD on the padded corpus (repeat_kv + the efficient kernel). Run first: the issue-15 hole.
GQA_MODELS = ("Qwen2.5-0.5B", "Llama-3.2-1B", "qwen3-0_6b-like", "gemma-3-270m-like",
              "smollm-360m-like")
#: (mode, precision, checkpointing, optimizer, batch, seq, data, LoRA rank)
GQA_SETTINGS = (
    ("train", "fp32", False, "sgd", 4, 512, "builtin", 0),
    ("train", "fp32", False, "adamw", 4, 512, "long", 16),
)
LORA_MODELS = ("Qwen2.5-0.5B", "Llama-3.2-1B", "qwen3-0_6b-like")
#: ``--settings heldout``: shapes, batch sizes, optimizers and data no estimator change was tuned
#: on (2026-12-02, fourth session), every architecture; seq is cut to the model's positions.
HELDOUT_SETTINGS = (
    ("train", "bf16-amp", False, "adamw", 4, 1024, "long"),
    ("train", "fp32", False, "adamw", 8, 256, "builtin"),
    ("train", "bf16-amp", True, "adamw", 16, 512, "builtin"),
    ("train", "bf16-amp", False, "sgd", 16, 256, "long"),
    ("infer", "bf16-amp", False, "adamw", 32, 256, "builtin"),
    ("infer", "fp32", False, "adamw", 4, 1536, "long"),
)
#: ``--settings heldout2``: a second held-out set (2026-12-02, fifth session), run before any
#: estimator change of that session: long sequences, fp32 checkpointing, pure bf16 and fp16
#: autocast, large inference batches. Rows run in a fixed shuffled order so that a call cut short
#: still covers every architecture.
HELDOUT2_SETTINGS = (
    ("train", "bf16-amp", False, "adamw", 2, 2048, "long"),
    ("train", "fp32", True, "adamw", 8, 512, "builtin"),
    ("train", "fp16-amp", False, "sgd", 8, 768, "builtin"),
    ("train", "bf16", False, "adamw", 8, 512, "long"),
    ("infer", "bf16-amp", False, "adamw", 8, 2048, "long"),
    ("infer", "fp32", False, "adamw", 64, 128, "builtin"),
)
SMOKE_MODELS = (("tiny-gpt2", "tiny-gpt2", "auto"), ("tiny-llama", "tiny-llama", "auto"),
                ("tiny-bert-cls", "tiny-bert", "classification"))
ENCODER_MAX_SEQ = 512  # bert-base's positions; longer settings are clamped for it


def model_arg(model: str) -> str:
    return str(CONFIGS.parent / model) if model.startswith("configs/") else model


def _positions(model: str) -> int:
    from engine.models import load_config, max_positions

    try:
        return max_positions(load_config(model_arg(model), False)) or 1 << 30
    except Exception:  # noqa: BLE001 - a smoke model without a config: no limit here
        return 1 << 30


def rows_for(models, smoke: bool, settings: str = "main") -> list[dict]:
    """The hole rows of the grouped-query models first, then every model's SETTINGS (or, for
    ``settings="heldout"``, every model's HELDOUT_SETTINGS only)."""
    def row(label, model, task, mode, precision, ckpt, optimizer, batch, seq, data, lora=0):
        if smoke:
            batch, seq = min(batch, 2), min(seq, 64)
        if model.startswith("bert") and seq > ENCODER_MAX_SEQ:
            seq = ENCODER_MAX_SEQ
        seq = min(seq, _positions(model))
        return {"label": label, "model": model, "task": task, "mode": mode,
                "precision": precision, "checkpointing": ckpt, "optimizer": optimizer,
                "batch": batch, "seq": seq, "data": data, "lora": lora}

    if settings == "heldout":
        return [row(*m, *setting) for m in models for setting in HELDOUT_SETTINGS]
    if settings == "heldout2":
        rows = [row(*m, *setting) for m in models for setting in HELDOUT2_SETTINGS]
        random.Random(2).shuffle(rows)
        return rows
    gqa = [m for m in models if m[0] in GQA_MODELS or (smoke and m[0] == "tiny-llama")]
    rows = [row(*m, *setting) for setting in GQA_SETTINGS for m in gqa
            if setting[-1] == 0 or m[0] in LORA_MODELS or smoke]
    rows += [row(*m, *setting) for m in models for setting in SETTINGS]
    return rows


def row_key(row: dict) -> tuple:
    """What makes two rows the same measurement (not how or when they ran)."""
    return tuple(row.get(k) for k in ("label", "mode", "precision", "checkpointing", "optimizer",
                                      "batch", "seq", "data")) + (row.get("lora", 0),)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def command(row: dict, dataset_long: Path, steps: int, target: str) -> list[str]:
    cmd = [sys.executable, "-m", "engine", "measure", "--model", model_arg(row["model"]),
           "--mode", row["mode"], "--precision", row["precision"], "--optimizer", row["optimizer"],
           "--batch", str(row["batch"]), "--seq", str(row["seq"]), "--steps", str(steps),
           "--target", target, "--padding", "fixed", "--json",
           "--dataset", str(dataset_long) if row["data"] == "long" else "builtin"]
    if row["task"] != "auto":
        cmd += ["--task", row["task"]]
    if row["checkpointing"]:
        cmd.append("--checkpointing")
    if row.get("lora"):
        cmd += ["--lora", str(row["lora"])]
    return cmd


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON lines output file")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("-j", "--jobs", type=int, default=4, help="rows run at once")
    ap.add_argument("--budget-s", type=float, default=430.0, help="start no row after this")
    ap.add_argument("--timeout-s", type=float, default=150.0, help="per row")
    ap.add_argument("--only", default="", help="comma list of model labels")
    ap.add_argument("--skip-done", nargs="*", default=[], metavar="JSONL",
                    help="skip rows that ran (exit 0) in these earlier outputs: finish a matrix")
    ap.add_argument("--target", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny models and shapes (with --target cpu)")
    ap.add_argument("--settings", choices=("main", "heldout", "heldout2"), default="main",
                    help="heldout / heldout2: the HELDOUT_SETTINGS / HELDOUT2_SETTINGS shapes only "
                         "(checks on rows nothing was tuned on)")
    args = ap.parse_args()

    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="headroom-estmatrix-"))
    dataset_long = tmp / "long.jsonl"
    long_texts(dataset_long)
    models = SMOKE_MODELS if args.smoke else MODELS
    if args.only:
        wanted = set(args.only.split(","))
        models = tuple(m for m in models if m[0] in wanted)
    rows = rows_for(models, args.smoke, args.settings)
    done_keys = {row_key(r) for f in args.skip_done for r in read_rows(Path(f)) if r.get("rc") == 0}
    if done_keys:
        before = len(rows)
        rows = [r for r in rows if row_key(r) not in done_keys]
        print(f"{before - len(rows)} rows already ran in {', '.join(args.skip_done)}; {len(rows)} to run")
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done: list[dict] = []
    lock = threading.Lock()
    with out_path.open("w", encoding="utf-8") as fh:
        record = recorder(fh, done, started, lambda r: (
            f"{r['label']:<21} {r['mode']:<5} {r['precision']:<8} ckpt={int(r['checkpointing'])} "
            f"{r['optimizer']:<5} lora={r.get('lora', 0):<2} {r['batch']}x{r['seq']} {r['data']:<7}"),
            "tokens_per_s", "tok/s")

        def one(row: dict) -> None:
            row = dict(row, steps=args.steps, jobs=args.jobs, target=args.target)
            if time.perf_counter() - started > args.budget_s:
                row.update(rc=-1, wall_s=0.0, error="skipped: time budget spent")
            else:
                rc, out, err, wall = run(command(row, dataset_long, args.steps, args.target), args.timeout_s)
                row.update(rc=rc, wall_s=wall)
                result = last_json(out)
                if result is not None and rc in (0, 3):
                    row.update({k: result[k] for k in KEEP if k in result and k != "timeline"})
                else:
                    row["error"] = last_line(err) or last_line(out) or f"exit status {rc}"
            with lock:
                record(row)

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            list(pool.map(one, rows))
    ok = sum(1 for r in done if r.get("rc") == 0)
    print(f"\n{ok} of {len(done)} rows ok; wrote {out_path} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
