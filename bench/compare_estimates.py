"""Estimators (analytic and traced, ``--target cuda``) against the H100 runs of 2026-11-24/25.

    PYTHONPATH=. .venv/bin/python bench/compare_estimates.py \
        --out bench/results/estimates_vs_h100_2026-11-25.md [--timing] [--only matrix,probe,...]

Reads the measured JSON lines under bench/results/ (no GPU needed), estimates every run with the
profile and batch shape that really ran, and writes markdown tables: per data source, measured
peak allocated / reserved (and device used where runs were one process at a time) against both
estimators, with signed relative errors ``estimate / measured - 1``, then median and worst
absolute errors. Sources and what "really ran" means for each:

* ``matrix``: ``headroom measure`` (bench/gpu_measure_matrix.py), fixed padding on a generated
  dataset of long texts: every batch is (8, 512) with an all-ones attention mask (no padding).
  kind=bare rows of that file are skipped (Qwen/Llama bare rows were built in bf16 by mistake);
  call3's cross.jsonl bare rows equal the engine's peaks to the byte (listed, not re-scored).
* ``probe``: bench/gpu_probe.py (a bare loop, random tokens, every row but the first padded, MLM
  labels for encoders; run 3 processes at a time, so device-used is not comparable). Qwen2.5 /
  Llama / TinyLlama rows ran with bf16 weights (the config's torch_dtype) even when labelled
  fp32 or bf16-amp: they are estimated as pure ``bf16`` (the probe's own evidence: the fp32,
  bf16-amp and bf16 rows of one shape have byte-identical peaks). Decoder inference rows kept the
  KV cache (``use_cache`` on; ``measure`` and the estimators switch it off): listed, not scored.
* ``techniques``: bench/gpu_techniques.py model rows (gpt2, random tokens, no attention mask,
  labels = ids, AdamW, bf16 autocast): estimated at (batch, seq) without padding.
* ``batching``: ``headroom measure`` over the built-in corpus (variable-length batches): estimated
  by ``estimate()`` over this machine's corpus (the estimator picks the worst batch shape), and
  also at the worst shape the GPU run's plan reported (8 x 512).

Scored rows: a row is in the statistics unless its "note" says why not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RES = ROOT / "bench" / "results"
GIB = 2**30
MIB = 2**20
HALF_WEIGHT_FAMILIES = ("Qwen2.5", "Llama", "TinyLlama")
SEEDS = range(6)  # plan seeds for the traced reserved spread of variable-shape batching rows


@dataclass
class Row:
    source: str
    label: str
    fields: dict  # Profile fields
    shape: tuple[int, int] | None  # None: estimate() over the dataset
    padded: bool
    alloc: int
    reserved: int
    used: int | None = None  # device used, only where runs were one process at a time
    scored: bool = True
    note: str = ""
    est: dict = field(default_factory=dict)  # method -> EstimateResult


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _label(f: dict, shape=None) -> str:
    b, t = shape or (f.get("batch", 8), f.get("seq", 512))
    bits = [f["model"], f.get("mode", "train"), f.get("precision", "fp32")]
    if f.get("checkpointing"):
        bits.append("ckpt")
    if f.get("attn", "sdpa") != "sdpa":
        bits.append(f["attn"])
    return " ".join(bits) + f" {b}x{t}"


# ----- data sources -------------------------------------------------------------------------------
def matrix_rows() -> list[Row]:
    rows = []
    for r in _jsonl(RES / "measure_h100_2026-11-25" / "matrix.jsonl"):
        if r.get("kind") != "engine" or not r.get("peak_allocated_bytes"):
            continue
        f = {k: r[k] for k in ("model", "mode", "precision", "checkpointing", "batch", "seq")}
        rows.append(Row("matrix", _label(f), f, (r["batch"], r["seq"]), False,
                        r["peak_allocated_bytes"], r["peak_reserved_bytes"],
                        r.get("device_used_bytes")))
    return rows


def probe_rows() -> list[Row]:
    rows = []
    for r in _jsonl(RES / "probe_h100_2026-11-24.jsonl"):
        if "probe" in r or "error" in r or not r.get("peak_allocated_bytes"):
            continue
        f = {"model": r["model"], "mode": r.get("mode", "train"),
             "precision": r.get("precision", "fp32"), "checkpointing": bool(r.get("checkpointing")),
             "batch": r["batch"], "seq": r["seq"], "attn": r.get("attn") or "sdpa"}
        label = _label(f)
        notes, scored = [], True
        if r["model"].startswith(HALF_WEIGHT_FAMILIES) and f["precision"] not in ("bf16", "fp16"):
            notes.append(f"ran with bf16 weights (labelled {f['precision']}): estimated as bf16")
            f["precision"] = "bf16"
        decoder = not r["model"].startswith(("bert", "distilbert"))
        if f["mode"] == "infer" and decoder:
            notes.append("KV cache kept (use_cache on): not scored")
            scored = False
        padded = bool(r.get("padded", True)) and r["batch"] > 1
        rows.append(Row("probe", label, f, (r["batch"], r["seq"]), padded,
                        r["peak_allocated_bytes"], r["peak_reserved_bytes"], None, scored,
                        "; ".join(notes)))
    return rows


def technique_rows() -> list[Row]:
    rows = []
    for path in (RES / "call3_h100_2026-11-25" / "techniques.jsonl",
                 RES / "call4_h100_2026-11-25" / "techniques2.jsonl"):
        for r in _jsonl(path):
            if r.get("kind") != "model" or not r.get("ok"):
                continue
            prof = dict(r["config"]["profile"])
            prof.pop("steps", None)
            rows.append(Row("techniques", r["name"], prof, (prof["batch"], prof["seq"]), False,
                            r["peak_allocated_bytes"], r["peak_reserved_bytes"]))
    return rows


def _qwen_subset(every: int = 6) -> str:
    """bench/gpu_batching.py's subset: every 6th built-in text (of this machine's corpus)."""
    from engine import data

    path = Path(tempfile.gettempdir()) / f"headroom-compare-builtin_every{every}.jsonl"
    corpus = list(data.load_texts("builtin", ""))
    with path.open("w", encoding="utf-8") as fh:
        for t in corpus[::every]:
            fh.write(json.dumps({"text": t}) + "\n")
    return str(path)


def batching_rows() -> list[Row]:
    rows = []
    subset = None
    for path in (RES / "batching_h100_2026-11-25" / "batching.jsonl",
                 RES / "call4_h100_2026-11-25" / "batching2.jsonl"):
        for r in _jsonl(path):
            if r.get("rc") != 0 or not r.get("peak_allocated_bytes"):
                continue
            f = {"model": r["model"], "mode": r["mode"], "precision": r["precision"],
                 "batch": r["batch"], "seq": r["seq"]}
            if r["kind"] == "chunked":
                # one long text (>= 16384 tokens): every window full, no padding
                if r["strategy"] == "chunked":
                    f["chunk_input"] = 512
                label = f"gpt2 infer chunked {r['seq']} in windows of 512" \
                    if r["strategy"] == "chunked" else "gpt2 infer plain 1x512"
                rows.append(Row("batching", label, f, (r["batch"], r["seq"]), False,
                                r["peak_allocated_bytes"], r["peak_reserved_bytes"],
                                r.get("device_used_bytes")))
                continue
            f.update(padding=r["padding"], pad_multiple=r["pad_multiple"] or 1,
                     max_tokens=r["max_tokens"] or 0)
            if r["model"] == "gpt2":
                f["dataset"] = "builtin"
            else:
                subset = subset or _qwen_subset()
                f["dataset"] = subset
            label = f"{r['model']} {r['strategy']} (GPU plan: {r['plan']['n_batches']} batches)"
            rows.append(Row("batching", label, f, None, True, r["peak_allocated_bytes"],
                            r["peak_reserved_bytes"], r.get("device_used_bytes")))
    return rows


SOURCES = {"matrix": matrix_rows, "probe": probe_rows, "techniques": technique_rows,
           "batching": batching_rows}


# ----- estimating -----------------------------------------------------------------------------------
def run_estimates(rows: list[Row], log) -> None:
    from engine.estimate import estimate, estimate_shape
    from engine.profile import Profile

    for i, row in enumerate(rows):
        p = Profile(target="cuda", **row.fields)
        for m in ("analytic", "traced"):
            t0 = time.perf_counter()
            if row.shape is None:
                row.est[m] = estimate(p, m)
            else:
                row.est[m] = estimate_shape(p, row.shape, row.padded, m)
            row.est[m + "_s"] = time.perf_counter() - t0
        if row.shape is None and p.padding != "fixed":
            # Reserved over a plan depends on the batches' order (fragmentation.py); the GPU's
            # corpus gave another plan, so show the spread over seeds (seed 0 ran).
            vals = [row.est["traced"].peak_reserved_bytes] + [
                estimate(p.replace(seed=s), "traced").peak_reserved_bytes for s in SEEDS[1:]]
            row.est["seed_range"] = (min(vals), max(vals))
        log(f"[{i + 1}/{len(rows)}] {row.source}: {row.label}: measured "
            f"{row.alloc / GIB:.3f} GiB, analytic {row.est['analytic'].peak_allocated_bytes / GIB:.3f}"
            f", traced {row.est['traced'].peak_allocated_bytes / GIB:.3f} "
            f"({row.est['traced_s']:.1f} s)")


def _err(est: int, meas: int) -> float:
    return est / meas - 1


def _pct(x: float) -> str:
    return f"{x * 100:+.1f}%"


def _g(x: int | None) -> str:
    return "-" if x is None else f"{x / GIB:.3f}"


def _stats(values: list[float]) -> str:
    if not values:
        return "- | -"
    a = [abs(v) for v in values]
    return f"{statistics.median(a) * 100:.1f}% | {max(a) * 100:.1f}%"


def source_table(rows: list[Row], title: str) -> list[str]:
    used = any(r.used for r in rows)
    shape_col = any(r.shape is None for r in rows)
    head = ["config", "measured alloc GiB", "analytic GiB", "err", "traced GiB", "err",
            "measured reserved GiB", "est. reserved GiB (traced)", "err", "reserved (analytic)",
            "err"]
    if used:
        head += ["measured used GiB", "est. used GiB (traced)", "err"]
    if shape_col:
        head += ["est. worst batch", f"traced reserved GiB, seeds {SEEDS[0]}-{SEEDS[-1]}"]
    head += ["note"]
    out = [f"### {title}", "", "| " + " | ".join(head) + " |",
           "|" + "|".join("---" if i == 0 or h == "note" else "---:"
                          for i, h in enumerate(head)) + "|"]
    for r in rows:
        a, t = r.est["analytic"], r.est["traced"]
        cells = [r.label + ("" if r.scored else " (not scored)"), _g(r.alloc),
                 _g(a.peak_allocated_bytes), _pct(_err(a.peak_allocated_bytes, r.alloc)),
                 _g(t.peak_allocated_bytes), _pct(_err(t.peak_allocated_bytes, r.alloc)),
                 _g(r.reserved), _g(t.peak_reserved_bytes),
                 _pct(_err(t.peak_reserved_bytes, r.reserved)), _g(a.peak_reserved_bytes),
                 _pct(_err(a.peak_reserved_bytes, r.reserved))]
        if used:
            cells += ([_g(r.used), _g(t.device_used_bytes),
                       _pct(_err(t.device_used_bytes, r.used))] if r.used else ["-", "-", "-"])
        if shape_col:
            cells += ["x".join(map(str, t.peak_batch_shape)) if r.shape is None else "-"]
            sr = r.est.get("seed_range")
            cells += [f"{sr[0] / GIB:.2f}-{sr[1] / GIB:.2f}"
                      + (" (measured inside)" if sr[0] <= r.reserved <= sr[1] else "")
                      if sr else "-"]
        cells += [r.note]
        out.append("| " + " | ".join(cells) + " |")
    out += [""] + summary_table(rows) + [""]
    return out


def _errors(rows: list[Row]) -> dict[str, list[float]]:
    s = [r for r in rows if r.scored]
    e = {
        "allocated, analytic": [_err(r.est["analytic"].peak_allocated_bytes, r.alloc) for r in s],
        "allocated, traced": [_err(r.est["traced"].peak_allocated_bytes, r.alloc) for r in s],
        "reserved, traced": [_err(r.est["traced"].peak_reserved_bytes, r.reserved) for r in s],
        "reserved, analytic": [_err(r.est["analytic"].peak_reserved_bytes, r.reserved) for r in s],
        "device used, traced": [_err(r.est["traced"].device_used_bytes, r.used)
                                for r in s if r.used],
        "device used, analytic": [_err(r.est["analytic"].device_used_bytes, r.used)
                                  for r in s if r.used],
    }
    return {k: v for k, v in e.items() if v}


def summary_table(rows: list[Row]) -> list[str]:
    n = sum(r.scored for r in rows)
    out = [f"| {n} scored rows | median abs. error | worst abs. error |", "|---|---:|---:|"]
    for k, v in _errors(rows).items():
        out.append(f"| {k} | {_stats(v).replace(' | ', ' | ')} |")
    return out


def headline(rows: list[Row]) -> list[str]:
    out = ["| source | rows | alloc analytic median / worst | alloc traced median / worst | "
           "reserved traced median / worst | reserved analytic median / worst | "
           "device used traced median / worst |", "|---|---:|---:|---:|---:|---:|---:|"]
    groups = {}
    for r in rows:
        groups.setdefault(r.source, []).append(r)
    groups["all"] = rows
    for name, rs in groups.items():
        e = _errors(rs)
        cells = [name, str(sum(r.scored for r in rs))]
        for k in ("allocated, analytic", "allocated, traced", "reserved, traced",
                  "reserved, analytic", "device used, traced"):
            cells.append(_stats(e.get(k, [])).replace(" | ", " / "))
        out.append("| " + " | ".join(cells) + " |")
    return out


# ----- timing ------------------------------------------------------------------------------------
def timing_table(log) -> list[str]:
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_estimators import QWEN15
    from engine.estimate import estimate
    from engine.profile import Profile

    qwen15 = Path(tempfile.mkdtemp(prefix="headroom-qwen15-"))
    (qwen15 / "config.json").write_text(json.dumps(QWEN15))
    cases = [
        ("gpt2 train bf16-amp 8x512", Profile(model="gpt2", batch=8, seq=512,
                                              precision="bf16-amp")),
        ("Qwen2.5-0.5B train bf16-amp 8x512", Profile(model="Qwen2.5-0.5B", batch=8, seq=512,
                                                      precision="bf16-amp")),
        ("Llama-3.2-1B (1.24 B) train bf16-amp 8x512",
         Profile(model="Llama-3.2-1B", batch=8, seq=512, precision="bf16-amp")),
        ("Qwen2.5-1.5B config (1.54 B, not a preset) train bf16-amp 8x512",
         Profile(model=str(qwen15), batch=8, seq=512, precision="bf16-amp")),
        ("Qwen2.5-1.5B config train bf16-amp ckpt 4x1024",
         Profile(model=str(qwen15), batch=4, seq=1024, precision="bf16-amp", checkpointing=True)),
        ("gpt2 train bf16-amp token-budget 4096, built-in corpus (plan replay)",
         Profile(model="gpt2", batch=8, seq=512, precision="bf16-amp", padding="token-budget",
                 max_tokens=4096)),
        ("Qwen2.5-1.5B config train bf16-amp token-budget 4096, built-in corpus (plan replay)",
         Profile(model=str(qwen15), batch=8, seq=512, precision="bf16-amp",
                 padding="token-budget", max_tokens=4096)),
    ]
    out = [f"CPU: {os.cpu_count()} cores; torch threads {_threads()}. Analytic cold = first "
           "estimate of the model (config load, arch facts), warm = median of 5 edits (new batch "
           "size, same model); traced cold = first trace (builds the meta model), warm = a second "
           "trace of the same architecture at a new batch size. Token-budget rows: analytic cold "
           "includes tokenizing the built-in corpus; traced includes the plan replay (the worst "
           "shape's trace plus up to 4 one-step traces of the batches that grow the cache).", "",
           "| profile | analytic cold ms | analytic warm ms | traced cold s | traced warm s |",
           "|---|---:|---:|---:|---:|"]
    for name, p in cases:
        t0 = time.perf_counter()
        estimate(p, "analytic")
        cold = (time.perf_counter() - t0) * 1000
        warm = []
        for i in range(5):
            q = p.replace(batch=p.batch + 1 + i)
            t0 = time.perf_counter()
            estimate(q, "analytic")
            warm.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        estimate(p.replace(batch=p.batch + 7), "traced")
        tcold = time.perf_counter() - t0
        t0 = time.perf_counter()
        estimate(p, "traced")
        twarm = time.perf_counter() - t0
        log(f"timing {name}: {cold:.1f} / {statistics.median(warm):.2f} ms, "
            f"{tcold:.2f} / {twarm:.2f} s")
        out.append(f"| {name} | {cold:.1f} | {statistics.median(warm):.2f} | {tcold:.2f} | "
                   f"{twarm:.2f} |")
    return out


def _threads() -> int:
    import torch

    return torch.get_num_threads()


FIXES = """## Fixes made from this comparison (before -> after, allocated error)

