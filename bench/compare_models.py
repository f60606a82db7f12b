"""Does the engine build the same model as the independent bare loop? (runs on CPU, no GPU)

The engine's tokens/s differed from bench/bare_loop.py's on two H100 cross-checks (bert-base
bf16-amp, Qwen2.5-0.5B bf16-amp + checkpointing) with peaks equal to the byte. This rules the model
in or out: it builds both on CPU and compares the class, every module's type, every parameter's and
buffer's dtype, shape and contiguity, the checkpointing flags, the attention implementation, tied
embeddings and forward hooks.

    PYTHONPATH=. python3 bench/compare_models.py --model Qwen2.5-0.5B --checkpointing

Prints each difference and exits 1 if there is any (config fields that only name the source or
are switched off per run, ``_name_or_path`` and ``use_cache``, are ignored).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bare_loop  # noqa: E402 - beside this file

from engine.models import build_model  # noqa: E402
from engine.profile import Profile  # noqa: E402

IGNORED_CONFIG = {"_name_or_path", "use_cache"}


def describe(model) -> dict[str, dict]:
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return {
        "class": {"": type(model).__name__},
        "attention": {"": model.config._attn_implementation},
        "config": {k: v for k, v in model.config.to_dict().items() if k not in IGNORED_CONFIG},
        "modules": {n: type(m).__name__ for n, m in model.named_modules()},
        "tensors": {n: (str(t.dtype), tuple(t.shape), t.is_contiguous()) for n, t in tensors},
        "checkpointing": {n: getattr(m, "gradient_checkpointing", None) for n, m in model.named_modules()},
        "hooks": {n: len(m._forward_hooks) + len(m._forward_pre_hooks) for n, m in model.named_modules()},
        "tied": {"": model.get_output_embeddings().weight is model.get_input_embeddings().weight},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bert-base-uncased")
    ap.add_argument("--precision", default="bf16-amp",
                    choices=("fp32", "bf16-amp", "fp16-amp", "bf16", "fp16"))
    ap.add_argument("--checkpointing", action="store_true")
    args = ap.parse_args()

    profile = Profile(model=args.model, mode="train", batch=2, seq=64, precision=args.precision,
                      checkpointing=args.checkpointing, target="cpu")
    engine_model = build_model(profile, "cpu")
    engine_model.config.use_cache = False  # as engine.measure does

    bare, _causal = bare_loop.build(bare_loop.config_folder(args.model), "sdpa", torch.device("cpu"))
    pure = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    bare.to(pure if pure is not None else torch.float32)  # as bare_loop.main does
    if args.checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(bare, "activation_checkpointing_enable"):
            bare.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            bare.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    bare.train()

    a, b = describe(engine_model), describe(bare)
    differences = 0
    for part in a:
        keys = sorted(set(a[part]) | set(b[part]))
        for key in keys:
            if a[part].get(key) != b[part].get(key):
                differences += 1
                print(f"{part} {key or '-'}: engine {a[part].get(key)!r}, bare loop {b[part].get(key)!r}")
        print(f"{part}: {len(keys)} compared")
    print(f"{args.model} ({args.precision}{', checkpointing' if args.checkpointing else ''}): "
          f"{differences} difference(s)")
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
