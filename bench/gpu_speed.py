"""Measured tokens/s for a set of rows on CUDA, beside the analytic speed estimate (issue 16).

    PYTHONPATH=. python3 bench/gpu_speed.py OUT_DIR [--quick] [--budget-s 220]

One process, ``engine.measure.run_measure`` per row (the steps ``headroom measure`` times: the
first is warm-up, the median of the rest is the step time), rows ordered most useful first and
stopped before ``--budget-s`` seconds. Writes ``OUT_DIR/gpu_speed.jsonl`` (one JSON line per row:
the profile's settings, the measured step time and tokens/s, the analytic estimate's for the
detected catalog GPU) and ``OUT_DIR/gpu.txt``. ``bench/fit_speed.py --extra OUT_DIR`` adds the rows
to the fit and the score. About 3 minutes on an H200.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: (model, mode, precision, checkpointing, batch, seq, extra fields); most informative first.
ROWS = [
    ("gpt2", "train", "bf16-amp", False, 8, 512, {}),
    ("Llama-3.2-1B", "train", "bf16-amp", False, 8, 512, {}),
    ("bert-base-uncased", "train", "bf16-amp", False, 32, 512, {}),
    ("gpt2", "train", "bf16-amp", True, 8, 512, {}),
    ("Llama-3.2-1B", "train", "bf16-amp", True, 8, 512, {}),
    ("gpt2", "train", "fp32", False, 8, 512, {}),
    ("Qwen2.5-0.5B", "train", "bf16-amp", False, 8, 512, {}),
    ("gpt2", "infer", "bf16-amp", False, 16, 512, {}),
    ("Llama-3.2-1B", "infer", "bf16-amp", False, 16, 512, {}),
    # Grouped-query bf16 inference: estimated 26-40% too slow from matrix rows that ran 4 at once.
    ("Qwen2.5-0.5B", "infer", "bf16-amp", False, 16, 512, {}),
    ("bench/configs/qwen3-0_6b-like", "infer", "bf16-amp", False, 16, 512, {}),
    ("bench/configs/gemma-3-270m-like", "infer", "bf16-amp", False, 16, 512, {}),
    # The worst speed row (+183%) came from a parallel matrix run: measured alone here.
    ("bert-base-uncased", "infer", "fp32", False, 8, 512, {"task": "classification"}),
    ("gpt2", "train", "bf16-amp", False, 16, 512, {"micro_batches": 4}),
    ("gpt2", "train", "bf16-amp", False, 4, 1024, {}),
    ("bert-base-uncased", "train", "fp32", False, 8, 512, {}),
    ("gpt2-medium", "train", "bf16-amp", False, 8, 512, {}),
    ("TinyLlama-1.1B", "train", "bf16-amp", True, 8, 1024, {}),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="folder for gpu_speed.jsonl")
    ap.add_argument("--quick", action="store_true", help="the first 4 rows only")
    ap.add_argument("--budget-s", type=float, default=220.0, help="stop starting rows after this")
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args(argv)
    import torch
    import transformers

    from engine import gpus
    from engine.estimate import estimate
    from engine.measure import run_measure
    from engine.profile import Profile

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure", file=sys.stderr)
        return 1
    name = torch.cuda.get_device_name(0)
    total = torch.cuda.get_device_properties(0).total_memory
    key = gpus.detect_key(name, total) or "custom"
    (out / "gpu.txt").write_text(f"{name}, {total // 2**20} MiB, catalog {key}\n"
                                 f"{torch.__version__} {transformers.__version__}\n")
    rows = ROWS[:4] if args.quick else ROWS
    with open(out / "gpu_speed.jsonl", "a", encoding="utf-8") as f:
        for model, mode, precision, ckpt, batch, seq, extra in rows:
            if time.perf_counter() - started > args.budget_s:
                print(f"budget reached: skipped {model} {mode} {precision}", file=sys.stderr)
                continue
            p = Profile(model=model, mode=mode, precision=precision, checkpointing=ckpt,
                        batch=batch, seq=seq, steps=args.steps, target="cuda", gpu=key, **extra)
            row = {"model": model, "mode": mode, "precision": precision, "checkpointing": ckpt,
                   "batch": batch, "seq": seq, "optimizer": p.optimizer, "data": "builtin",
                   "gpu": key, "device_name": name, "label": model, **extra}
            t0 = time.perf_counter()
            try:
                est = estimate(p, method="analytic")
                row.update(estimate_tokens_per_s=est.tokens_per_s, estimate_step_s=est.step_s)
                m = run_measure(p)
                row.update(rc=0, oom=m.oom, step_time_s=m.step_time_s, tokens_per_s=m.tokens_per_s,
                           first_step_s=m.first_step_s, peak_allocated_bytes=m.peak_allocated_bytes,
                           device_used_bytes=m.device_used_bytes)
            except Exception as exc:  # noqa: BLE001 - a row that fails is a row to report
                row.update(rc=1, error=f"{type(exc).__name__}: {exc}"[:300])
            row["wall_s"] = time.perf_counter() - t0
            torch.cuda.empty_cache()
            f.write(json.dumps(row) + "\n")
            f.flush()
            ratio = (row.get("estimate_tokens_per_s", 0) / row["tokens_per_s"] - 1) \
                if row.get("tokens_per_s") else float("nan")
            print(f"{model:<18} {mode:<5} {precision:<8} ckpt={int(ckpt)} {batch}x{seq} "
                  f"measured {row.get('tokens_per_s', 0):>10,.0f} tok/s  est "
                  f"{row.get('estimate_tokens_per_s', 0):>10,.0f} ({ratio:+.0%})  {row['wall_s']:.0f} s",
                  flush=True)
    print(f"total {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
