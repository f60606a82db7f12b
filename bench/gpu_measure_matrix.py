"""Measured runs over a matrix of real model shapes on a GPU, plus bare-loop cross-checks.

Every configuration runs as its own process (`python -m engine measure ... --json`), so each starts
from a clean device; a failing configuration records its error and the script goes on. A few
configurations are also run through bench/bare_loop.py (written without the engine) to show the
engine's numbers agree with a plain PyTorch loop (target: peak within 1%, tokens/s within 3%).

    PYTHONPATH=. python3 bench/gpu_measure_matrix.py --out /tmp/matrix.jsonl [--steps 5]
        [--batch 8] [--seq 512] [--budget-s 420] [--models gpt2,bert-base-uncased,...] [--modes train,infer] [--quick]

Matrix: bert-base-uncased, gpt2, Qwen2.5-0.5B, Llama-3.2-1B x train/infer x fp32/bf16-amp x
checkpointing on/off (training only: inference keeps no activations to recompute). Data: a
generated .jsonl of long texts, so every batch is exactly (batch, seq) with no padding and the bare
loop (random tokens, full mask) sees the same shapes. Writes one JSON line per run to --out and
prints a markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("bert-base-uncased", "gpt2", "Qwen2.5-0.5B", "Llama-3.2-1B")
#: (model, mode, precision, checkpointing) also run through the bare loop.
CROSS_CHECKS = {
    ("gpt2", "train", "fp32", False),
    ("bert-base-uncased", "train", "bf16-amp", False),
    ("Qwen2.5-0.5B", "train", "bf16-amp", True),
    ("Llama-3.2-1B", "infer", "bf16-amp", False),
    ("Llama-3.2-1B", "train", "bf16-amp", False),
}
GiB = 2 ** 30


def long_texts(path: Path, n: int = 96, words: int = 1500, seed: int = 0) -> None:
    """Texts long enough that every sequence is truncated to --seq (no padding anywhere)."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9)))
             for _ in range(4000)]
    with path.open("w", encoding="utf-8") as fh:
        for _ in range(n):
            fh.write(json.dumps({"text": " ".join(rng.choice(vocab) for _ in range(words))}) + "\n")


