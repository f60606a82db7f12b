"""Timing of the speed estimate and the planner (issue 16 targets, no GPU needed).

    PYTHONPATH=. python bench/bench_speed_planner.py [--repeat 5] [--out results.json]

* the analytic speed estimate alone (``speed.estimate_speed`` on a cached architecture): target
  <= 10 ms;
* a whole analytic estimate (memory and speed) of Llama-3.2-1B;
* ``headroom plan --goal fastest`` for Llama-3.2-1B (``plan_search.fastest``, 24 GiB on an RTX
  4090 and 80 GB on an H100): target <= 1 s on 2 cores;
* ``--which-gpu`` for the same profile.

Each is timed ``--repeat`` times after one warm-up call (imports, config and dataset caches), and
the median is reported with the machine's load average (the 2-core VM is shared: a loaded machine
stretches wall time, so the CPU time of the process is reported too).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def timed(fn, repeat: int) -> dict:
    fn()  # warm-up
    walls, cpus = [], []
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return {"wall_median_s": statistics.median(walls), "cpu_median_s": statistics.median(cpus),
            "wall_min_s": min(walls)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    from engine.estimate import estimate, speed
    from engine.estimate.analytic import arch_of
    from engine.plan_search import fastest, which_gpu
    from engine.profile import Profile

    p = Profile(model="Llama-3.2-1B", batch=8, seq=512, precision="bf16-amp", gpu="rtx4090")
    arch = arch_of(p)
    rows = {
        "analytic speed estimate (Llama-3.2-1B 8x512)": timed(
            lambda: speed.estimate_speed(p, (8, 512), arch=arch), args.repeat * 20),
        "analytic estimate, memory + speed (Llama-3.2-1B)": timed(
            lambda: estimate(p, method="analytic"), args.repeat),
        "plan --goal fastest, Llama-3.2-1B, 24 GiB, rtx4090": timed(
            lambda: fastest(p, 24 * 2**30), args.repeat),
        "plan --goal fastest, Llama-3.2-1B, h100-sxm memory": timed(
            lambda: fastest(p.replace(gpu="h100-sxm")), args.repeat),
        "plan --which-gpu, Llama-3.2-1B": timed(lambda: which_gpu(p), args.repeat),
    }
    r = fastest(p, 24 * 2**30)
    info = {"load_average": os.getloadavg(), "cpus": os.cpu_count(), "estimates_in_fastest": r.searched,
            "fastest_top": [c.changes | {"tokens_per_s": round(c.tokens_per_s)} for c in r.candidates]}
    for name, t in rows.items():
        print(f"{name:<55} wall {t['wall_median_s'] * 1e3:9.2f} ms (min {t['wall_min_s'] * 1e3:8.2f})"
              f"  cpu {t['cpu_median_s'] * 1e3:9.2f} ms")
    print(json.dumps(info))
    if args.out:
        Path(args.out).write_text(json.dumps({"timings": rows, **info}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
