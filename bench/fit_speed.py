"""Fit the speed estimate's constants to measured tokens/s, and score it (issue 16).

    PYTHONPATH=. python bench/fit_speed.py                   # features (cached), fit, write, score
    PYTHONPATH=. python bench/fit_speed.py --no-write        # score the committed constants only
    PYTHONPATH=. python bench/fit_speed.py --extra DIR ...   # add rows of bench/gpu_speed.py runs

Rows: every measured run in bench/results with a model, mode, precision, batch and seq and a
steady step time (JSON lines): the H100 cross-checks (2026-11-25, after the allocator-read fix),
the H200 verification (2026-12-01: the cross-checks and the 11-architecture matrix), and the
gpt2 technique rows (a bare loop, 2026-11-25: for the ranking check). The H100 matrix's engine rows
predate the fix that removed up to 40 ms of allocator reads per step (docs/benchmarks.md §1) and are
scored but not fitted. Each row is traced once on meta tensors (``traced.trace_step`` with the
op counter: FLOPs per op from ``torch.utils.flop_counter``'s table, bytes per op) and cached in
``bench/results/speed_features.json``; the fit (Nelder-Mead on log constants, scipy) minimises the
mean absolute log error of the engine rows' tokens/s, within plausible ranges; the closed form's
constants are fitted to the traced counts (bytes, host ops). Output: the constants in
``engine/resources/speed_calibration.json`` and a Markdown table (``--md``) for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
FEATURES = RESULTS / "speed_features.json"
OUT = ROOT / "engine" / "resources" / "speed_calibration.json"

SOURCES = [  # (file, GPU key, kind, fitted)
    ("call3_h100_2026-11-25/cross.jsonl", "h100-sxm", "engine", True),
    ("verify_h200_2026-12-01/call1/cross.jsonl", "h200", "engine", True),
    # Rows measured one at a time (bench/gpu_speed.py, 2026-12-02): 8 and 20 steps per row.
    ("verify_h200_2026-12-02/call9/speed/gpu_speed.jsonl", "h200", "engine", True),
    ("verify_h200_2026-12-02/call10/speed20/gpu_speed.jsonl", "h200", "engine", True),
    # The matrix ran 4 rows at once: its peaks are per process, its tokens/s are not (bert's fp32
    # classifier inference read 80k tok/s there and 183k alone). Scored, not fitted.
    ("verify_h200_2026-12-01/call3/estimator_matrix.jsonl", "h200", "engine-parallel", False),
    ("measure_h100_2026-11-25/matrix.jsonl", "h100-sxm", "engine-prefix", False),
    ("call3_h100_2026-11-25/techniques.jsonl", "h100-sxm", "technique", False),
    ("call4_h100_2026-11-25/techniques2.jsonl", "h100-sxm", "technique", False),
]


def _model(name: str) -> str:
    return str(ROOT / "bench" / name) if name.startswith("configs/") else name


def load_rows(extra_dirs=()) -> list[dict]:
    rows = []
    files = [(RESULTS / f, g, k, fit) for f, g, k, fit in SOURCES]
    for d in extra_dirs:
        for f in sorted(Path(d).glob("*.jsonl")):
            files.append((f, None, "gpu_speed", True))
    for path, gpu, kind, fit in files:
        if not path.exists():
            continue
        for i, line in enumerate(path.read_text().splitlines()):
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue
            if d.get("rc", 0) not in (0, None) or d.get("oom") or not d.get("tokens_per_s"):
                continue
            row_kind = kind
            if kind.startswith("engine") and d.get("kind") == "bare":
                row_kind = "bare"
            if kind == "technique":
                cfg = d.get("config", {})
                if cfg.get("kind") != "model":
                    continue
                prof = dict(cfg["profile"])
                fields = {k: v for k, v in prof.items() if k != "steps"}
                step = d.get("s_per_step") or (prof["batch"] * prof["seq"] / d["tokens_per_s"])
                label = d.get("name", "")
                padded = False  # random ids, no mask
            else:
                fields = {"model": _model(d["model"]), "mode": d["mode"], "precision": d["precision"],
                          "batch": d["batch"], "seq": d["seq"],
                          "checkpointing": bool(d.get("checkpointing")),
                          "optimizer": d.get("optimizer", "adamw")}
                if d.get("task") not in (None, "auto"):
                    fields["task"] = d["task"]
                for extra in ("micro_batches",):  # bench/gpu_speed.py rows name them
                    if d.get(extra) is not None:
                        fields[extra] = d[extra]
                step = d["step_time_s"]
                label = d.get("label") or d["model"]
                padded = d.get("data", "builtin") == "builtin" and row_kind != "bare"
            g = gpu or d.get("gpu") or "h200"
            rows.append({"id": f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{i}",
                         "gpu": g, "kind": row_kind, "fit": fit and row_kind in ("engine", "gpu_speed"),
                         "label": label, "fields": fields, "padded": padded,
                         "step_s": float(step), "tokens_per_s": float(d["tokens_per_s"]),
                         "first_step_s": float(d.get("first_step_s") or 0.0),
                         "device_name": d.get("device_name") or d.get("device", "")})
    return rows


def features(rows: list[dict], refresh: bool = False) -> dict[str, dict]:
    """Traced and closed-form step costs per row (cached by the row's fields)."""
    from engine.estimate import speed, traced
    from engine.estimate.analytic import arch_of
    from engine.prepare import prepare
    from engine.profile import Profile

    cache = {} if refresh or not FEATURES.exists() else json.loads(FEATURES.read_text())
    out = {}
    for r in rows:
        key = json.dumps([r["fields"], r["padded"]], sort_keys=True).replace(str(ROOT), "")
        if key not in cache:
            p = Profile(target="cuda", padding="fixed", gpu=r["gpu"], **r["fields"])
            prepare(p)
            shape = (p.batch, p.seq)
            t0 = time.perf_counter()
            o = traced.trace_step(p, shape, has_padding=r["padded"], count_speed=True)
            costs = speed.traced_step_costs(o.costs, p.mode == "train", p.micro_batches)
            arch = arch_of(p)
            cache[key] = {"traced": costs.to_json(), "layers": arch.layers, "hidden": arch.hidden,
                          "params": arch.params, "tensors": len(arch.param_tensors),
                          "trace_s": time.perf_counter() - t0}
            print(f"traced {r['label']} {r['fields'].get('mode')} {r['fields'].get('precision')} "
                  f"{shape} in {cache[key]['trace_s']:.1f} s", file=sys.stderr, flush=True)
            FEATURES.write_text(json.dumps(cache))
        out[r["id"]] = cache[key]
    return out


#: Fitted constants and the ranges they may take: what the hardware and PyTorch make plausible
#: (efficiencies of a few tenths, a few microseconds per kernel and per op), so noisy rows cannot
#: push one constant to absorb another's time.
RANGES = {"e_matmul_half": (0.3, 0.85), "e_matmul_fp32": (0.4, 0.95), "e_attention": (0.15, 0.7),
          "e_memory": (0.4, 0.9), "kernel_floor_s": (1e-6, 8e-6), "host_op_s": (5e-6, 60e-6),
          "host_op_infer_s": (5e-6, 60e-6),
          "host_op_bwd_s": (2e-6, 30e-6), "step_fixed_s": (0.0, 0.03),
          "step_fixed_infer_s": (0.0, 0.01), "serial_share": (0.0, 1.0)}
PARAMS = tuple(RANGES)


_ARRAYS: dict[str, tuple] = {}


def _arrays(rid: str, f: dict):
    """The row's traced ops as numpy arrays (the fit evaluates thousands of calibrations)."""
    import numpy as np

    if rid not in _ARRAYS:
        rows = [k for p in f["traced"]["ops"].values() for k in p]
        cls = np.array([{"matmul": 0, "attention": 1, "memory": 2}[r[0]] for r in rows])
        _ARRAYS[rid] = (cls, np.array([bool(r[1]) for r in rows]), np.array([r[2] for r in rows], float),
                        np.array([r[3] for r in rows], float), np.array([r[4] for r in rows], float),
                        np.array([r[5] for r in rows], float),
                        sum(v for k, v in f["traced"]["host_ops"].items() if k != "backward"),
                        f["traced"]["host_ops"].get("backward", 0.0),
                        "backward" in f["traced"]["ops"] or "optimizer" in f["traced"]["ops"])
    return _ARRAYS[rid]


def _fast_step(arr, gpu, cal) -> float:
    """``speed.step_time`` vectorised (the same formula; ``check_fast`` compares them)."""
    import numpy as np

    cls, half, flops, nbytes, kernels, n, host_py, host_bwd, training = arr
    half_peak, fp32_peak = gpu.peak_flops("bf16"), gpu.peak_flops("fp32")
    rate = np.where(cls == 1, np.where(half, half_peak * cal.e_attention, fp32_peak * cal.e_matmul_fp32),
                    np.where(half, half_peak * cal.e_matmul_half, fp32_peak * cal.e_matmul_fp32))
    t = np.maximum(np.maximum(flops / rate, nbytes / (gpu.bandwidth * cal.e_memory)),
                   cal.kernel_floor_s * kernels)
    gpu_s = float((t * n).sum())
    host_s = host_py * (cal.host_op_s if training else cal.host_op_infer_s) + host_bwd * cal.host_op_bwd_s
    fixed = cal.step_fixed_s if training else cal.step_fixed_infer_s
    return max(gpu_s, host_s) + cal.serial_share * min(gpu_s, host_s) + fixed


def predict(rows, feats, cal, method="traced") -> list[float]:
    from engine import gpus
    from engine.estimate import speed

    out = []
    for r in rows:
        f = feats[r["id"]]
        if method == "traced":
            t = _fast_step(_arrays(r["id"], f), gpus.get(r["gpu"]), cal)
            b, s = r["fields"]["batch"], r["fields"]["seq"]
            out.append(b * s / t)
            continue
        else:
            from engine.estimate.analytic import arch_of
            from engine.profile import Profile

            p = Profile(target="cuda", padding="fixed", gpu=r["gpu"], **r["fields"])
            costs = _analytic_with(p, arch_of(p), cal)
        t = speed.step_time(costs, gpus.get(r["gpu"]), cal)["step_s"]
        b, s = r["fields"]["batch"], r["fields"]["seq"]
        out.append(b * s / t)
    return out


def _analytic_with(p, arch, cal):
    from engine.estimate import speed

    saved = speed.calibration
    speed.calibration = lambda: cal  # the closed form reads its constants from the calibration
    try:
        return speed.analytic_costs(p, arch, (p.batch, p.seq))
    finally:
        speed.calibration = saved


def errors(rows, preds) -> list[float]:
    return [p / r["tokens_per_s"] - 1 for r, p in zip(rows, preds)]


def fit(rows, feats, start, params=PARAMS, worst_weight: float = 0.0):
    """Fit ``params`` (default: all of RANGES), the others kept at ``start``'s values;
    ``worst_weight`` adds that share of the worst row's absolute log error to the objective."""
    import numpy as np
    from scipy.optimize import minimize

    from dataclasses import replace

    fitted = [r for r in rows if r["fit"]]

    def to_x(k, v):  # a range's value as an unbounded number (logit)
        lo, hi = RANGES[k]
        u = min(max((v - lo) / (hi - lo), 1e-3), 1 - 1e-3)
        return math.log(u / (1 - u))

    x0 = np.array([to_x(k, getattr(start, k)) for k in params])

    def cal_of(x):
        vals = {}
        for k, v in zip(params, x):
            lo, hi = RANGES[k]
            vals[k] = lo + (hi - lo) / (1 + math.exp(-max(-30.0, min(30.0, v))))
        return replace(start, **vals)

    def loss(x):
        preds = predict(fitted, feats, cal_of(x))
        logs = [abs(math.log(p / r["tokens_per_s"])) for r, p in zip(fitted, preds)]
        # the mean absolute log error: robust to the noisiest rows (the same settings measured
        # twice differ by up to 40% on these host-bound steps, docs/benchmarks.md §6.1)
        return statistics.fmean(logs) + worst_weight * max(logs)

    best = minimize(loss, x0, method="Nelder-Mead", options={"maxiter": 3000, "xatol": 1e-3,
                                                             "fatol": 1e-5})
    for _ in range(2):  # restarts from the optimum (Nelder-Mead stalls in 8 dimensions)
        best = minimize(loss, best.x, method="Nelder-Mead", options={"maxiter": 2000})
    return cal_of(best.x), best.fun


def fit_host_ops(rows, feats) -> dict:
    """The closed form's host-op model: per phase, non-negative ops per block feature
    (``speed.host_op_features``: Linear, norm, dropout modules, rotary positions, autocast casts)
    and a fixed count, least squares against the traced counts of every distinct row."""
    import numpy as np
    from scipy.optimize import nnls

    from engine.estimate import speed
    from engine.estimate.analytic import arch_of
    from engine.profile import Profile

    data: dict[str, list] = {"infer_forward": [], "train_forward": [], "backward": []}
    seen = set()
    for r in rows:
        f = r["fields"]
        key = json.dumps([f, r["padded"]], sort_keys=True)
        if key in seen or f.get("checkpointing") or int(f.get("micro_batches") or 1) > 1:
            continue  # recompute and micro-batches are scaled from these in the closed form
        seen.add(key)
        p = Profile(target="cuda", padding="fixed", gpu=r["gpu"], **f)
        arch = arch_of(p)
        x = speed.host_op_features(arch, p.precision != "fp32")
        row = [arch.layers * x[k] for k in speed.HOST_OP_FEATURES] + [1.0]
        host = speed.StepCosts.from_json(feats[r["id"]]["traced"]).host_ops
        if p.mode == "train":
            data["train_forward"].append((row, host.get("forward", 0.0)))
            data["backward"].append((row, host.get("backward", 0.0)))
        else:
            data["infer_forward"].append((row, host.get("forward", 0.0) + host.get("start", 0.0)))
    model = {}
    for phase, items in data.items():
        if len(items) < len(speed.HOST_OP_FEATURES) + 1:
            continue
        a = np.array([r for r, _ in items])
        y = np.array([v for _, v in items])
        coef, _ = nnls(a / y[:, None], np.ones(len(y)))  # relative error: small and large models alike
        model[phase] = {k: float(c) for k, c in zip((*speed.HOST_OP_FEATURES, "fixed"), coef)}
        fit = a @ coef
        worst = float(np.max(np.abs(fit / y - 1)))
        print(f"host ops {phase}: {len(y)} rows, worst {worst:.0%}", file=sys.stderr)
    return model


def fit_closed_form(rows, feats, cal):
    """Closed-form constants matched to the traced counts: host ops (by block modules) and the
    memory bytes."""
    from dataclasses import replace

    import numpy as np
    from scipy.optimize import minimize

    from engine.estimate import speed
    from engine.estimate.analytic import arch_of
    from engine.profile import Profile

    cal = replace(cal, host_ops_model=fit_host_ops(rows, feats))
    seen, items = set(), []
    for r in rows:
        key = json.dumps([r["fields"], r["padded"]], sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        p = Profile(target="cuda", padding="fixed", gpu=r["gpu"], **r["fields"])
        items.append((p, arch_of(p), speed.StepCosts.from_json(feats[r["id"]]["traced"]), r["gpu"]))
    names = ("act_bytes_per_token_hidden",)
    from engine import gpus

    def loss(x):
        c = replace(cal, **{k: math.exp(v) for k, v in zip(names, x)})
        total = 0.0
        for p, arch, tc, g in items:
            ac = _analytic_with(p, arch, c)
            ta, tt = speed.step_time(ac, gpus.get(g), c), speed.step_time(tc, gpus.get(g), c)
            total += abs(math.log(ta["step_s"] / tt["step_s"]))
            total += 0.5 * abs(math.log(max(ta["host_s"], 1e-9) / max(tt["host_s"], 1e-9)))
        return total / len(items)

    x0 = np.array([math.log(getattr(cal, k)) for k in names])
    best = minimize(loss, x0, method="Nelder-Mead", options={"maxiter": 400})
    return replace(cal, **{k: math.exp(v) for k, v in zip(names, best.x)})


def _spearman(a, b) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for pos, i in enumerate(order):
            r[i] = pos
        return r

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    if n < 2:
        return 1.0
    d = sum((x - y) ** 2 for x, y in zip(ra, rb))
    return 1 - 6 * d / (n * (n * n - 1))


def score(rows, feats, cal) -> tuple[list[str], dict]:
    traced = predict(rows, feats, cal, "traced")
    analytic = predict(rows, feats, cal, "analytic")
    et, ea = errors(rows, traced), errors(rows, analytic)
    md = ["| row | GPU | kind | mode | precision | ckpt | B×T | measured tok/s | traced est | err | "
          "analytic est | err |", "|---|---|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r, pt, pa, a, b in zip(rows, traced, analytic, et, ea):
        f = r["fields"]
        md.append(f"| {r['label']} | {r['gpu']} | {r['kind']} | {f.get('mode', 'train')} | {f.get('precision', 'fp32')} | "
                  f"{'yes' if f.get('checkpointing') else ''} | {f['batch']}×{f['seq']} | "
                  f"{r['tokens_per_s']:,.0f} | {pt:,.0f} | {a:+.0%} | {pa:,.0f} | {b:+.0%} |")
    summary = {}
    md += ["", "| set | rows | traced median abs err | traced worst | analytic median | analytic worst |",
           "|---|---:|---:|---:|---:|---:|"]
    groups = {}
    for r, a, b in zip(rows, et, ea):
        groups.setdefault(f"{r['kind']} {r['fields'].get('mode', 'train')}", []).append((a, b))
        if r["fit"]:
            groups.setdefault("fitted (all engine rows)", []).append((a, b))
    for name, vals in sorted(groups.items()):
        ta = [abs(a) for a, _ in vals]
        tb = [abs(b) for _, b in vals]
        summary[name] = {"rows": len(vals), "traced_median": statistics.median(ta),
                         "traced_worst": max(ta), "analytic_median": statistics.median(tb),
                         "analytic_worst": max(tb)}
        md.append(f"| {name} | {len(vals)} | {statistics.median(ta):.0%} | {max(ta):.0%} | "
                  f"{statistics.median(tb):.0%} | {max(tb):.0%} |")
    # ranking of technique rows (same model, same settings but one technique)
    tech = [(r, p, q) for r, p, q in zip(rows, traced, analytic) if r["kind"] == "technique"]
    if len(tech) >= 3:
        rho_t = _spearman([r["tokens_per_s"] for r, _, _ in tech], [p for _, p, _ in tech])
        rho_a = _spearman([r["tokens_per_s"] for r, _, _ in tech], [q for _, _, q in tech])
        summary["technique_ranking_spearman"] = {"traced": rho_t, "analytic": rho_a, "rows": len(tech)}
        md += ["", f"Ranking of the {len(tech)} gpt2 technique rows by tokens/s (Spearman ρ, "
                   f"estimated vs measured): traced {rho_t:+.2f}, analytic {rho_a:+.2f}.", "",
               "| technique | measured tok/s | measured rank | traced rank | analytic rank |",
               "|---|---:|---:|---:|---:|"]

        def order(v):
            s = sorted(range(len(v)), key=lambda i: -v[i])
            out = [0] * len(v)
            for pos, i in enumerate(s):
                out[i] = pos + 1
            return out

        om = order([r["tokens_per_s"] for r, _, _ in tech])
        ot = order([p for _, p, _ in tech])
        oa = order([q for _, _, q in tech])
        for (r, _, _), a, b, c in zip(tech, om, ot, oa):
            md.append(f"| {r['label']} | {r['tokens_per_s']:,.0f} | {a} | {b} | {c} |")
    return md, summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-write", action="store_true", help="score the committed constants only")
    ap.add_argument("--refresh", action="store_true", help="re-trace every row")
    ap.add_argument("--extra", nargs="*", default=[], help="folders of bench/gpu_speed.py JSON lines")
    ap.add_argument("--md", default="", help="write the score tables here")
    ap.add_argument("--worst-weight", type=float, default=0.0,
                    help="objective: mean absolute log error + this x the worst row's")
    ap.add_argument("--only", nargs="*", default=None, metavar="CONSTANT",
                    help="refit only these constants, the others kept at the committed values")
    args = ap.parse_args(argv)
    from dataclasses import asdict, replace

    from engine.estimate import speed

    rows = load_rows(args.extra)
    feats = features(rows, args.refresh)
    cal = speed.calibration()
    from engine import gpus

    r0 = rows[0]  # the vectorised step time is the engine's
    slow = speed.step_time(speed.StepCosts.from_json(feats[r0["id"]]["traced"]), gpus.get(r0["gpu"]), cal)
    fast = _fast_step(_arrays(r0["id"], feats[r0["id"]]), gpus.get(r0["gpu"]), cal)
    assert abs(slow["step_s"] - fast) < 1e-9 * max(1.0, fast), (slow, fast)
    if not args.no_write:
        if args.only:  # from the committed constants, only these move
            cal, val = fit(rows, feats, cal, tuple(args.only), args.worst_weight)
        else:
            cal, val = fit(rows, feats, speed.Calibration(), PARAMS, args.worst_weight)  # from the defaults, not the last fit
        firsts = [r["first_step_s"] - r["step_s"] for r in rows if r["fit"] and r["first_step_s"]]
        cal = replace(cal, first_shape_s=statistics.median(firsts) if firsts else cal.first_shape_s)
        cal = fit_closed_form(rows, feats, cal)
    md, summary = score(rows, feats, cal)
    fitted = summary.get("fitted (all engine rows)", {})
    if not args.no_write:
        cal = replace(cal, median_error=fitted.get("traced_median", 0.0),
                      worst_error=fitted.get("traced_worst", 0.0),
                      rows=fitted.get("rows", 0),
                      source=f"bench/fit_speed.py over {fitted.get('rows', 0)} measured engine rows "
                             "(H100 2026-11-25 cross-checks, H200 2026-12-01 cross-checks, H200 2026-12-02 rows "
                             "measured one at a time)")
        OUT.write_text(json.dumps({"constants": asdict(cal), "scores": summary}, indent=1) + "\n")
        print(f"wrote {OUT}", file=sys.stderr)
    text = "\n".join(md) + "\n"
    if args.md:
        Path(args.md).write_text(text)
    print(text)
    print(json.dumps(summary, indent=1), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
