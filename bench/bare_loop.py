"""A bare PyTorch + transformers training/inference loop, written independently of Headroom's engine.

It is the reference the engine's measured run is checked against on a GPU: the same model config
(a Headroom preset's config.json, or any folder holding one), random token batches of the same
(B, T) with a full attention mask, and the same protocol (gc, empty_cache, reset peaks, sync;
baseline before the model; N steps of forward + loss + backward + optimizer step +
zero_grad(set_to_none=True); peak = max_memory_allocated() - baseline; timings exclude the first
step, median step time, tokens/s = B*T / step time over the timed steps).

    python bench/bare_loop.py --model gpt2 --mode train --batch 8 --seq 512 --precision bf16-amp \
        [--checkpointing] [--steps 5] [--optimizer adamw|sgd] [--attn sdpa|eager] [--device cuda]

Prints one JSON object: peak_allocated_bytes, peak_reserved_bytes, device_used_bytes,
tokens_per_s, step_time_s, first_step_s, params, ... (or {"oom": true, ...}, exit 3).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

PRESETS = Path(__file__).resolve().parent.parent / "engine" / "resources" / "models"


def config_folder(name: str) -> Path:
    folder = PRESETS / name
    if (folder / "config.json").is_file():
        return folder
    folder = Path(name).expanduser()
    if (folder / "config.json").is_file():
        return folder
    sys.exit(f"bare_loop: no config.json for {name!r}")


def build(folder: Path, attn: str, device: torch.device):
    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    # Encoders (a masked-LM head, not a decoder) train as masked LMs; everything else as causal LMs.
    causal = not (config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
                  and not getattr(config, "is_decoder", False))
    cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModelForMaskedLM
    with torch.device(device):
        model = cls.from_config(config, attn_implementation=attn)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model, causal


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--mode", choices=("train", "infer"), default="train")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--precision", choices=("fp32", "bf16-amp", "fp16-amp", "bf16", "fp16"), default="fp32")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    ap.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bare_loop: no CUDA device")

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    train = args.mode == "train"
    B, T = args.batch, args.seq
    gen = torch.Generator().manual_seed(args.seed)

    gc.collect()
    if cuda:
        torch.empty(0, device=device)
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = 0

    torch.manual_seed(args.seed)
    model, causal = build(config_folder(args.model), args.attn, device)
    # from_config builds in the config's torch_dtype (bf16 for Qwen2.5/Llama presets); the protocol
    # trains fp32 master weights unless the precision is pure bf16/fp16.
    pure = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    model.to(pure if pure is not None else torch.float32)
    amp = {"bf16-amp": torch.bfloat16, "fp16-amp": torch.float16}.get(args.precision)
    if train and args.checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    vocab = model.config.vocab_size
    params = sum(p.numel() for p in model.parameters())
    if train:
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(trainable, lr=1e-3) if args.optimizer == "sgd" else torch.optim.AdamW(trainable)
        scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    else:
        model.eval()

    batches = []
    for _ in range(args.steps):
        ids = torch.randint(0, vocab, (B, T), generator=gen)  # (B, T)
        mask = torch.ones(B, T, dtype=torch.long)  # (B, T)
        if causal:
            labels = ids.clone()
        else:  # masked LM: 15% of positions masked, the rest ignored
            chosen = torch.rand(B, T, generator=gen) < 0.15
            labels = ids.masked_fill(~chosen, -100)
            ids = ids.masked_fill(chosen, min(103, vocab - 1))
        batches.append((ids, mask, labels))

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def autocast():
        return torch.autocast(device_type=device.type, dtype=amp, enabled=amp is not None)

    gc.collect()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    oom = None
    try:
        for step, (ids, mask, labels) in enumerate(batches):
            sync()
            t0 = time.perf_counter()
            ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
            if train:
                with autocast():
                    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.detach())
                del loss
            else:
                with torch.no_grad(), autocast():
                    out = model(input_ids=ids, attention_mask=mask)
                del out
            del ids, mask, labels
            sync()
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError as exc:
        oom = str(exc).splitlines()[0]
    out = {
        "bench": "bare_loop",
        "model": args.model, "mode": args.mode, "batch": B, "seq": T, "precision": args.precision,
        "checkpointing": args.checkpointing, "steps": len(times), "params": params,
        "device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
    }
    if cuda:
        free, total = torch.cuda.mem_get_info()
        out.update(peak_allocated_bytes=torch.cuda.max_memory_allocated() - baseline,
                   peak_reserved_bytes=torch.cuda.max_memory_reserved(),
                   device_used_bytes=int(total - free), baseline_bytes=baseline,
                   device_name=torch.cuda.get_device_name())
    timed = times[1:] if len(times) > 1 else times
    out.update(first_step_s=times[0] if times else 0.0,
               step_time_s=statistics.median(timed) if timed else 0.0,
               tokens_per_s=B * T * len(timed) / sum(timed) if timed and sum(timed) > 0 else 0.0,
               losses=[float(x) for x in losses])
    if oom is not None:
        out.update(oom=True, oom_message=oom)
    print(json.dumps(out))
    return 3 if oom is not None else 0


if __name__ == "__main__":
    sys.exit(main())
