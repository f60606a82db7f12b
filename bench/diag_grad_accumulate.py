"""Does autograd add two gradients of one tensor in place? CPU vs CUDA (issue 15, reserved).

    PYTHONPATH=. python3 bench/diag_grad_accumulate.py

The engine's InputBuffer sums the gradients that reach one tensor (a tied embedding and LM head,
a residual stream). In place (``add_``) the sum costs no new block; out of place (``add``) it
allocates one and frees both inputs, which changes what the caching allocator reserves. Prints the
aten add ops each backward ran, per device and case, with the profiler.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile


def case(name: str, device: str) -> dict:
    torch.manual_seed(0)
    w = torch.randn(512, 64, device=device, requires_grad=True)
    ids = torch.randint(0, 512, (4, 32), device=device)
    if name == "tied embedding + head":
        loss = F.linear(F.embedding(ids, w), w).float().logsumexp(-1).sum()
    else:  # the residual stream: x + f(x)
        x = F.embedding(ids, w)
        loss = (x + torch.tanh(x @ w[:64].t()[:, :64])).sum()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    ops = [e.name for e in prof.events() if e.name in ("aten::add", "aten::add_")]
    return {"device": device, "case": name, "adds": ops}


def main() -> int:
    print(torch.__version__)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for name in ("tied embedding + head", "residual"):
            print(json.dumps(case(name, device)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
