"""How many GPUs a profile needs: the smallest N for which one of one GPU / DDP / FSDP2 /
FSDP2 + CPU offload fits a per-GPU budget, and for every N tried which of them fit.

    result = plan_gpus(profile, budget_bytes=80 * 2**30, max_gpus=64)
    result.gpus       # smallest N with a fitting option (0: none up to max_gpus)
    result.options    # (gpus, option, device_used_bytes per rank, fits) for every N tried

Each option is the profile with ``gpus``/``shard``/``offload`` set and the rest kept (the batch
stays the per-rank batch, so the global batch grows with N); memory is the estimate's
``device_used_bytes`` of the worst rank. The ranking is by memory only: the speed estimate does not
yet count the collectives' time over the catalog's interconnects, so no option is called faster.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from engine.errors import BadInput
from engine.profile import Profile

#: (name, shard, offload) of the options tried for N > 1 (N = 1: the profile on one GPU).
OPTIONS = (("ddp", "ddp", "none"), ("fsdp2", "fsdp2", "none"),
           ("fsdp2+offload", "fsdp2", "params"))


@dataclass(frozen=True)
class GpuPlan:
    budget_bytes: int
    gpus: int  # smallest N with a fitting option; 0 when none fits up to max_gpus
    fitting: tuple[str, ...]  # the options that fit at that N
    options: tuple[tuple[int, str, int, bool], ...]  # (N, option, device used per rank, fits)
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["options"] = [{"gpus": n, "option": o, "device_used_bytes": b, "fits": f}
                        for n, o, b, f in self.options]
        return d


def _counts(max_gpus: int) -> list[int]:
    out, n = [], 1
    while n < max_gpus:
        out.append(n)
        n *= 2
    return out + [max_gpus]


def plan_gpus(profile: Profile, budget_bytes: int, max_gpus: int = 64,
              method: str = "analytic") -> GpuPlan:
    from engine.estimate import estimate

    if profile.mode != "train":
        raise BadInput("planning GPUs (--gpus-max) applies to training profiles")
    if max_gpus < 1 or max_gpus > 1 << 16:
        raise BadInput(f"--gpus-max must be between 1 and 65536; got {max_gpus}")
    rows, best, fitting = [], 0, ()
    base = dataclasses.replace(profile, reshard_after_forward="on", mp_param_dtype="off",
                               mp_reduce_dtype="off", nodes=1, bucket_cap_mb=25)
    for n in _counts(max_gpus):
        tries = [("one GPU", "none", "none")] if n == 1 else list(OPTIONS)
        fit_here = []
        for name, shard, offload in tries:
            if offload != "none" and profile.target != "cuda":
                continue  # nothing to offload to on a CPU target
            p = base.replace(gpus=n, shard=shard, offload=offload,
                             bucket_cap_mb=base.bucket_cap_mb)
            used = estimate(p, method=method).device_used_bytes
            rows.append((n, name, int(used), used <= budget_bytes))
            if used <= budget_bytes:
                fit_here.append(name)
        if fit_here and not best:
            best, fitting = n, tuple(fit_here)
            break
    notes = ["memory only: the speed estimate does not count DDP/FSDP2 collectives yet",
             "batch is per rank: the global batch is batch x N"]
    return GpuPlan(int(budget_bytes), best, fitting, tuple(rows), tuple(notes))
