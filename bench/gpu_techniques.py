"""GPU table of the model-side techniques: measured peak memory and tokens/s against a baseline.

Two parts, every configuration in its own child process (a clean device, its own allocator
setting), failures recorded as rows, never fatal:

1. Standalone attention layer, long sequence (B=1, H=16, D=64, bf16, forward + backward, W=256):
   dense causal SDPA (flash), dense masked SDPA (an n x n band mask), FlexAttention local (compiled,
   block mask), and Headroom's blocked local fallback; at 8k and 32k tokens. Targets at 32k: local
   >= 5x faster than dense causal SDPA and >= 2x less memory than dense masked SDPA.
2. GPT-2 (124M) training steps (bf16 autocast, AdamW, B=8, T=512) with each technique switched on
   alone: pruning (unstructured / heads / FFN), GeGLU, feed-forward chunking (train and infer),
   local attention (T=1024), checkpointing, distillation from gpt2-medium, allocator settings.

    PYTHONPATH=. python3 bench/gpu_techniques.py --out bench/results/techniques_h100.jsonl
    PYTHONPATH=. python3 bench/gpu_techniques.py --device cpu --quick --out /tmp/t.jsonl  # smoke

Peak = ``torch.cuda.max_memory_allocated()`` minus what was allocated before the model (inputs of
the attention benchmark included in the baseline); tokens/s from the median of the timed steps
(the first step, with compilation, is excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GIB = 2**30
MIB = 2**20


# ----- the configurations -----------------------------------------------------------------------
def attention_configs(quick: bool, device: str) -> list[dict]:
    lengths = (1024, 2048) if quick else (8192, 32768)
    window = 64 if quick else 256
    impls = ["dense_causal_sdpa", "dense_masked_sdpa", "blocked_local"]
    if device == "cuda":
        impls.insert(2, "flex_local")
    heads = 4 if quick else 16
    return [{"kind": "attention", "name": f"{impl} T={t}", "impl": impl, "B": 1, "H": heads,
             "T": t, "D": 64, "W": window} for t in lengths for impl in impls]


def model_configs(quick: bool) -> list[dict]:
    base = {"model": "tiny-gpt2" if quick else "gpt2", "batch": 2 if quick else 8,
            "seq": 128 if quick else 512, "precision": "fp32" if quick else "bf16-amp",
            "steps": 3 if quick else 4}
    teacher = "tiny-gpt2" if quick else "gpt2-medium"
    long_seq = 256 if quick else 1024
    window = 32 if quick else 128
    rows = [
        ("baseline", {}),
        ("unstructured:0.5", {"prune": "unstructured:0.5"}),
        ("heads:0.5", {"prune": "heads:0.5"}),
        ("ffn:0.5", {"prune": "ffn:0.5"}),
        ("geglu", {"mlp": "geglu"}),
        ("ffn_chunks=4", {"ffn_chunks": 4}),
        ("checkpointing", {"checkpointing": True}),
        (f"distill from {teacher}", {"distill_from": teacher}),
        ("alloc expandable", {"alloc": "expandable"}),
        ("alloc pool:2GiB", {"alloc": "pool:256MiB" if quick else "pool:2GiB"}),
        (f"baseline T={long_seq}", {"seq": long_seq}),
        (f"local:{window} T={long_seq}", {"seq": long_seq, "attn": f"local:{window}"}),
        ("infer baseline", {"mode": "infer", "seq": long_seq}),
        ("infer ffn_chunks=4", {"mode": "infer", "seq": long_seq, "ffn_chunks": 4}),
    ]
    out = []
    for name, changes in rows:
        prof = dict(base, **changes)
        group = ("infer" if prof.get("mode") == "infer"
                 else "long" if prof["seq"] == long_seq else "train")
        out.append({"kind": "model", "name": name, "group": group, "profile": prof})
    return out


# ----- children ---------------------------------------------------------------------------------
class _Peak:
    """Peak bytes above a baseline: CUDA allocator statistics, or live tensor bytes on CPU."""

    def __init__(self, device: str):
        import torch

        self.device = device
        self.torch = torch
        self.tracker = None
        if device == "cpu":
            from engine.measure.probes import LiveBytesTracker

            self.tracker = LiveBytesTracker("cpu")
            self.tracker.__enter__()

    def track(self, tensors) -> None:
        if self.tracker is not None:
            for t in tensors:
                self.tracker.track(t)

    def reset(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            self.base = self.torch.cuda.memory_allocated()
        else:
            self.tracker.reset_peak()
            self.base = self.tracker.live_bytes

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def result(self) -> dict:
        if self.device == "cuda":
            return {"peak_allocated_bytes": self.torch.cuda.max_memory_allocated() - self.base,
                    "peak_reserved_bytes": self.torch.cuda.max_memory_reserved()}
        return {"peak_allocated_bytes": self.tracker.peak_bytes - self.base, "peak_reserved_bytes": 0}

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.__exit__(None, None, None)


def run_attention(cfg: dict, device: str) -> dict:
    import torch
    import torch.nn.functional as F

    from engine.techniques import local_attention as la

    b, h, t, d, w = cfg["B"], cfg["H"], cfg["T"], cfg["D"], cfg["W"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, h, t, d, device=device, dtype=dtype, generator=g).requires_grad_()
               for _ in range(3))
    grad = torch.randn(b, h, t, d, device=device, dtype=dtype, generator=g)
    impl = cfg["impl"]
    state: dict = {}

    def fwd():
        if impl == "dense_causal_sdpa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if impl == "dense_masked_sdpa":
            if "mask" not in state:  # part of this method's memory: built inside the measured region
                state["mask"] = la.band_mask(t, t, w, True, q.device)[None, None]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=state["mask"])
        if impl == "flex_local":
            return la.flex_local_attention(q, k, v, w, True)
        return la.blocked_local_attention(q, k, v, w, True)

    def step():
        out = fwd()
        out.backward(grad)
        q.grad = k.grad = v.grad = None

    peak = _Peak(device)
    peak.track([q, k, v, grad])
    t0 = time.perf_counter()
    step()  # warm-up: compilation, block mask, kernels' autotuning
    if impl == "dense_masked_sdpa":
        state.clear()
    peak.sync()
    warmup_s = time.perf_counter() - t0
    peak.reset()
    times = []
    for _ in range(3 if device == "cpu" else 10):
        peak.sync()
        t0 = time.perf_counter()
        step()
        peak.sync()
        times.append(time.perf_counter() - t0)
    row = peak.result()
    peak.close()
    ms = statistics.median(times) * 1000
    row.update({"ms_per_fwd_bwd": ms, "tokens_per_s": b * t / (ms / 1000), "warmup_s": warmup_s})
    if impl in ("flex_local",) and la._FLEX_STATE["error"]:
        row["note"] = la._FLEX_STATE["error"]
    return row


def run_model(cfg: dict, device: str) -> dict:
    import contextlib

    import torch

    from engine.models import build_model, count_parameters
    from engine.profile import Profile
    from engine.techniques import apply_model_techniques, distillation, memory_pool

    p = Profile(target=device, **cfg["profile"])
    notes = []
    if device == "cuda":
        torch.cuda.init()
        torch.empty(0, device=device)
        note = memory_pool.prereserve(p, device)
        if note:
            notes.append(note)
    peak = _Peak(device)
    peak.reset()
    torch.manual_seed(0)
    model = build_model(p, device, apply_techniques=False)
    notes += apply_model_techniques(model, p)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    teacher = distillation.build_teacher(p, device) if p.distill_from else None
    peak.track(list(model.parameters()) + (list(teacher.parameters()) if teacher is not None else []))
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (p.batch, p.seq), device=device,
                        generator=torch.Generator(device=device).manual_seed(1))
    amp = (torch.autocast(device, dtype=torch.bfloat16) if p.precision == "bf16-amp"
           else contextlib.nullcontext())
    optimizer = torch.optim.AdamW(model.parameters()) if p.is_training else None
    if p.is_training:
        model.train()
    else:
        model.eval()

    def step():
        if not p.is_training:
            with torch.no_grad(), amp:
                model(input_ids=ids)
            return
        with amp:
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(input_ids=ids).logits
                loss = distillation.distillation_loss(model(input_ids=ids).logits, t_logits, ids, p)
                del t_logits
            else:
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = []
    for _ in range(p.steps):
        peak.sync()
        t0 = time.perf_counter()
        step()
        peak.sync()
        times.append(time.perf_counter() - t0)
    row = peak.result()
    peak.close()
    s = statistics.median(times[1:] or times)
    row.update({"params": count_parameters(model), "s_per_step": s,
                "tokens_per_s": p.batch * p.seq / s, "first_step_s": times[0],
                "fragmentation": memory_pool.fragmentation(row["peak_reserved_bytes"],
                                                           row["peak_allocated_bytes"]),
                "note": "; ".join(notes)})
    return row


def child(cfg: dict, device: str) -> None:
    t0 = time.perf_counter()
    row = {"name": cfg["name"], "kind": cfg["kind"], "group": cfg.get("group", cfg["kind"]),
           "config": cfg}
    try:
        import torch
        import transformers

        row.update({"torch": torch.__version__, "transformers": transformers.__version__,
                    "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")})
        row.update(run_attention(cfg, device) if cfg["kind"] == "attention" else run_model(cfg, device))
        row["ok"] = True
    except Exception as exc:  # recorded, not fatal: OOM, kernel or compile failures are results too
        row.update({"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"})
    row["wall_s"] = time.perf_counter() - t0
    print("RESULT " + json.dumps(row), flush=True)


# ----- driver -----------------------------------------------------------------------------------
def launch(cfg: dict, device: str, timeout: float) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if cfg["kind"] == "model":
        from engine.profile import Profile
        from engine.techniques import memory_pool

        env = memory_pool.child_env(Profile(**cfg["profile"]), env)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(cfg), "--device", device]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"name": cfg["name"], "kind": cfg["kind"], "group": cfg.get("group", cfg["kind"]),
                "ok": False, "error": f"timed out after {timeout:.0f} s", "config": cfg}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
    return {"name": cfg["name"], "kind": cfg["kind"], "group": cfg.get("group", cfg["kind"]),
            "ok": False, "error": f"child exited {proc.returncode}: {tail[0][:300]}",
            "wall_s": time.perf_counter() - t0, "config": cfg}


def _mib(x) -> str:
    return f"{x / MIB:,.0f}" if isinstance(x, (int, float)) else "-"


def markdown(rows: list[dict]) -> str:
    out = []
    attn = [r for r in rows if r["kind"] == "attention"]
    if attn:
        c0 = attn[0]["config"]
        dt = "bf16" if attn[0].get("device", "cpu") != "cpu" else "fp32"
        out += [f"### Attention layer (B={c0['B']}, H={c0['H']}, D={c0['D']}, {dt}, fwd+bwd, "
                f"causal, W={c0['W']})", "",
                "| implementation | T | peak MiB | ms fwd+bwd | vs dense causal (time) | vs dense masked (memory) | note |",
                "|---|---:|---:|---:|---:|---:|---|"]
        for r in attn:
            t = r["config"]["T"]
            same_t = {x["config"]["impl"]: x for x in attn if x["config"]["T"] == t and x.get("ok")}
            causal, masked = same_t.get("dense_causal_sdpa"), same_t.get("dense_masked_sdpa")
            if not r.get("ok"):
                out.append(f"| {r['config']['impl']} | {t} | - | - | - | - | FAILED: {r.get('error', '')} |")
                continue
            speed = f"{causal['ms_per_fwd_bwd'] / r['ms_per_fwd_bwd']:.1f}x faster" if causal else "-"
            mem = (f"{masked['peak_allocated_bytes'] / max(r['peak_allocated_bytes'], 1):.1f}x less"
                   if masked else "-")
            out.append(f"| {r['config']['impl']} | {t} | {_mib(r['peak_allocated_bytes'])} | "
                       f"{r['ms_per_fwd_bwd']:.2f} | {speed} | {mem} | {r.get('note', '')} |")
        out.append("")
    models = [r for r in rows if r["kind"] == "model"]
    if models:
        p0 = models[0]["config"]["profile"]
        out += [f"### {p0['model']} techniques (each alone; {p0['precision']}, AdamW)", "",
                "| technique | mode | B x T | params | peak alloc MiB | peak reserved MiB | frag | tokens/s | peak vs base | speed vs base | note |",
                "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        bases = {r["group"]: r for r in models if r.get("ok") and r["name"].startswith(("baseline", "infer baseline"))}
        for r in models:
            prof = r["config"]["profile"]
            shape = f"{prof['batch']} x {prof['seq']}"
            mode = prof.get("mode", "train")
            if not r.get("ok"):
                out.append(f"| {r['name']} | {mode} | {shape} | - | - | - | - | - | - | - | FAILED: {r.get('error', '')} |")
                continue
            base = bases.get(r["group"])
            rel_peak = f"{r['peak_allocated_bytes'] / base['peak_allocated_bytes']:.2f}" if base else "-"
            rel_speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "-"
            out.append(f"| {r['name']} | {mode} | {shape} | {r['params'] / 1e6:.1f}M | "
                       f"{_mib(r['peak_allocated_bytes'])} | {_mib(r['peak_reserved_bytes'])} | "
                       f"{r['fragmentation']:.2f} | {r['tokens_per_s']:,.0f} | {rel_peak} | {rel_speed} | "
                       f"{r.get('note', '')} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench/results/techniques.jsonl"))
    ap.add_argument("--md", default="", help="markdown table path (default: --out with .md)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--quick", action="store_true", help="tiny model, short sequences (smoke test)")
    ap.add_argument("--only", default="", help="run configurations whose name contains one of these comma-separated texts")
    ap.add_argument("--part", default="all", choices=("all", "attention", "model"))
    ap.add_argument("--timeout", type=float, default=150.0, help="seconds per configuration")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(json.loads(args.child), args.device)
        return 0
    cfgs = []
    if args.part in ("all", "attention"):
        cfgs += attention_configs(args.quick, args.device)
    if args.part in ("all", "model"):
        cfgs += model_configs(args.quick)
    if args.only:
        wanted = [w for w in args.only.split(",") if w]
        cfgs = [c for c in cfgs if any(w in c["name"] for w in wanted)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    t_all = time.perf_counter()
    with out.open("w", encoding="utf-8") as fh:
        for cfg in cfgs:
            row = launch(cfg, args.device, args.timeout)
            rows.append(row)
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            status = "ok" if row.get("ok") else f"FAILED {row.get('error', '')}"
            print(f"[{time.perf_counter() - t_all:6.1f}s] {cfg['name']}: {status}", file=sys.stderr,
                  flush=True)
    table = markdown(rows)
    md = Path(args.md) if args.md else out.with_suffix(".md")
    md.write_text(table, encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
