"""Data-parallel checks on N GPUs with NCCL (issue 18; run when a multi-GPU machine is lent, issue
20): for each case, ``headroom measure`` launches the ranks through ``torch.distributed.run`` and the
worst rank's peak is compared with both estimators; one JSON line per case in OUT/distributed.jsonl.

    PYTHONPATH=. python3 bench/gpu_distributed.py --gpus 2 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import time

CASES = [  # (model, seq, batch, sharding fields)
    ("gpt2", 512, 4, {"shard": "ddp"}),
    ("gpt2", 512, 4, {"shard": "fsdp2"}),
    ("gpt2", 512, 4, {"shard": "fsdp2", "reshard_after_forward": "off"}),
    ("gpt2", 512, 4, {"shard": "fsdp2", "offload": "optimizer"}),
    ("gpt2", 512, 4, {"shard": "fsdp2", "offload": "params"}),
    ("Qwen2.5-0.5B", 1024, 2, {"shard": "fsdp2", "mp_param_dtype": "bf16",
                               "mp_reduce_dtype": "fp32"}),
    ("TinyLlama-1.1B", 1024, 2, {"shard": "fsdp2"}),
    ("TinyLlama-1.1B", 1024, 2, {"shard": "ddp"}),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    from engine.estimate import estimate
    from engine.measure.process import measure_in_child
    from engine.profile import Profile, validate

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "distributed.jsonl"), "a", encoding="utf-8") as fh:
        for model, seq, batch, kw in CASES:
            p = validate(Profile(model=model, seq=seq, batch=batch, steps=args.steps,
                                 target="cuda", gpus=args.gpus, padding="fixed", **kw))
            row = {"model": model, "seq": seq, "batch": batch, "gpus": args.gpus, **kw}
            t0 = time.time()
            try:
                m = measure_in_child(p)
                row["measured_peak"] = m.peak_allocated_bytes
                row["ranks"] = m.extra.get("ranks")
                row["tokens_per_s"] = m.tokens_per_s
            except Exception as exc:  # noqa: BLE001 - record and go on
                row["error"] = f"{type(exc).__name__}: {exc}"
            for method in ("analytic", "traced"):
                try:
                    row[f"{method}_peak"] = estimate(p, method=method).peak_allocated_bytes
                except Exception as exc:  # noqa: BLE001
                    row[f"{method}_error"] = str(exc)
            row["elapsed_s"] = time.time() - t0
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            print(json.dumps({k: v for k, v in row.items() if k != "ranks"}), flush=True)


if __name__ == "__main__":
    main()
