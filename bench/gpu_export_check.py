"""GPU check of `headroom export`: the exported script measures what `headroom measure` measures.

For each model (gpt2, Qwen2.5-0.5B; bf16-amp training, batch 8, seq 512 by default) this runs
`python -m engine measure ... --json` and the exported script (`python train.py --device cuda`),
each in its own process (a clean device), and compares peak allocated memory and tokens/s (target:
within 3%). Prints a Markdown table; writes one JSON line per model to --out. About 4 minutes on an
H100.

    PYTHONPATH=. python3 bench/gpu_export_check.py --out export_check.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CASES = [
    {"model": "gpt2", "batch": 8, "seq": 512},
    {"model": "Qwen2.5-0.5B", "batch": 8, "seq": 512},
]
TOLERANCE = 0.03


def _last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON line in:\n{text[-2000:]}")


def _run(cmd: list[str], env: dict[str, str], timeout: int) -> tuple[dict, float]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return _last_json(proc.stdout), time.perf_counter() - started


def check(case: dict, args: argparse.Namespace, folder: Path) -> dict:
    from engine.export import export_script
    from engine.profile import Profile

    profile = Profile(model=case["model"], batch=case["batch"], seq=case["seq"], precision=args.precision,
                      target="cuda", steps=args.steps, padding=args.padding)
    script = folder / f"train_{case['model'].replace('.', '_')}.py"
    script.write_text(export_script(profile), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    measured, measure_s = _run([sys.executable, "-m", "engine", "measure", "--model", case["model"],
                                "--batch", str(case["batch"]), "--seq", str(case["seq"]),
                                "--precision", args.precision, "--padding", args.padding,
                                "--target", "cuda", "--steps", str(args.steps), "--json"], env, 600)
    script_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}  # standalone: no Headroom
    exported, script_s = _run([sys.executable, str(script), "--device", "cuda"], script_env, 600)

    def rel(a: float, b: float) -> float:
        return (a - b) / b if b else float("nan")

    peak_diff = rel(exported["peak_allocated_bytes"], measured["peak_allocated_bytes"])
    tps_diff = rel(exported["tokens_per_s"], measured["tokens_per_s"])
    return {
        **case, "precision": args.precision, "padding": args.padding, "steps": args.steps,
        "device_name": exported.get("device_name"),
        "measure_peak_allocated_bytes": measured["peak_allocated_bytes"],
        "script_peak_allocated_bytes": exported["peak_allocated_bytes"],
        "peak_rel_diff": peak_diff,
        "measure_peak_reserved_bytes": measured["peak_reserved_bytes"],
        "script_peak_reserved_bytes": exported["peak_reserved_bytes"],
        "measure_tokens_per_s": measured["tokens_per_s"],
        "script_tokens_per_s": exported["tokens_per_s"],
        "tokens_per_s_rel_diff": tps_diff,
        "measure_losses": measured.get("losses"), "script_losses": exported.get("losses"),
        "same_tokens": (measured["real_tokens"], measured["padded_tokens"])
        == (exported["real_tokens"], exported["padded_tokens"]),
        "within_tolerance": abs(peak_diff) <= TOLERANCE and abs(tps_diff) <= TOLERANCE,
        "measure_wall_s": measure_s, "script_wall_s": script_s,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="export_check.jsonl", help="JSON lines, one per model")
    parser.add_argument("--models", nargs="*", help="subset of: " + ", ".join(c["model"] for c in CASES))
    parser.add_argument("--batch", type=int, help="override the batch of every case")
    parser.add_argument("--seq", type=int, help="override the sequence length of every case")
    parser.add_argument("--precision", default="bf16-amp")
    parser.add_argument("--padding", default="fixed")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    cases = [dict(c) for c in CASES if not args.models or c["model"] in args.models]
    for c in cases:
        c["batch"] = args.batch or c["batch"]
        c["seq"] = args.seq or c["seq"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp, open(args.out, "w", encoding="utf-8") as out:
        for case in cases:
            try:
                row = check(case, args, Path(tmp))
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                row = {**case, "error": str(exc)[-2000:]}
            rows.append(row)
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(json.dumps(row), flush=True)
    gib = 2**30
    print("\n| model | batch x seq | peak measure (GiB) | peak script (GiB) | diff | tok/s measure | "
          "tok/s script | diff | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['batch']}x{r['seq']} | error: {r['error'].splitlines()[-1][:60]} "
                  "| | | | | | |")
            continue
        print(f"| {r['model']} | {r['batch']}x{r['seq']} | {r['measure_peak_allocated_bytes'] / gib:.3f} | "
              f"{r['script_peak_allocated_bytes'] / gib:.3f} | {r['peak_rel_diff'] * 100:+.2f}% | "
              f"{r['measure_tokens_per_s']:,.0f} | {r['script_tokens_per_s']:,.0f} | "
              f"{r['tokens_per_s_rel_diff'] * 100:+.2f}% | {r['same_tokens']} |")
    return 0 if all(r.get("within_tolerance") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
