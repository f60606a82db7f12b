"""Both estimators against the measured rows of bench/gpu_estimator_matrix.py (no GPU needed).

    PYTHONPATH=. .venv/bin/python bench/score_estimator_matrix.py \
        bench/results/verify_h200_2026-12-01/call3/estimator_matrix.jsonl --device h200 \
        --md bench/results/verify_h200_2026-12-01/estimator_matrix.md

Each measured row is estimated with the profile that ran (same model, mode, precision, optimizer,
checkpointing, batch, seq, fixed padding; the generated long texts are regenerated from the same
seed, the built-in corpus is this machine's, which with fixed padding gives the same batch shape).
Errors are ``estimate / measured - 1`` on peak allocated and peak reserved. Rows ran several at a
time, so device-used is not scored.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from gpu_estimator_matrix import long_texts, model_arg  # noqa: E402

GIB = 2**30


def estimate_row(row: dict, long_path: Path, methods=("analytic", "traced")) -> dict:
    from engine.estimate import estimate
    from engine.profile import Profile

    profile = Profile(model=model_arg(row["model"]), task=row["task"], mode=row["mode"],
                      precision=row["precision"], checkpointing=row["checkpointing"],
                      optimizer=row["optimizer"], batch=row["batch"], seq=row["seq"],
                      padding="fixed", target="cuda", steps=row["steps"],
                      dataset=str(long_path) if row["data"] == "long" else "builtin",
                      lora=int(row.get("lora") or 0))
    out = {}
    for method in ("analytic", "traced"):
        if method in methods:
            r = estimate(profile, method=method)
            out[method] = (r.peak_allocated_bytes, r.peak_reserved_bytes)
        else:
            out[method] = (float("nan"), float("nan"))
    return out


def _pct(x: float) -> str:
    return "-" if x != x else f"{x * 100:+.1f}%"


def _stats(errs: list[float]) -> str:
    a = [abs(e) for e in errs]
    return f"median {statistics.median(a) * 100:.1f}%, worst {max(a) * 100:.1f}% (n={len(a)})" if a else "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jsonl")
    ap.add_argument("--device", default="h200", help="HEADROOM_DEVICE the estimates are for")
    ap.add_argument("--md", default="", help="write the markdown table here")
    ap.add_argument("--methods", default="analytic,traced",
                    help="comma list; analytic alone takes seconds, traced ~20 s a row on 2 cores")
    args = ap.parse_args()
    os.environ["HEADROOM_DEVICE"] = args.device
    long_path = Path(tempfile.mkdtemp(prefix="headroom-score-")) / "long.jsonl"
    long_texts(long_path)
    rows = [json.loads(x) for x in Path(args.jsonl).read_text().splitlines() if x.strip()]
    lines = ["| model | mode | precision | ckpt | optim | B x T | data | measured alloc GiB | analytic | traced "
             "| measured reserved GiB | analytic | traced |", "|" + "---|" * 13]
    errs: dict[str, list[float]] = {k: [] for k in ("a_alloc", "t_alloc", "a_res", "t_res")}
    skipped = 0
    for row in rows:
        if row.get("rc") != 0 or not row.get("peak_allocated_bytes"):
            continue
        if row["optimizer"] == "sgd" and not (row.get("breakdown") or {}).get("optimizer", 1):
            # ran SGD without momentum (the engine's sgd before engine/optimizers.py); today's
            # "sgd" keeps a momentum buffer, so the row has no profile to re-estimate
            skipped += 1
            continue
        est = estimate_row(row, long_path, tuple(args.methods.split(",")))
        m_alloc, m_res = row["peak_allocated_bytes"], row["peak_reserved_bytes"]
        e = {"a_alloc": est["analytic"][0] / m_alloc - 1, "t_alloc": est["traced"][0] / m_alloc - 1,
             "a_res": est["analytic"][1] / m_res - 1, "t_res": est["traced"][1] / m_res - 1}
        for k, v in e.items():
            if v == v:  # not NaN: the method ran
                errs[k].append(v)
        optim = row["optimizer"] + (f" lora{row['lora']}" if row.get("lora") else "")
        lines.append(f"| {row['label']} | {row['mode']} | {row['precision']} | "
                     f"{'on' if row['checkpointing'] else 'off'} | {optim} | "
                     f"{row['batch']}x{row['seq']} | {row['data']} | {m_alloc / GIB:.3f} | "
                     f"{_pct(e['a_alloc'])} | {_pct(e['t_alloc'])} | {m_res / GIB:.3f} | "
                     f"{_pct(e['a_res'])} | {_pct(e['t_res'])} |")
        print(lines[-1], flush=True)
    summary = ["", f"- peak allocated, traced: {_stats(errs['t_alloc'])}",
               f"- peak allocated, analytic: {_stats(errs['a_alloc'])}",
               f"- peak reserved, traced: {_stats(errs['t_res'])}",
               f"- peak reserved, analytic: {_stats(errs['a_res'])}"]
    if skipped:
        summary.append(f"- not scored: {skipped} SGD rows measured without momentum (today's sgd "
                       "has momentum 0.9)")
    print("\n".join(summary))
    if args.md:
        Path(args.md).write_text("\n".join(lines + summary) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
