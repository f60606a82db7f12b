"""The memory of one cross-entropy over (N, V) logits under CUDA autocast, op by op (issue 15).

    PYTHONPATH=. python3 bench/diag_cross_entropy.py [--n 4096] [--v 30522]

For bf16 and fp16 logits, two paths: autocast's own cast (``F.cross_entropy`` on half logits,
BertForMaskedLM in transformers 5.17) and an upcast first (``logits.float()`` then cross-entropy,
transformers' ``ForCausalLMLoss``). Prints, in units of one fp32 (N, V) tensor, what stays
allocated after the forward, the forward's and the backward's peaks, and the allocator trace's
sizes in order (``+`` allocation, ``-`` free), so the traced estimator's emulation can be checked
against what CUDA does.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F


def one(n: int, v: int, dtype: torch.dtype, upcast: bool) -> dict:
    unit = n * v * 4
    logits = torch.randn(n, v, device="cuda", dtype=dtype, requires_grad=True)
    labels = torch.randint(0, v, (n,), device="cuda")
    labels[::3] = -100
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=10_000)
    with torch.autocast("cuda", dtype=dtype):
        x = logits.float() if upcast else logits
        loss = F.cross_entropy(x, labels, ignore_index=-100)
        del x
    fwd_peak = torch.cuda.max_memory_allocated() - base
    after_fwd = torch.cuda.memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    loss.backward()
    bwd_peak = torch.cuda.max_memory_allocated() - base
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    events = []
    for ev in (snap.get("device_traces") or [[]])[0]:
        if ev["action"] in ("alloc", "free_completed") and ev["size"] >= unit // 8:
            events.append(("+" if ev["action"] == "alloc" else "-") + f"{ev['size'] / unit:.2f}")
    out = {"dtype": str(dtype).split(".")[-1], "path": "float() then CE" if upcast else "CE under autocast",
           "after_forward": round(after_fwd / unit, 3), "forward_peak": round(fwd_peak / unit, 3),
           "backward_peak": round(bwd_peak / unit, 3), "grad_dtype": str(logits.grad.dtype),
           "trace": events}
    del logits, labels, loss
    torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--v", type=int, default=30522)
    args = ap.parse_args()
    print(torch.__version__, torch.cuda.get_device_name(0))
    for dtype in (torch.bfloat16, torch.float16):
        for upcast in (False, True):
            print(json.dumps(one(args.n, args.v, dtype, upcast)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