Before = the same script at `e7faee3` (engine/estimate unchanged since the runs); tests in
tests/test_estimate.py (`test_fp32_gqa_without_mask_runs_math_on_cuda`,
`test_traced_local_attention_takes_the_cuda_path`, `test_analytic_distillation_close_to_traced`,
`test_analytic_unstructured_pruning_saves_and_costs_nothing`,
`test_device_used_context_by_mode_and_precision`) fail before and pass after.

| fix | row | analytic | traced |
|---|---|---:|---:|
| CUDA SDPA choice: the efficient kernel rejects grouped-query heads, so fp32 GQA without a mask (transformers passes `enable_gqa`) runs **math** and keeps T x T probabilities (cuda_emulation.choose_backend; analytic math-GQA branch) | matrix Qwen2.5-0.5B train fp32 8x512 | -12.5% -> +0.3% | -12.5% -> -0.1% |
| same | matrix Llama-3.2-1B train fp32 8x512 | -12.9% -> +0.7% | -12.9% -> +0.0% |
| traced: `--attn local:W` on a CUDA target took the blocked CPU fallback (meta tensors fail `flex_available`); now FlexAttention is emulated (output + fp32 logsumexp) | techniques local:128 T=1024 | +4.4% (unchanged) | +18.1% -> +1.0% |
| analytic distillation: teacher weights counted in fp32 (the technique casts the teacher to bf16 on CUDA for bf16-amp) and the loss's N x V tensors undercounted (both upcasts, the shifted reshape copies, both log-softmaxes, kl_div's elementwise terms) | techniques distill from gpt2-medium | -10.4% -> +2.1% | -0.1% (unchanged) |
| analytic unstructured pruning counted weight_orig + mask, but the technique makes pruning permanent (`prune.remove`) | techniques unstructured:0.5 | +8.2% -> +3.7% | -0.3% (unchanged) |
| device.py: CUDA context recalibrated from the matrix's device_used - reserved (identical to the MiB across models: 687 MiB fp32 inference, +8 MiB per handle for half-precision kernels, +64 MiB in training for autograd's thread) | matrix device used, traced median / worst | | 0.8% / 18.9% -> 0.5% / 7.5% |

