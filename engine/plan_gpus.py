"""How many GPUs a profile needs: the smallest N for which one of one GPU / DDP / FSDP2 /
FSDP2 + CPU offload fits a per-GPU budget, and for every N tried which of them fit.

    result = plan_gpus(profile, budget_bytes=80 * 2**30, max_gpus=64)
    result.gpus       # smallest N with a fitting option (0: none up to max_gpus)
    result.options    # (gpus, option, device_used_bytes per rank, fits) for every N tried

Each option is the profile with ``gpus``/``shard``/``offload`` set and the rest kept (the batch
stays the per-rank batch, so the global batch grows with N); memory is the estimate's
``device_used_bytes`` of the worst rank. Among the options that fit at that N, ``fastest`` is
the one with the most estimated tokens/s: the speed estimate's step time of one rank's batch plus
the collectives' time over the catalog GPU's interconnect (``engine.gpus``: NVLink, else PCIe; half
the bidirectional figure each way) and, with offload, the PCIe copies; no overlap of communication
with compute is assumed (an upper bound on the step time). CPU targets: memory only.
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
    fastest: str = ""  # the fitting option with the most estimated tokens/s at ``gpus`` ("": CPU)
    speed: tuple[tuple[int, str, float, float, float], ...] = ()  # (N, option, compute s,
    #                                                   communication s, tokens/s of all ranks)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["options"] = [{"gpus": n, "option": o, "device_used_bytes": b, "fits": f}
                        for n, o, b, f in self.options]
        d["speed"] = [{"gpus": n, "option": o, "compute_s": c, "communication_s": m,
                       "tokens_per_s": t} for n, o, c, m, t in self.speed]
        return d


def communication_s(profile: Profile, est, gpu) -> float:
    """Seconds per step one rank spends in collectives (ring algorithms: (N-1)/N of the data each
    way) and, with offload, in PCIe copies: DDP all-reduces the gradients (2x); FSDP2 all-gathers
    the weights for forward and (resharded) again for backward and reduce-scatters the gradients."""
    n = profile.gpus
    if n <= 1:
        return 0.0
    sh = est.extra.get("sharding", {})
    ranks = max(1, sh.get("shard_ranks", 1))
    weights = sh.get("param_shard_bytes", 0) * ranks
    grads = sh.get("grad_shard_bytes", 0) * ranks if profile.shard == "fsdp2" else \
        sh.get("grad_shard_bytes", 0)
    link = (gpu.nvlink_gbps or gpu.pcie_gbps) / 2 * 1e9  # bytes/s each way
    ring = (n - 1) / n
    if profile.shard == "ddp":
        moved = 2 * ring * grads
    else:
        gathers = 2 if profile.reshard_after_forward == "on" else 1
        moved = gathers * ring * weights + ring * grads
    seconds = moved / link if link else 0.0
    if profile.offload != "none":  # shards over PCIe: weights in for each gather, gradients out
        pcie = gpu.pcie_gbps / 2 * 1e9
        copied = (2 * sh.get("param_shard_bytes", 0) + sh.get("grad_shard_bytes", 0)
                  if profile.offload == "params" else 2 * sh.get("grad_shard_bytes", 0))
        seconds += copied / pcie if pcie else 0.0
    return seconds


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
    rows, best, fitting, speed = [], 0, (), []
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
            est = estimate(p, method=method)
            used = est.device_used_bytes
            rows.append((n, name, int(used), used <= budget_bytes))
            if used <= budget_bytes:
                fit_here.append(name)
                if getattr(est, "step_s", 0.0):
                    from engine import gpus as catalog

                    comm = communication_s(p, est, catalog.for_profile(p))
                    step = est.step_s + comm
                    speed.append((n, name, float(est.step_s), float(comm),
                                  n * p.batch * p.seq / step if step else 0.0))
        if fit_here and not best:
            best, fitting = n, tuple(fit_here)
            break
    notes = ["batch is per rank: the global batch is batch x N"]
    at_best = [x for x in speed if x[0] == best]
    fastest = max(at_best, key=lambda x: x[4])[1] if at_best else ""
    notes.append("tokens/s: the speed estimate plus the collectives over the catalog GPU's "
                 "interconnect, no overlap assumed" if speed else
                 "memory only: no speed estimate for this target")
    return GpuPlan(int(budget_bytes), best, fitting, tuple(rows), tuple(notes), fastest,
                   tuple(speed))
