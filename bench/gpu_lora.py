"""GPU table of fine-tuning methods: full fine-tuning, LoRA r=8/16/64 and QLoRA (NF4, r=16), with
AdamW and (full) 8-bit AdamW, on Qwen2.5-0.5B- and Llama-3.2-1B-like presets (random init,
architecture only), pure bf16, at 512 and 2048 tokens: measured peak and tokens/s against both
estimates.

Every row is its own processes (``python3 -m engine measure ... --json`` on the GPU, one after the
other; ``python3 -m engine estimate ... --method traced|analytic --json`` on the CPU cores, several
at once while the GPU works). Failures are rows, never fatal.

bitsandbytes (QLoRA, 8-bit AdamW): used when it imports; otherwise the wheel given with ``--wheel``
(or the first ``bitsandbytes-*.whl`` under ./wheels, ./shared/wheels or /work/wheels) is installed
with ``pip install --no-deps``; without either, those rows are skipped with one line each.

    PYTHONPATH=. python3 bench/gpu_lora.py --out $OUT/lora            # ~5 min on an H200
    PYTHONPATH=. python3 bench/gpu_lora.py --out $OUT/lora --wheel shared/wheels/bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl
    PYTHONPATH=. python3 bench/gpu_lora.py --out /tmp/lora --device cpu --quick   # smoke (tiny presets)

Writes ``rows.jsonl`` (one JSON object per row) and ``summary.txt`` (the table) in ``--out``.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20

METHODS = {  # name -> profile flags
    "full": [],
    "full-adamw8bit": ["--optimizer", "adamw-8bit"],
    "lora-r8": ["--lora", "8", "--lora-alpha", "16"],
    "lora-r16": ["--lora", "16", "--lora-alpha", "32"],
    "lora-r64": ["--lora", "64", "--lora-alpha", "128"],
    "qlora-nf4-r16": ["--lora", "16", "--lora-alpha", "32", "--quant", "nf4", "--quant-dtype", "bf16"],
}
NEEDS_BNB = {"full-adamw8bit", "qlora-nf4-r16"}


def rows(quick: bool, device: str) -> list[dict]:
    models = ["tiny-llama", "tiny-gpt2"] if quick else ["Qwen2.5-0.5B", "Llama-3.2-1B"]
    seqs = [64] if quick else [512, 2048]
    out = []
    for model in models:
        for seq in seqs:
            for method in METHODS:
                if method == "full-adamw8bit" and seq != seqs[0]:
                    continue  # the optimizer's saving does not depend on the sequence
                out.append({"model": model, "seq": seq, "batch": 2 if quick else (4 if seq <= 512 else 1),
                            "method": method, "device": device,
                            "precision": "fp32" if device == "cpu" else "bf16"})
    return out


def ensure_bitsandbytes(wheel: str | None) -> str:
    """'' when bitsandbytes imports (installing the wheel if needed), else why not (one line)."""
    def imports() -> str:
        proc = subprocess.run([sys.executable, "-c", "import bitsandbytes, torch; "
                               "print(bitsandbytes.__version__, torch.cuda.is_available())"],
                              capture_output=True, text=True, timeout=120)
        return "" if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]

    if importlib.util.find_spec("bitsandbytes") is not None and not imports():
        return ""
    candidates = [wheel] if wheel else []
    for pattern in ("wheels/bitsandbytes-*.whl", "shared/wheels/bitsandbytes-*.whl",
                    "/work/wheels/bitsandbytes-*.whl"):
        candidates += sorted(glob.glob(str(ROOT / pattern) if not pattern.startswith("/") else pattern))
    found = next((c for c in candidates if c and Path(c).is_file()), None)
    if found is None:
        return "bitsandbytes is not installed and no wheel was found (--wheel PATH)"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", found],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return f"pip install {Path(found).name} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
    why = imports()
    return f"bitsandbytes installed from {Path(found).name} but does not import: {why}" if why else ""


def _engine(args: list[str], timeout: int) -> tuple[dict | None, str, float]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "engine", *args, "--json"], capture_output=True,
                              text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout} s", time.perf_counter() - started
    wall = time.perf_counter() - started
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if not lines:
        return None, (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1], wall
    return json.loads(lines[-1]), "", wall


def _flags(row: dict) -> list[str]:
    return ["--model", row["model"], "--seq", str(row["seq"]), "--batch", str(row["batch"]),
            "--precision", row["precision"], "--target", row["device"], *METHODS[row["method"]]]


def estimate(row: dict, method: str) -> dict:
    result, error, wall = _engine(["estimate", *_flags(row), "--method", method], timeout=600)
    if result is None:
        return {"error": error, "wall_s": wall}
    return {"peak_allocated_bytes": result["peak_allocated_bytes"],
            "peak_reserved_bytes": result["peak_reserved_bytes"], "breakdown": result["breakdown"],
            "trainable_params": result.get("trainable_params"),
            "optimizer_state_bytes": result.get("optimizer_state_bytes"),
            "tokens_per_s": result.get("tokens_per_s"), "wall_s": wall}


def measure(row: dict, steps: int) -> dict:
    result, error, wall = _engine(["measure", *_flags(row), "--steps", str(steps)], timeout=300)
    if result is None:
        return {"error": error, "wall_s": wall}
    return {"peak_allocated_bytes": result["peak_allocated_bytes"],
            "peak_reserved_bytes": result["peak_reserved_bytes"], "breakdown": result["breakdown"],
            "tokens_per_s": result["tokens_per_s"], "step_time_s": result["step_time_s"],
            "trainable_params": result.get("trainable_params"), "params": result["params"],
            "optimizer_state_bytes": result.get("extra", {}).get("optimizer_state_bytes"),
            "oom": result["oom"], "device_name": result["device_name"], "wall_s": wall}


def _err(est: dict, meas: dict) -> float | None:
    if "peak_allocated_bytes" not in est or "peak_allocated_bytes" not in meas:
        return None
    return est["peak_allocated_bytes"] / meas["peak_allocated_bytes"] - 1


def summary(done: list[dict]) -> str:
    lines = [f"{'model':14} {'seq':>5} {'B':>2} {'method':15} {'measured MiB':>12} {'vs full':>8} "
             f"{'traced':>8} {'analytic':>9} {'tokens/s':>9} {'trainable':>12}"]
    full = {(r["model"], r["seq"]): r["measured"].get("peak_allocated_bytes")
            for r in done if r["method"] == "full"}
    for r in done:
        m = r["measured"]
        if "skipped" in r:
            lines.append(f"{r['model']:14} {r['seq']:>5} {r['batch']:>2} {r['method']:15} skipped: {r['skipped']}")
            continue
        if "peak_allocated_bytes" not in m:
            lines.append(f"{r['model']:14} {r['seq']:>5} {r['batch']:>2} {r['method']:15} failed: {m.get('error')}")
            continue
        base = full.get((r["model"], r["seq"]))
        saving = f"{m['peak_allocated_bytes'] / base:7.2f}x" if base else "      -"
        t, a = _err(r["traced"], m), _err(r["analytic"], m)
        lines.append(f"{r['model']:14} {r['seq']:>5} {r['batch']:>2} {r['method']:15} "
                     f"{m['peak_allocated_bytes'] / MIB:12,.0f} {saving:>8} "
                     f"{'%+.1f%%' % (100 * t) if t is not None else '-':>8} "
                     f"{'%+.1f%%' % (100 * a) if a is not None else '-':>9} "
                     f"{m['tokens_per_s']:9,.0f} {m.get('trainable_params') or 0:12,}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (rows.jsonl, summary.txt)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="tiny presets, one short sequence")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--wheel", help="bitsandbytes wheel to install when it is missing")
    parser.add_argument("--estimators", type=int, default=6, help="estimate processes at once")
    parser.add_argument("--models", default="", help="comma list: only these models' rows")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    no_bnb = ensure_bitsandbytes(args.wheel)
    print(f"bitsandbytes: {'ok' if not no_bnb else no_bnb}", flush=True)
    todo = [r for r in rows(args.quick, args.device)
            if not args.models or r["model"] in args.models.split(",")]
    done: list[dict] = []
    with ThreadPoolExecutor(max(1, args.estimators)) as pool, (out / "rows.jsonl").open("w") as fh:
        futures = {}
        for row in todo:
            if row["method"] in NEEDS_BNB and no_bnb:
                continue
            futures[id(row)] = (pool.submit(estimate, row, "traced"), pool.submit(estimate, row, "analytic"))
        for row in todo:  # the GPU measures, one process at a time, while the estimates run
            if row["method"] in NEEDS_BNB and no_bnb:
                row.update(skipped=no_bnb, measured={}, traced={}, analytic={})
                print(f"skip {row['model']} {row['seq']} {row['method']}: {no_bnb}", flush=True)
            else:
                row["measured"] = measure(row, args.steps)
                traced, analytic = futures[id(row)]
                row["traced"], row["analytic"] = traced.result(), analytic.result()
                t, a = _err(row["traced"], row["measured"]), _err(row["analytic"], row["measured"])
                print(f"{row['model']} seq {row['seq']} {row['method']}: measured "
                      f"{row['measured'].get('peak_allocated_bytes', 0) / MIB:,.0f} MiB "
                      f"{row['measured'].get('error', '')} traced {t if t is None else f'{t:+.2%}'} "
                      f"analytic {a if a is None else f'{a:+.2%}'} "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            done.append(row)
    table = summary(done)
    (out / "summary.txt").write_text(table + "\n")
    print(table)
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
