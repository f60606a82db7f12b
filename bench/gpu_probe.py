"""Calibration probe for the estimators: bare transformers training/inference steps on CUDA.

Independent of the engine (plain torch + transformers; preset configs read from resources/), so it
also serves as a cross-check of `headroom measure`. Each configuration runs in its own process
(a clean device); several run at once because max_memory_allocated/reserved are per process
(timings and device-used numbers from a parallel sweep are not reported).

    PYTHONPATH=. python3 bench/gpu_probe.py --matrix bench/estimate_matrix.json --out out.jsonl -j 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_one(cfg: dict) -> dict:
    import statistics

    import torch
    import transformers

    torch.manual_seed(0)
    dev = "cuda"
    torch.cuda.init()
    free0, total = torch.cuda.mem_get_info()
    preset = json.loads((ROOT / "engine/resources/models" / cfg["model"] / "config.json").read_text())
    mt = preset.pop("model_type")
    config = transformers.CONFIG_MAPPING[mt].from_dict(preset)
    config.use_cache = False  # inference keeps no KV cache: the protocol measures one forward
    decoder = mt not in ("bert", "distilbert")
    cls = transformers.AutoModelForCausalLM if decoder else transformers.AutoModelForMaskedLM
    base = torch.cuda.memory_allocated()
    with torch.device(dev):
        model = cls.from_config(config, attn_implementation=cfg.get("attn", "sdpa"))
    prec = cfg.get("precision", "fp32")
    # from_config builds in the config's torch_dtype (bf16 for Qwen/Llama): the protocol is fp32.
    model.to({"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec, torch.float32))
    train = cfg.get("mode", "train") == "train"
    if train and cfg.get("checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train(train)
    opt = torch.optim.AdamW(model.parameters()) if train else None
    scaler = torch.amp.GradScaler("cuda") if prec == "fp16-amp" and train else None
    B, T = cfg["batch"], cfg["seq"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, min(config.vocab_size, 8192), (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if cfg.get("padded", True) and B > 1:
        for i in range(1, B):  # every row but the first has some padding, as real batches do
            n = int(torch.randint(T // 4, T, (1,), generator=g))
            mask[i, n:] = 0
    ids, mask = ids.to(dev), mask.to(dev)
    labels = ids.masked_fill(mask == 0, -100)
    if not decoder:
        mlm = torch.rand(B, T, generator=g).to(dev) < 0.15
        labels = ids.masked_fill(~mlm | (mask == 0), -100)
    ac = {"bf16-amp": torch.bfloat16, "fp16-amp": torch.float16}.get(prec)
    params_bytes = torch.cuda.memory_allocated() - base
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    timeline, times, peak_used = [], [], 0
    steps = cfg.get("steps", 3)
    for step in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if train:
            with torch.autocast("cuda", dtype=ac, enabled=ac is not None):
                out = model(input_ids=ids, attention_mask=mask, labels=labels)
            timeline.append((step, "forward", torch.cuda.memory_allocated() - base))
            loss = out.loss
            del out
            (scaler.scale(loss) if scaler else loss).backward()
            timeline.append((step, "backward", torch.cuda.memory_allocated() - base))
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            timeline.append((step, "optimizer", torch.cuda.memory_allocated() - base))
            del loss
        else:
            with torch.no_grad(), torch.autocast("cuda", dtype=ac, enabled=ac is not None):
                out = model(input_ids=ids, attention_mask=mask)
            timeline.append((step, "forward", torch.cuda.memory_allocated() - base))
            del out
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        free, _ = torch.cuda.mem_get_info()
        peak_used = max(peak_used, total - free)
    return {
        **cfg,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "device_name": torch.cuda.get_device_name(),
        "weights_bytes": params_bytes,
        "peak_allocated_bytes": torch.cuda.max_memory_allocated() - base,
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
        "device_used_bytes": peak_used, "used_before_model_bytes": total - free0,
        "step_time_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
        "tokens_per_s": B * T / (statistics.median(times[1:]) if len(times) > 1 else times[0]),
        "real_tokens_per_batch": int(mask.sum()),
        "timeline": timeline,
    }


def context_probe() -> dict:
    """CUDA context and cuBLAS workspace: what device-used holds beyond reserved memory."""
    import torch

    free_before, total = torch.cuda.mem_get_info()  # creating the context happens here
    torch.cuda.synchronize()
    a = torch.randn(1024, 1024, device="cuda")
    after_tensor = total - torch.cuda.mem_get_info()[0]
    reserved_tensor = torch.cuda.memory_reserved()
    b = a @ a  # first matmul: cuBLAS handle + workspace
    torch.cuda.synchronize()
    after_mm = total - torch.cuda.mem_get_info()[0]
    reserved_mm = torch.cuda.memory_reserved()
    c = a.bfloat16() @ a.bfloat16()
    torch.cuda.synchronize()
    after_bf16 = total - torch.cuda.mem_get_info()[0]
    del b, c
    return {"probe": "context", "total_bytes": total, "used_at_init_bytes": total - free_before,
            "used_after_tensor_bytes": after_tensor, "reserved_after_tensor_bytes": reserved_tensor,
            "used_after_matmul_bytes": after_mm, "reserved_after_matmul_bytes": reserved_mm,
            "used_after_bf16_matmul_bytes": after_bf16, "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name(),
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--matrix")
    ap.add_argument("--one")
    ap.add_argument("--context", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("-j", type=int, default=1)
    args = ap.parse_args()
    if args.context:
        print(json.dumps(context_probe()))
        return
    if args.one:
        try:
            print(json.dumps(run_one(json.loads(args.one))))
        except Exception as exc:  # noqa: BLE001 - a failing config is a record, not a crash
            print(json.dumps({**json.loads(args.one), "error": f"{type(exc).__name__}: {str(exc)[:300]}"}))
        return
    configs = json.loads(Path(args.matrix).read_text())
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = open(args.out, "a") if args.out else sys.stdout

    def launch(cfg):
        p = subprocess.run([sys.executable, __file__, "--one", json.dumps(cfg)], capture_output=True,
                           text=True, env=env, timeout=300)
        lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
        return lines[-1] if lines else json.dumps({**cfg, "error": p.stderr[-300:]})

    ctx = subprocess.run([sys.executable, __file__, "--context"], capture_output=True, text=True, env=env)
    print(ctx.stdout.strip(), file=out, flush=True)
    with ThreadPoolExecutor(args.j) as pool:
        for line in pool.map(launch, configs):
            print(line, file=out, flush=True)


if __name__ == "__main__":
    main()