def run(cmd: list[str], timeout: float) -> tuple[int, str, str, float]:
    """Run in its own process group; on timeout kill the whole group. (rc, stdout, stderr, seconds)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        rc, err = 124, (err or "") + f"\ntimed out after {timeout:.0f} s"
    return rc, out, err, time.perf_counter() - started


def last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def last_line(text: str) -> str:
    lines = [x for x in (text or "").strip().splitlines() if x.strip()]
    return lines[-1][:300] if lines else ""


KEEP = ("peak_allocated_bytes", "peak_reserved_bytes", "device_used_bytes", "breakdown",
        "tokens_per_s", "useful_tokens_per_s", "step_time_s", "first_step_s", "params", "oom",
        "oom_step", "oom_phase", "real_tokens", "padded_tokens", "losses", "notes", "device_name",
        "elapsed_s", "extra", "timeline")


def recorder(fh, rows: list, started: float, label, rate_key: str, rate_name: str):
    """record(row): keep the row, write it as a JSON line at once (a later crash loses nothing) and
    print a progress line: elapsed, label(row), status, peak, rate, wall time, error."""
    def record(row: dict) -> None:
        rows.append(row)
        fh.write(json.dumps(row, default=str) + "\n")
        fh.flush()
        status = "OOM" if row.get("oom") else ("ok" if row["rc"] == 0 else f"rc={row['rc']}")
        peak = row.get("peak_allocated_bytes")
        print(f"[{time.perf_counter() - started:6.1f}s] {label(row)} {status:<6} "
              f"peak={'-' if peak is None else f'{peak / GiB:.3f} GiB'} "
              f"{rate_name}={row.get(rate_key, 0) or 0:,.0f} ({row.get('wall_s', 0):.1f}s) "
              f"{row.get('error', '')}", flush=True)
    return record


def main() -> int:
    ap = argparse.ArgumentParser(description="engine measure over a model matrix on a GPU")
    ap.add_argument("--out", required=True, help="JSON lines output file")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting runs after this")
    ap.add_argument("--timeout-s", type=float, default=120.0, help="per run")
    ap.add_argument("--modes", default="train,infer", help="which of train,infer to run")
    ap.add_argument("--quick", action="store_true", help="only the cross-checked configurations")
    ap.add_argument("--no-bare", action="store_true", help="skip the bare-loop cross-checks")
    ap.add_argument("--target", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: a local smoke test of this script (use tiny models)")
    ap.add_argument("--cross-check-all", action="store_true", help="run the bare loop for every config")
    args = ap.parse_args()

    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="headroom-matrix-"))
    dataset = tmp / "long.jsonl"
    long_texts(dataset)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    models = [m.strip() for m in args.models.split(",") if m.strip()]

    configs = []
    for model in models:
        for mode in [m for m in ("train", "infer") if m in args.modes.split(",")]:
            for precision in ("fp32", "bf16-amp"):
                for ckpt in ((False, True) if mode == "train" else (False,)):
                    key = (model, mode, precision, ckpt)
                    if args.quick and key not in CROSS_CHECKS:
                        continue
                    configs.append(key)
    rows = []
    with out_path.open("w", encoding="utf-8") as fh:
        record = recorder(fh, rows, started, lambda row: (
            f"{row['kind']:<6} {row['model']:<18} {row['mode']:<5} {row['precision']:<8} "
            f"ckpt={int(row['checkpointing'])}"), "tokens_per_s", "tok/s")

        for model, mode, precision, ckpt in configs:
            base = {"model": model, "mode": mode, "precision": precision, "checkpointing": ckpt,
                    "batch": args.batch, "seq": args.seq, "steps": args.steps}
            runs = [("engine", [sys.executable, "-m", "engine", "measure", "--model", model,
                                "--mode", mode, "--precision", precision, "--batch", str(args.batch),
                                "--seq", str(args.seq), "--steps", str(args.steps), "--target", args.target,
                                "--dataset", str(dataset), "--padding", "fixed", "--json"]
                     + (["--checkpointing"] if ckpt else []))]
            if not args.no_bare and (args.cross_check_all or (model, mode, precision, ckpt) in CROSS_CHECKS):
                runs.append(("bare", [sys.executable, str(ROOT / "bench" / "bare_loop.py"), "--model", model,
                                      "--mode", mode, "--precision", precision, "--batch", str(args.batch),
                                      "--seq", str(args.seq), "--steps", str(args.steps),
                                      "--device", args.target]
                             + (["--checkpointing"] if ckpt else [])))
            for kind, cmd in runs:
                row = dict(base, kind=kind)
                if time.perf_counter() - started > args.budget_s:
                    record(dict(row, rc=-1, wall_s=0.0, error="skipped: time budget spent"))
                    continue
                try:
                    rc, out, err, wall = run(cmd, args.timeout_s)
                except Exception as exc:  # noqa: BLE001 - record and go on
                    record(dict(row, rc=-2, wall_s=0.0, error=f"{type(exc).__name__}: {exc}"))
                    continue
                row.update(rc=rc, wall_s=wall)
                result = last_json(out)
                if result is not None and rc in (0, 3):
                    row.update({k: result[k] for k in KEEP if k in result})
                else:
                    row["error"] = last_line(err) or last_line(out) or f"exit status {rc}"
                record(row)

    print()
    print(table(rows))
    print(f"\nwrote {len(rows)} rows to {out_path} in {time.perf_counter() - started:.0f} s")
    return 0


def _gib(x) -> str:
    return "-" if x is None else f"{x / GiB:.3f}"


def _pct(a, b) -> str:
    if not a or not b:
        return "-"
    return f"{(a - b) / b * 100:+.2f}%"


def table(rows: list[dict]) -> str:
    bare = {(r["model"], r["mode"], r["precision"], r["checkpointing"]): r
            for r in rows if r["kind"] == "bare" and r.get("rc") == 0}
    head = ("| model | mode | precision | ckpt | peak alloc GiB | reserved GiB | device used GiB | "
            "weights | grads | optim | activ | temps | tokens/s | step s | bare peak GiB | Δ peak | "
            "bare tok/s | Δ tok/s | status |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in rows:
        if r["kind"] != "engine":
            continue
        key = (r["model"], r["mode"], r["precision"], r["checkpointing"])
        b = bare.get(key, {})
        bd = r.get("breakdown") or {}
        status = r.get("error") or ("OOM" if r.get("oom") else "ok")
        lines.append("| " + " | ".join([
            r["model"], r["mode"], r["precision"], "on" if r["checkpointing"] else "off",
            _gib(r.get("peak_allocated_bytes")), _gib(r.get("peak_reserved_bytes")),
            _gib(r.get("device_used_bytes")),
            *(_gib(bd.get(k)) for k in ("weights", "gradients", "optimizer", "activations", "temporaries")),
            f"{r.get('tokens_per_s') or 0:,.0f}", f"{r.get('step_time_s') or 0:.3f}",
            _gib(b.get("peak_allocated_bytes")), _pct(r.get("peak_allocated_bytes"), b.get("peak_allocated_bytes")),
            f"{b['tokens_per_s']:,.0f}" if b.get("tokens_per_s") else "-",
            _pct(r.get("tokens_per_s"), b.get("tokens_per_s")), str(status)[:80],
        ]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