Summary before the fixes (after is the Summary above): allocated analytic median / worst 3.2% /
14.6%, traced 0.3% / 18.1%; technique rows within 5%: traced 11/12, analytic 9/12.
"""

GAPS = """## What is left (not fixed here)

* **Reserved memory with many batch shapes** (dynamic, bucketed, token-budget without
  pad-multiple). The traced estimator now replays the allocator model, in plan order, over the
  batches that grow the cache: each batch whose analytic step peak exceeds every earlier one, up
  to the worst batch, with at most 4 one-step traces besides the worst shape
  (engine/estimate/fragmentation.py). Batching rows, traced reserved median / worst:
  - before (one step at the worst shape): 8.8% / 54.6%; every variable-shape row was 25-55% low;
  - after: 10.3% / 39.4%; the signed errors run from -39% to +27%.

  Reserved depends on the batches' *order*, and the GPU's corpus (4,883 texts) gave another
  plan than this machine's (6,176). The "seeds" column shows the spread over plan seeds 0-5 here:
  - the measured value lies inside it for gpt2 dynamic, gpt2 token-budget and Qwen
    token-budget+pad64;
  - it lies just outside for gpt2 bucketed (9.94 vs at most 9.53), gpt2 token-budget+pad64
    (7.42, the single-step value, vs at least 7.46) and Qwen token-budget (45.6 vs at most 41.7).

  A row-by-row check needs a GPU run that estimates and measures the same plan. The analytic
  estimator keeps its single-step model and adds a note. Qwen fixed (-8.5%, 2 shapes) is a
  single-shape gap on padded batches, not fragmentation. Device-used rows inherit the reserved
  gap, plus up to ~110 MiB of extra kernels.
