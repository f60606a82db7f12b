"""Where does `headroom measure`'s step time differ from a bare loop's? (a GPU diagnostic)

On the H100 (2026-11-25) the engine's median step was 13-16% slower than bench/bare_loop.py for
bert-base bf16-amp and Qwen2.5-0.5B bf16-amp + checkpointing, with peaks equal to the byte, while
gpt2 fp32 and Llama-3.2-1B bf16-amp agreed within 2.3%. Two things differ: the data (the engine's
tokenized dataset vs the bare loop's uniform random ids) and the loop (the engine's phase
bookkeeping). This script separates them, each variant in its own process:

    engine       engine.measure.run_measure(profile)
    same-data    a bare loop (the bare_loop.py protocol) over the engine's own batches and model
    random-data  the same bare loop over uniform random ids of the same shapes

    PYTHONPATH=. python3 bench/diag_step_overhead.py --model bert-base-uncased --precision bf16-amp \
        [--checkpointing] [--steps 12] [--profile]      # --profile: torch.profiler table of a step

Prints one JSON line per variant and a summary; engine vs same-data is the loop's cost, same-data
vs random-data the data's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("engine", "same-data", "random-data")
#: A/B variants of the engine's own loop (--variants): its bookkeeping switched off piece by piece.
#   engine-nohooks   no post-accumulate-grad hooks (the breakdown's samples inside backward)
#   engine-noprobe   no hooks and no allocator reads at phase boundaries (peaks then meaningless)
#   bare-loop        bench/bare_loop.py (its own model build, random ids, a full mask)
#   engine-instrumented  every step with the full bookkeeping (HEADROOM_INSTRUMENT_ALL=1: the loop
#                    before repeated shapes ran quiet)
EXTRA_VARIANTS = ("engine-nohooks", "engine-noprobe", "engine-instrumented", "bare-loop")


def profile_from(args):
    from engine.profile import Profile

    return Profile(model=args.model, mode="train", batch=args.batch, seq=args.seq,
                   precision=args.precision, checkpointing=args.checkpointing, steps=args.steps,
                   target=args.device, dataset=args.dataset, padding="fixed")


def bare_steps(profile, batches, profile_step: bool) -> dict:
    """The bare_loop.py protocol over the given CPU batches: [(ids, mask, labels), ...]."""
    import torch

    from engine.models import build_model

    dev = torch.device(profile.target)
    torch.manual_seed(profile.seed)
    model = build_model(profile, str(dev))
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    amp = {"bf16-amp": torch.bfloat16, "fp16-amp": torch.float16}.get(profile.precision)
    scaler = torch.amp.GradScaler(dev.type) if amp == torch.float16 else None
    cuda = dev.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    times = []
    prof = None
    for i, (ids, mask, labels) in enumerate(batches):
        if profile_step and i == 3:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                      torch.profiler.ProfilerActivity.CUDA])
            prof.__enter__()
        sync()
        t0 = time.perf_counter()
        ids, mask, labels = ids.to(dev), mask.to(dev), labels.to(dev)
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())
        del loss, ids, mask, labels
        sync()
        times.append(time.perf_counter() - t0)
        if prof is not None and i == 3:
            prof.__exit__(None, None, None)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), file=sys.stderr)
    return {"step_time_s": statistics.median(times[1:]), "first_step_s": times[0],
            "peak_allocated_bytes": torch.cuda.max_memory_allocated(dev) if cuda else None}


def child(args) -> dict:
    import torch

    profile = profile_from(args)
    if args.variant == "engine-instrumented":
        import os

        os.environ["HEADROOM_INSTRUMENT_ALL"] = "1"
        args.variant = "engine"
        return child(args)
    if args.variant in ("engine-nohooks", "engine-noprobe"):
        import torch as _torch

        # The runner registers the hooks only where torch has them: take the method away.
        del _torch.Tensor.register_post_accumulate_grad_hook
        if args.variant == "engine-noprobe":
            from engine.measure import probes
            from engine.measure.probes import PhaseEnd

            probes.CudaProbe._stats = lambda self: ({"current": 0, "peak": 0}, {"current": 0, "peak": 0})
            probes.CudaProbe.phase_end = lambda self: PhaseEnd(0, 0, 0, 0)
        args.variant = "engine"
        out = child(args)
        out["note"] = "A/B variant: numbers other than timings are not meaningful"
        return out
    if args.variant == "engine":
        from engine.measure import run_measure

        r = run_measure(profile)
        return {"step_time_s": r.step_time_s, "first_step_s": r.first_step_s,
                "peak_allocated_bytes": r.peak_allocated_bytes}
    from engine.measure.inputs import prepare_steps as _prepare_steps
    from engine.prepare import prepare

    prepared = prepare(profile)
    steps, _ = _prepare_steps(profile, prepared.config, prepared.task, None, lambda f, m: None, [])
    batches = [(s.input_ids, s.attention_mask, s.labels) for s in steps]
    if args.variant == "random-data":
        g = torch.Generator().manual_seed(0)
        vocab = int(prepared.config.vocab_size)
        rnd = []
        for ids, mask, labels in batches:
            new = torch.randint(0, vocab, ids.shape, generator=g)
            keep = labels != -100  # the same positions carry a target
            rnd.append((new, mask, torch.where(keep, new, labels) if labels.shape == ids.shape
                        else labels))
        batches = rnd
    return bare_steps(profile, batches, args.profile)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bert-base-uncased")
    ap.add_argument("--precision", default="bf16-amp")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--dataset", default="builtin")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of step 3")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma list of " + ", ".join(VARIANTS + EXTRA_VARIANTS))
    ap.add_argument("--repeat", type=int, default=1, help="run the variant list this many times, interleaved")
    ap.add_argument("--pin", default="", help="taskset CPU list for every variant (less host noise)")
    ap.add_argument("--variant", choices=VARIANTS + EXTRA_VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps({"variant": args.variant, **child(args)}))
        return 0
    rows = {}
    times: dict[str, list[float]] = {}
    passthrough = [a for a in sys.argv[1:]]
    variants = args.variants.split(",")
    for rep in range(args.repeat):
        # Rotate the order each repeat: the first process after an idle spell runs slower (clocks,
        # caches), which would otherwise always count against the same variant.
        for v in variants[rep % len(variants):] + variants[:rep % len(variants)]:
            if v == "bare-loop":
                cmd = [sys.executable, str(ROOT / "bench" / "bare_loop.py"), "--model", args.model,
                       "--precision", args.precision, "--batch", str(args.batch), "--seq", str(args.seq),
                       "--steps", str(args.steps), "--device", args.device] + (
                           ["--checkpointing"] if args.checkpointing else [])
            else:
                cmd = [sys.executable, __file__, "--variant", v] + passthrough
            if args.pin:
                cmd = ["taskset", "-c", args.pin] + cmd
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
            sys.stderr.write(p.stderr[-4000:])
            line = next((x for x in reversed(p.stdout.splitlines()) if x.startswith("{")), None)
            row = json.loads(line) if line else {"error": p.stderr[-300:]}
            row = {"variant": v, "repeat": rep, "model": args.model, "batch": args.batch, "seq": args.seq,
                   "precision": args.precision, "checkpointing": args.checkpointing,
                   **{k: row.get(k) for k in ("step_time_s", "first_step_s", "peak_allocated_bytes",
                                              "error") if k in row}}
            rows.setdefault(v, row)
            if row.get("step_time_s"):
                times.setdefault(v, []).append(row["step_time_s"])
            print(json.dumps(row), flush=True)
    if args.repeat > 1 and times:
        summary = {v: statistics.median(ts) for v, ts in times.items()}
        print(json.dumps({"median_step_time_s": summary, "repeats": args.repeat}), flush=True)
    if not all(v in rows for v in VARIANTS):
        return 0
    e, s, r = (rows[v].get("step_time_s") for v in VARIANTS)
    if e and s and r:
        print(f"loop cost (engine / same-data): {e / s - 1:+.1%}; "
              f"data cost (same-data / random-data): {s / r - 1:+.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
