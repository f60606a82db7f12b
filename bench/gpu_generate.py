"""Generation (issue 17) on a GPU: estimate vs measured peak, and measured prefill/decode tokens/s.

    PYTHONPATH=. python3 bench/gpu_generate.py --out DIR [--budget-s 330] [--gpu h200] [--quick]
        [--models A,B] [--prompts 4096]

Rows: Qwen2.5-0.5B and Llama-3.2-1B (presets, random weights) and gemma-3-270m-like (18 layers,
15 of them sliding-window layers of 512 tokens; bench/configs) x B in {1, 8, 32} x P in {512, 4096},
N = 256 new tokens, pure bf16 weights, dynamic cache, 2 generations (the first is warm-up). Each
row runs in its own process (a clean device): the analytic and traced estimates (with the speed
estimator's decode tokens/s on --gpu), then ``run_measure`` (the engine's measured generation).
One JSON line per row goes to DIR/generate.jsonl as it finishes; a markdown table is printed last.
Rows are run in order of interest (P = 512 first, then P = 4096) until --budget-s is spent; the
rows left out are listed. ``--row JSON`` is the child's entry point.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# The same child runner as the measure matrix (own process group, whole group killed on timeout).
from bench.gpu_measure_matrix import run

ROOT = Path(__file__).resolve().parent.parent
MODELS = (("Qwen2.5-0.5B", "Qwen2.5-0.5B"), ("Llama-3.2-1B", "Llama-3.2-1B"),
          ("gemma-3-270m-like", str(ROOT / "bench" / "configs" / "gemma-3-270m-like")))
BATCHES = (1, 8, 32)
PROMPTS = (512, 4096)
NEW_TOKENS = 256
GiB = 2 ** 30


def rows(quick: bool) -> list[dict]:
    out = []
    for p in PROMPTS:
        for label, model in MODELS:
            for b in BATCHES:
                out.append({"label": label, "model": model, "batch": b, "prompt_len": p,
                            "new_tokens": NEW_TOKENS})
    return out[:3] if quick else out


def child(row: dict, gpu: str, target: str = "cuda") -> dict:
    """One row, in this process: both estimates, then the measured generation."""
    from engine.estimate import estimate
    from engine.measure import run_measure
    from engine.profile import Profile

    profile = Profile(name=row["label"], model=row["model"], mode="generate", target=target,
                      precision="bf16" if target == "cuda" else "fp32", batch=row["batch"], prompt_len=row["prompt_len"],
                      new_tokens=row["new_tokens"], steps=2, gpu=gpu)
    out = dict(row)
    for method in ("analytic", "traced"):
        started = time.perf_counter()
        est = estimate(profile, method=method)
        out[method] = {
            "peak_allocated_bytes": est.peak_allocated_bytes,
            "peak_reserved_bytes": est.peak_reserved_bytes,
            "device_used_bytes": est.device_used_bytes, "kv_cache_bytes": est.kv_cache_bytes,
            "peak_phase": est.peak_phase, "breakdown": est.breakdown,
            **{k: v for k, v in est.extra.items() if k.endswith("_bytes") and k != "cache_growth_bytes"
               or k.startswith("estimated_")},
            "elapsed_s": time.perf_counter() - started}
    started = time.perf_counter()
    m = run_measure(profile)
    out["measured"] = {
        "peak_allocated_bytes": m.peak_allocated_bytes, "peak_reserved_bytes": m.peak_reserved_bytes,
        "device_used_bytes": m.device_used_bytes, "kv_cache_bytes": m.kv_cache_bytes,
        "breakdown": m.breakdown, "oom": m.oom, "oom_phase": m.oom_phase,
        "time_to_first_token_s": m.time_to_first_token_s,
        "prefill_tokens_per_s": m.prefill_tokens_per_s, "decode_tokens_per_s": m.decode_tokens_per_s,
        **{k: v for k, v in m.extra.items() if k.endswith("_bytes") and k != "cache_growth_bytes"
           or k in ("decode_tokens_per_s_per_sequence", "peak_phase", "generations")},
        "device_name": m.device_name, "notes": list(m.notes),
        "elapsed_s": time.perf_counter() - started}
    return out


def _pct(est, meas) -> str:
    return f"{100.0 * (est - meas) / meas:+.1f}%" if est and meas else "-"


def table(results: list[dict]) -> str:
    head = ("| model | B | P | measured peak | traced | analytic | prefill peak (meas / traced) | "
            "decode peak (meas / traced) | KV cache (meas = est?) | TTFT ms | prefill tok/s | "
            "decode tok/s (est) |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in results:
        m, t, a = r.get("measured"), r.get("traced"), r.get("analytic")
        if not m or not t:
            lines.append(f"| {r['label']} | {r['batch']} | {r['prompt_len']} | {r.get('error', 'failed')} "
                         "| | | | | | | | |")
            continue
        mp = m["peak_allocated_bytes"]
        if m.get("oom"):
            lines.append(f"| {r['label']} | {r['batch']} | {r['prompt_len']} | OOM ({m['oom_phase']}) | "
                         f"{t['peak_allocated_bytes'] / GiB:.2f} GiB | | | | | | | |")
            continue
        same = "yes" if m["kv_cache_bytes"] == t["kv_cache_bytes"] else \
            f"no ({t['kv_cache_bytes'] - m['kv_cache_bytes']:+,})"
        lines.append(
            f"| {r['label']} | {r['batch']} | {r['prompt_len']} | {mp / GiB:.3f} GiB | "
            f"{_pct(t['peak_allocated_bytes'], mp)} | {_pct(a['peak_allocated_bytes'], mp)} | "
            f"{m['prefill_peak_allocated_bytes'] / GiB:.3f} / {_pct(t['prefill_peak_allocated_bytes'], m['prefill_peak_allocated_bytes'])} | "
            f"{m['decode_peak_allocated_bytes'] / GiB:.3f} / {_pct(t['decode_peak_allocated_bytes'], m['decode_peak_allocated_bytes'])} | "
            f"{m['kv_cache_bytes'] / GiB:.3f} GiB {same} | {m['time_to_first_token_s'] * 1e3:,.0f} | "
            f"{m['prefill_tokens_per_s']:,.0f} | {m['decode_tokens_per_s']:,.0f} "
            f"({t.get('estimated_decode_tokens_per_s', 0):,.0f}) |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for generate.jsonl")
    parser.add_argument("--budget-s", type=float, default=330.0, help="stop starting rows after this")
    parser.add_argument("--row-timeout-s", type=float, default=120.0)
    parser.add_argument("--gpu", default="h200", help="catalog GPU of the speed estimate")
    parser.add_argument("--quick", action="store_true", help="the first 3 rows only")
    parser.add_argument("--models", default="", help="comma list of row labels: only these models")
    parser.add_argument("--prompts", default="", help="comma list of prompt lengths: only these")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--target", default="cuda", help=argparse.SUPPRESS)  # cpu: a smoke test
    args = parser.parse_args()
    if args.row:
        print(json.dumps(child(json.loads(args.row), args.gpu, args.target), default=str))
        return 0
    if not args.out:
        parser.error("--out DIR is required")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results, skipped = [], []
    with (out_dir / "generate.jsonl").open("a", encoding="utf-8") as fh:
        for row in rows(args.quick):
            if args.models and row["label"] not in args.models.split(","):
                continue
            if args.prompts and str(row["prompt_len"]) not in args.prompts.split(","):
                continue
            left = args.budget_s - (time.perf_counter() - started)
            if left < 20:
                skipped.append(row)
                continue
            rc, out, err, wall = run([sys.executable, __file__, "--row", json.dumps(row), "--gpu", args.gpu],
                                     min(args.row_timeout_s, left + 30))
            result = None
            for line in reversed(out.strip().splitlines()):
                if line.startswith("{"):
                    result = json.loads(line)
                    break
            result = result or {**row, "error": (err.strip().splitlines() or ["no output"])[-1][:300]}
            result.update(rc=rc, wall_s=wall)
            results.append(result)
            fh.write(json.dumps(result, default=str) + "\n")
            fh.flush()
            m = result.get("measured") or {}
            print(f"[{time.perf_counter() - started:6.1f}s] {row['label']} B={row['batch']} P={row['prompt_len']} "
                  f"rc={rc} peak={m.get('peak_allocated_bytes', 0) / GiB:.3f} GiB "
                  f"decode={m.get('decode_tokens_per_s', 0):,.0f} tok/s ({wall:.1f}s) {result.get('error', '')}",
                  flush=True)
    print()
    print(table(results))
    if skipped:
        print("\nleft out (time budget): " + ", ".join(
            f"{r['label']} B={r['batch']} P={r['prompt_len']}" for r in skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