* **BERT under bf16 autocast**: both estimators are high by ~4% (8.4% traced / 14.6% analytic
  with checkpointing); BERT fp32 and GPT-2/Qwen/Llama bf16-amp are within 1%. Needs the
  `--diag` saved-tensor comparison on a GPU (bench/bench_estimators.py --diag
  bert-base-uncased --precision bf16-amp) to find which tensor differs.
* **Analytic** is systematically 3-5% high on GPT-2 bf16-amp and 6-14% high for half-weight
  Llama/TinyLlama without checkpointing (probe rows); medians meet the target, worsts do not.
* **Probe decoder inference rows** kept the KV cache and are not scored; a rerun of
  bench/gpu_probe.py (now `use_cache` off) would add them. No fp16-amp / pure-bf16 rows for
  Qwen/Llama exist with fp32 master weights.
"""


# ----- main ----------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(RES / "estimates_vs_h100_2026-11-25.md"))
    ap.add_argument("--only", default="", help="comma list of sources: " + ",".join(SOURCES))
    ap.add_argument("--timing", action="store_true", help="also time the estimators")
    ap.add_argument("--json", default="", help="also write per-row numbers as JSON lines")
    args = ap.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    wanted = [s for s in args.only.split(",") if s] or list(SOURCES)
    started = time.perf_counter()
    per_source = {s: SOURCES[s]() for s in wanted}
    rows = [r for rs in per_source.values() for r in rs]
    run_estimates(rows, log)
    import torch
    import transformers

    from engine.estimate import device

    c = device.constants("cuda")
    md = ["# Estimators vs H100 measurements (2026-11-24/25)", "",
          "Generated by `PYTHONPATH=. .venv/bin/python bench/compare_estimates.py --timing "
          "--out bench/results/estimates_vs_h100_2026-11-25.md` (no GPU needed) at commit "
          f"`{_git_head()}` + working tree; estimates with torch {torch.__version__}, "
          f"transformers {transformers.__version__} on CPU, `--target cuda`, device constants "
          f"`{c.name}` (context {c.context_bytes / MIB:.0f} MiB"
          + (f" + {c.context_train_extra_bytes / MIB:.0f} MiB training"
             f" + {c.context_half_bytes / MIB:.0f} MiB per half-precision cuBLAS handle"
             if hasattr(c, "context_train_extra_bytes") else "") + "). "
          "Measured: H100 80GB HBM3, torch 2.11.0+cu130, transformers 5.17.0.", "",
          "Errors are `estimate / measured - 1`; medians and worsts are of absolute errors over "
          "the scored rows. \"reserved (traced)\" is the allocator model replayed over the traced "
          "step's allocations; \"reserved (analytic)\" is the analytic estimator's own reserved "
          "model. Device used = reserved + CUDA context, compared only where each run had the "
          "device to itself (matrix and batching rows; the probe ran 3 processes at a time).", "",
          "Not scored (listed with a note): the probe's decoder inference rows (KV cache kept). "
          "Estimated as pure bf16: the probe's Qwen2.5/Llama/TinyLlama rows (bf16 weights as "
          "run; the probe's fp32-, bf16-amp- and bf16-labelled rows of one shape have identical "
          "peaks, so bf16 autocast over bf16 weights is pure bf16 here). Skipped: matrix "
          "kind=bare rows (Qwen/Llama built in bf16 by mistake); call3 cross.jsonl's corrected "
          "bare rows equal the engine rows' peaks to within 4 KiB (not re-scored); runs that "
          "did not finish (time budget).", "",
          "## Summary", ""] + headline(rows) + [""]
    titles = {
        "matrix": "Measure matrix (`headroom measure`, 8x512, no padding, 8 steps; "
                  "measure_h100_2026-11-25/matrix.jsonl, engine rows)",
        "probe": "Independent bare-loop probe (bench/gpu_probe.py; probe_h100_2026-11-24.jsonl)",
        "techniques": "Technique rows (bench/gpu_techniques.py, gpt2 bf16-amp AdamW, random "
                      "tokens without mask; call3 techniques.jsonl + call4 techniques2.jsonl)",
        "batching": "Batching over the built-in corpus and chunked inference (`headroom measure`; "
                    "batching.jsonl + call4 batching2.jsonl)",
    }
    for s in wanted:
        md += source_table(per_source[s], titles[s])
    if "techniques" in per_source:
        tr = [r for r in per_source["techniques"] if r.scored]
        within = [r for r in tr if abs(_err(r.est["traced"].peak_allocated_bytes, r.alloc)) <= 0.05]
        within_a = [r for r in tr
                    if abs(_err(r.est["analytic"].peak_allocated_bytes, r.alloc)) <= 0.05]
        md += [f"Issue 6 target (estimate within 5% of measured for every technique row): traced "
               f"{len(within)}/{len(tr)} rows, analytic {len(within_a)}/{len(tr)} rows.", ""]
    md += [FIXES, GAPS]
    if args.timing:
        md += ["## Estimator timing", ""] + timing_table(log) + [""]
    md += [f"_{len(rows)} rows estimated in {time.perf_counter() - started:.0f} s._", ""]
    Path(args.out).write_text("\n".join(md), encoding="utf-8")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps({
                    "source": r.source, "label": r.label, "scored": r.scored,
                    "alloc": r.alloc, "reserved": r.reserved, "used": r.used,
                    **{f"{m}_{k}": getattr(r.est[m], k) for m in ("analytic", "traced")
                       for k in ("peak_allocated_bytes", "peak_reserved_bytes",
                                 "device_used_bytes")},
                    "traced_breakdown": r.est["traced"].breakdown,
                    "analytic_breakdown": r.est["analytic"].breakdown,
                    "traced_phase": r.est["traced"].peak_phase,
                    "shape": list(r.est["traced"].peak_batch_shape)}) + "\n")
    print("\n".join(headline(rows)))
    return 0


def _git_head() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
