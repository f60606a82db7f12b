"""Batching strategies measured on real text (issue 5), plus chunked inference of a long document.

Every run is its own process (`python -m engine measure ... --json`, as bench/gpu_measure_matrix.py
does), over the dataset's real batches, for two passes over the data (steps = 2 x the plan's batch
count, computed here with engine.batching.plan_batches on the tokenized corpus: the same code path
as measure), so the measure's `extra.passes` reports the first pass (every batch shape new: kernel
plans, autotuning) apart from the steady state (pass 2: the same batches again).

    PYTHONPATH=. python3 bench/gpu_batching.py --out $OUT/batching.jsonl [--budget-s 540]
    .venv/bin/python bench/gpu_batching.py --target cpu --smoke --out /tmp/b.jsonl   # local check

Strategies at equal peak memory: fixed / dynamic / bucketed / bucketed + pad_multiple 64 with
batch B=8, token-budget with max_tokens = B x 512 (the largest batch of every strategy is 8 x 512).
Models: gpt2 on the whole built-in corpus; Qwen2.5-0.5B (about 4x slower, 151k vocabulary) on a
deterministic subset (every --subset-every'th text of the built-in corpus, written as .jsonl).
bf16-amp training, max length 512. Order: gpt2 x 5, Qwen fixed and token-budget, chunked, the rest;
--budget-s is the wall-clock end of the whole script: no run starts without --min-run-s left, and a
run's timeout is the time left.

Chunked (--chunked, default on): gpt2 inference, bf16-amp, batch 1 on a .jsonl holding one long text
(>= 16384 tokens): chunk_input 512 over seq 16384 (32 windows, one at a time) vs one plain 512-token
forward of the same text. Target: peak within 10%.

One JSON line per run goes to --out as soon as the run ends; a markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from gpu_measure_matrix import KEEP, last_json, last_line, recorder, run  # noqa: E402

GiB = 2 ** 30
STRATEGIES = (  # (label, padding, pad_multiple, token budget?)
    ("fixed", "fixed", 1, False),
    ("dynamic", "dynamic", 1, False),
    ("bucketed", "bucketed", 1, False),
    ("bucketed+pad", "bucketed", 0, False),  # 0: --pad-multiple
    ("token-budget", "token-budget", 1, True),
    ("token-budget+pad", "token-budget", 0, True),  # few distinct shapes: fewer kernel plans
)


def write_jsonl(path: Path, texts) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for t in texts:
            fh.write(json.dumps({"text": t}) + "\n")


def plan_summary(model: str, dataset: str, seq: int, batch: int, padding: str, pad_multiple: int,
                 max_tokens: int) -> dict:
    """Plan size and padding of the strategy, computed as measure computes them."""
    from engine import batching, data
    from engine.profile import Profile

    p = Profile(model=model, seq=seq, batch=batch, padding=padding, pad_multiple=pad_multiple,
                max_tokens=max_tokens, dataset=dataset)
    key = (model, dataset)
    if key not in _LENGTHS:
        texts = data.load_texts(dataset, "")
        _LENGTHS[key] = [len(x) for x in data.tokenize(texts, data.tokenizer_for(p))]
    lengths = _LENGTHS[key]
    s = batching.summary_from_lengths(lengths, p)
    s["texts"] = len(lengths)
    return s


_LENGTHS: dict = {}


def main() -> int:
    ap = argparse.ArgumentParser(description="batching strategies and chunked inference, measured")
    ap.add_argument("--out", required=True, help="JSON lines output file")
    ap.add_argument("--target", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny models, tiny data (with --target cpu)")
    ap.add_argument("--models", default="", help="comma list (default gpt2,Qwen2.5-0.5B)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--pad-multiple", type=int, default=64)
    ap.add_argument("--passes", type=int, default=2, help="passes over the data per run")
    ap.add_argument("--precision", default="bf16-amp")
    ap.add_argument("--subset-every", type=int, default=6,
                    help="the second model runs on every N-th text of the built-in corpus")
    ap.add_argument("--budget-s", type=float, default=540.0, help="wall-clock end of the script")
    ap.add_argument("--min-run-s", type=float, default=25.0, help="start no run with less left")
    ap.add_argument("--chunked", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--chunk-model", default="", help="default gpt2 (tiny-gpt2 with --smoke)")
    ap.add_argument("--long-seq", type=int, default=16384)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--only", default="",
                    help="comma list of MODEL/STRATEGY (e.g. gpt2/token-budget,gpt2/chunked): run "
                         "just these, in this order (to finish a matrix a budget cut short)")
    args = ap.parse_args()

    started = time.perf_counter()
    from engine import data

    if args.smoke:
        models = [m for m in (args.models or "tiny-gpt2,tiny-llama").split(",") if m]
        args.seq, args.batch, args.pad_multiple = min(args.seq, 64), min(args.batch, 4), 16
        args.long_seq, args.window = min(args.long_seq, 1024), min(args.window, 64)
        chunk_model = args.chunk_model or "tiny-gpt2"
    else:
        models = [m for m in (args.models or "gpt2,Qwen2.5-0.5B").split(",") if m]
        chunk_model = args.chunk_model or "gpt2"

    tmp = Path(tempfile.mkdtemp(prefix="headroom-batching-"))
    corpus = list(data.load_texts("builtin", ""))
    datasets: dict[str, tuple[str, str]] = {}  # model -> (dataset, description)
    if args.smoke:
        small = tmp / "smoke.jsonl"
        write_jsonl(small, corpus[:16])
        for m in models:
            datasets[m] = (str(small), f"first 16 of {len(corpus)} built-in texts")
    else:
        sub = tmp / f"builtin_every{args.subset_every}.jsonl"
        write_jsonl(sub, corpus[::args.subset_every])
        for i, m in enumerate(models):
            datasets[m] = (("builtin", f"built-in corpus, all {len(corpus)} texts") if i == 0 else
                           (str(sub), f"every {args.subset_every}th built-in text "
                                      f"({len(corpus[::args.subset_every])} of {len(corpus)})"))

    # Runs in order of importance.
    def batching_runs(model: str, labels) -> list[dict]:
        out = []
        for label, padding, mult, budget in STRATEGIES:
            if label not in labels:
                continue
            max_tokens = args.batch * args.seq if budget else 0
            out.append({"kind": "batching", "model": model,
                        "strategy": label + (str(args.pad_multiple) if not mult else ""),
                        "padding": padding, "pad_multiple": mult or args.pad_multiple,
                        "max_tokens": max_tokens})
        return out

    all_labels = [s[0] for s in STRATEGIES]
    runs: list[dict] = []
    if models:
        runs += batching_runs(models[0], all_labels)
    for m in models[1:]:
        runs += batching_runs(m, ("fixed", "token-budget", "token-budget+pad"))
    if args.chunked:
        runs += [{"kind": "chunked", "model": chunk_model, "strategy": "chunked",
                  "seq": args.long_seq, "chunk_input": args.window},
                 {"kind": "chunked", "model": chunk_model, "strategy": "plain",
                  "seq": args.window, "chunk_input": 0}]
    for m in models[1:]:
        runs += batching_runs(m, ("dynamic", "bucketed", "bucketed+pad"))

    if args.only:
        every = {f"{r['model']}/{r['strategy']}": r for r in runs}
        for m in models:
            every.update({f"{r['model']}/{r['strategy']}": r for r in batching_runs(m, all_labels)})
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in every]
        if unknown:
            sys.exit(f"gpu_batching: unknown --only entries {unknown}; known: {sorted(every)}")
        runs = [every[w] for w in wanted]
        args.chunked = any(r["kind"] == "chunked" for r in runs)

    long_path = tmp / "long.jsonl"
    if args.chunked:
        from engine.profile import Profile

        tok = data.tokenizer_for(Profile(model=chunk_model))
        parts: list[str] = []
        text, n_tokens = "", 0
        while n_tokens < args.long_seq and corpus and len(parts) < 20 * len(corpus):
            parts += [corpus[(len(parts) + k) % len(corpus)] for k in range(50)]
            text = "\n\n".join(parts)
            n_tokens = len(data.tokenize([text], tok)[0])
        write_jsonl(long_path, [text])
        print(f"long document: {len(text):,} characters, {n_tokens:,} tokens "
              f"(runs use the first {args.long_seq})", flush=True)

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with out_path.open("w", encoding="utf-8") as fh:
        record = recorder(fh, rows, started, lambda row: f"{row['model']:<14} {row['strategy']:<15}",
                          "useful_tokens_per_s", "useful tok/s")

        for spec in runs:
            row = dict(spec, target=args.target, precision=args.precision)
            try:
                if spec["kind"] == "batching":
                    dataset, desc = datasets[spec["model"]]
                    plan = plan_summary(spec["model"], dataset, args.seq, args.batch, spec["padding"],
                                        spec["pad_multiple"], spec["max_tokens"])
                    steps = args.passes * plan["n_batches"]
                    row.update(dataset=desc, mode="train", batch=args.batch, seq=args.seq, steps=steps,
                               plan=plan)
                    cmd = ["--mode", "train", "--dataset", dataset, "--batch", str(args.batch),
                           "--seq", str(args.seq), "--padding", spec["padding"],
                           "--pad-multiple", str(spec["pad_multiple"]), "--steps", str(steps)]
                    if spec["max_tokens"]:
                        cmd += ["--max-tokens", str(spec["max_tokens"])]
                else:
                    steps = 3
                    row.update(dataset="one long text (built-in texts joined)", mode="infer",
                               batch=1, steps=steps)
                    cmd = ["--mode", "infer", "--dataset", str(long_path), "--batch", "1",
                           "--seq", str(spec["seq"]), "--steps", str(steps), "--padding", "fixed"]
                    if spec["chunk_input"]:
                        cmd += ["--chunk-input", str(spec["chunk_input"])]
            except Exception as exc:  # noqa: BLE001 - record and go on
                record(dict(row, rc=-2, wall_s=0.0, error=f"{type(exc).__name__}: {exc}"))
                continue
            left = args.budget_s - (time.perf_counter() - started)
            if left < args.min_run_s:
                record(dict(row, rc=-1, wall_s=0.0, error="skipped: time budget spent"))
                continue
            full = [sys.executable, "-m", "engine", "measure", "--model", spec["model"],
                    "--precision", args.precision, "--target", args.target, "--json"] + cmd
            row["command"] = " ".join(full[1:])
            try:
                rc, out, err, wall = run(full, left)
            except Exception as exc:  # noqa: BLE001
                record(dict(row, rc=-2, wall_s=0.0, error=f"{type(exc).__name__}: {exc}"))
                continue
            row.update(rc=rc, wall_s=wall)
            result = last_json(out)
            if result is not None and rc in (0, 3):
                row.update({k: result[k] for k in KEEP if k in result and k != "timeline"})
                row["distinct_shapes"] = result.get("distinct_shapes")
            else:
                row["error"] = last_line(err) or last_line(out) or f"exit status {rc}"
            record(row)

    print()
    print(table(rows))
    print()
    print(chunk_table(rows))
    print(f"\nwrote {len(rows)} rows to {out_path} in {time.perf_counter() - started:.0f} s "
          f"on {next((r['device_name'] for r in rows if r.get('device_name')), args.target)}")
    return 0


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def table(rows: list[dict]) -> str:
    head = ("| model | data | strategy | batch / max_tokens | steps (plan x passes) | useful tok/s | "
            "speed-up vs fixed | padded % | peak alloc GiB | peak vs fixed | distinct shapes | "
            "first pass s/step | steady s/step | first/steady (time per token) | "
            "same, excl. step 0 | status |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    fixed = {r["model"]: r for r in rows if r["kind"] == "batching" and r["strategy"] == "fixed"
             and r.get("rc") == 0}
    for r in rows:
        if r["kind"] != "batching":
            continue
        status = "OOM" if r.get("oom") else ("ok" if r.get("rc") == 0 else (r.get("error") or "")[:60])
        size = f"max_tokens {r['max_tokens']}" if r.get("max_tokens") else f"B={r.get('batch')}"
        if r.get("pad_multiple", 1) > 1:
            size += f", pad x{r['pad_multiple']}"
        plan = r.get("plan") or {}
        n_plan = plan.get("n_batches", 0)
        passes = (r.get("extra") or {}).get("passes") or {}
        first, steady = passes.get("first_pass") or {}, passes.get("steady") or {}
        useful = r.get("useful_tokens_per_s")
        base = fixed.get(r["model"])
        speed = useful / base["useful_tokens_per_s"] if useful and base and base.get(
            "useful_tokens_per_s") else None
        peak = r.get("peak_allocated_bytes")
        peak_rel = peak / base["peak_allocated_bytes"] if peak and base and base.get(
            "peak_allocated_bytes") else None
        real, padded = r.get("real_tokens"), r.get("padded_tokens")
        padded_pct = (padded - real) / padded * 100 if padded else None
        excl = None
        if first.get("tokens_per_s_excl_step0") and steady.get("tokens_per_s"):
            excl = steady["tokens_per_s"] / first["tokens_per_s_excl_step0"]
        lines.append("| " + " | ".join([
            r["model"], r.get("dataset", ""), r["strategy"], size,
            f"{r.get('steps')} ({n_plan} x {r.get('steps', 0) // max(n_plan, 1)})",
            _f(useful, ",.0f"), _f(speed, ".2f") + ("x" if speed else ""), _f(padded_pct, ".1f"),
            _f(peak / GiB if peak else None, ".3f"), _f(peak_rel, ".3f"), _f(r.get("distinct_shapes"), "d"),
            _f(first.get("s_per_step"), ".4f"), _f(steady.get("s_per_step"), ".4f"),
            _f(passes.get("first_over_steady"), ".3f"), _f(excl, ".3f"), status]) + " |")
    return "\n".join(lines)


def chunk_table(rows: list[dict]) -> str:
    chunk = [r for r in rows if r["kind"] == "chunked"]
    if not chunk:
        return "(no chunked runs)"
    head = ("| model | run | seq | chunk_input | peak alloc GiB | weights GiB | peak - weights MiB | "
            "ratio to plain | activations ratio | tokens/s | status |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    plain = next((r for r in chunk if r["strategy"] == "plain" and r.get("rc") == 0), None)
    for r in chunk:
        status = "OOM" if r.get("oom") else ("ok" if r.get("rc") == 0 else (r.get("error") or "")[:60])
        peak = r.get("peak_allocated_bytes")
        weights = (r.get("extra") or {}).get("weights_bytes")
        ratio = act_ratio = None
        if plain and peak:
            ratio = peak / plain["peak_allocated_bytes"]
            pw = (plain.get("extra") or {}).get("weights_bytes")
            if weights is not None and pw is not None and plain["peak_allocated_bytes"] - pw > 0:
                act_ratio = (peak - weights) / (plain["peak_allocated_bytes"] - pw)
        lines.append("| " + " | ".join([
            r["model"], r["strategy"], str(r.get("seq")), str(r.get("chunk_input")),
            _f(peak / GiB if peak else None, ".4f"), _f(weights / GiB if weights else None, ".4f"),
            _f((peak - weights) / 2 ** 20 if peak and weights is not None else None, ".1f"),
            _f(ratio, ".3f"), _f(act_ratio, ".3f"), _f(r.get("tokens_per_s"), ",.0f"), status]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
