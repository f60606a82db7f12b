"""The data-parallel run of a rank: process group, DDP / FSDP2 wrapping, the offloaded optimizer,
the per-rank shard bytes and the gathering of the ranks' results.

Each rank is a process started by ``torch.distributed.run`` (``torchrun``), which sets ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE`` and the rendezvous address. The backend is NCCL on GPUs and gloo on
CPU (the same code: FSDP2 runs on CPU with gloo). ``launch_command`` is the command that starts the
engine's own ``measure`` once per rank.

The functions that the exported script embeds (``wrap_data_parallel``, ``local_tensor``,
``CpuOffloadedOptimizer``) use torch only.
"""

from __future__ import annotations

import contextlib
import os
import sys

from engine.errors import BadInput

#: Environment variables torchrun sets in every rank.
RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


def in_rank_process() -> bool:
    """True inside a process torchrun started (``RANK`` and ``WORLD_SIZE`` set)."""
    return all(k in os.environ for k in RANK_ENV)


def launch_command(python: str, profile_path: str, gpus: int, extra: list[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N --no-python python -P -m
    engine measure ...``:
    the engine's measure once per rank (``--standalone``: a free local rendezvous port, so runs in
    parallel do not collide)."""
    # --no-python: each rank is ``python -P -m engine``, so a folder named engine in the working
    # directory is not imported (torchrun's own ``-m`` would put the cwd on the ranks' sys.path)
    return [python, "-P", "-c", _TORCHRUN, "--standalone", f"--nproc-per-node={gpus}",
            "--no-python", python, "-P", "-m", "engine", "measure", profile_path, *extra]


#: torchrun with the measure child's guard (``child_guard``): torchrun leads the child's process
#: group, so the guard ends it and its ranks when the parent goes; the ranks do not inherit it.
_TORCHRUN = ("import sys; from engine.measure.child_guard import guard_from_env; guard_from_env(); "
             "from torch.distributed.run import main; sys.exit(main())")


def local_tensor(t):
    """A DTensor's local shard (FSDP2 parameters, gradients, optimizer state), else ``t``."""
    return t.to_local() if hasattr(t, "to_local") and hasattr(t, "device_mesh") else t


def init_rank(profile):
    """Start this rank's process group; (rank, world size, torch.device). BadInput when the ranks
    do not match the profile or the device is missing."""
    import torch
    import torch.distributed as dist

    rank, local, world = (int(os.environ[k]) for k in RANK_ENV)
    if world != profile.gpus:
        raise BadInput(f"torchrun started {world} ranks but the profile asks for gpus = "
                       f"{profile.gpus}")
    if profile.target == "cuda":
        if torch.cuda.device_count() < profile.gpus:
            raise BadInput(f"gpus = {profile.gpus} needs {profile.gpus} CUDA devices; "
                           f"{torch.cuda.device_count()} here (measure with --target cpu: gloo)")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if profile.target == "cuda" else "gloo"
        kwargs = {"device_id": device} if profile.target == "cuda" else {}
        dist.init_process_group(backend, **kwargs)
    return rank, world, device


def finish_rank() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.barrier()
        dist.destroy_process_group()


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), on every rank, in rank order."""
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def wrap_data_parallel(model, shard, device, *, bucket_cap_mb=25, reshard_after_forward=True,
                       offload="none", param_dtype=None, reduce_dtype=None, nodes=1):
    """``model`` under DDP (gradient buckets of ``bucket_cap_mb`` MiB) or FSDP2 (``fully_shard`` on
    every transformer block, then the root; ``offload == "params"``: ``CPUOffloadPolicy``, pinned
    memory on CUDA only). dtypes are names ("bf16") or None. Torch only: the exported script
    embeds it."""
    import torch
    import torch.distributed as dist

    if shard == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, bucket_cap_mb=bucket_cap_mb)
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    kwargs = {"reshard_after_forward": reshard_after_forward}
    if param_dtype or reduce_dtype:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=names.get(param_dtype),
                                                   reduce_dtype=names.get(reduce_dtype))
    if offload == "params":
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    if nodes > 1:  # HSDP: replicate across nodes, shard within one
        from torch.distributed.device_mesh import init_device_mesh

        world = dist.get_world_size()
        kwargs["mesh"] = init_device_mesh(device.type, (nodes, world // nodes),
                                          mesh_dim_names=("replicate", "shard"))
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    blocks = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


class CpuOffloadedOptimizer:
    """AdamW (or SGD) whose state and step live on the CPU (ZeRO-Offload's split): the device keeps
    the sharded parameters and gradients; each step copies the gradient shards to the CPU, steps
    fp32 master copies there and copies the parameters back. On a CPU device the masters are the
    shards themselves (nothing to move). Torch only: the exported script embeds it."""

    def __init__(self, params, kind="adamw"):
        import torch

        self.params = [p for p in params if p.requires_grad]
        self.masters = []
        for p in self.params:
            shard = p.to_local() if hasattr(p, "to_local") else p
            cpu = shard.device.type == "cpu" and shard.dtype == torch.float32
            master = shard.detach() if cpu else shard.detach().to("cpu", torch.float32)
            self.masters.append(master.requires_grad_(True) if not cpu else master)
        from engine.optimizers import make_optimizer

        self.inner = make_optimizer(kind, self.masters)
        self.state = self.inner.state

    def step(self):
        import torch

        for p, master in zip(self.params, self.masters):
            if p.grad is None:
                continue
            grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            master.grad = grad.detach().to("cpu", torch.float32)
        self.inner.step()
        with torch.no_grad():
            for p, master in zip(self.params, self.masters):
                shard = p.to_local() if hasattr(p, "to_local") else p
                if shard.data_ptr() != master.data_ptr():
                    shard.copy_(master)
        for master in self.masters:
            master.grad = None

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def wrap(model, profile, device):
    """The profile's data-parallel wrapping of ``model`` (after the model techniques)."""
    return wrap_data_parallel(
        model, profile.shard, device, bucket_cap_mb=profile.bucket_cap_mb,
        reshard_after_forward=profile.reshard_after_forward == "on", offload=profile.offload,
        param_dtype=None if profile.mp_param_dtype == "off" else profile.mp_param_dtype,
        reduce_dtype=None if profile.mp_reduce_dtype == "off" else profile.mp_reduce_dtype,
        nodes=1)


def shard_bytes(model, optimizer) -> dict[str, int]:
    """This rank's bytes of the parameters, gradients and optimizer state as held (DTensor local
    shards' storages for FSDP2, distinct storages counted once)."""
    import torch

    def nbytes(tensors) -> int:
        seen = {}
        for t in tensors:
            if t is None or not isinstance(t, torch.Tensor):
                continue
            t = local_tensor(t)
            st = t.untyped_storage()
            seen[(str(t.device), st.data_ptr())] = st.nbytes()
        return sum(seen.values())

    params = [p for p in model.parameters()]
    states = []
    if optimizer is not None:
        states = [v for s in optimizer.state.values() for v in s.values()
                  if isinstance(v, torch.Tensor) and v.dim() > 0]
    return {"params": nbytes(params), "states": nbytes(states)}


class FsdpStorageTracking:
    """FSDP2 frees and re-allocates the gathered weights by resizing their storage
    (``_fsdp_param.alloc_storage`` / ``free_storage``), which no dispatcher sees: while entered,
    each resize is told to the live-bytes ``tracker`` so its bytes follow the all-gathers. Torch
    only: the exported script embeds it."""

    def __init__(self, tracker):
        self.tracker, self.saved = tracker, []

    def __enter__(self):
        if self.tracker is None:
            return self
        from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group

        alloc, free, tracker = _fsdp_param.alloc_storage, _fsdp_param.free_storage, self.tracker

        def tracked_alloc(tensor):
            alloc(tensor)
            tracker.track(tensor)

        def tracked_free(tensor):
            free(tensor)
            tracker.track(tensor)

        self.saved = [(_fsdp_param, "alloc_storage", alloc), (_fsdp_param, "free_storage", free),
                      (_fsdp_param_group, "alloc_storage", _fsdp_param_group.alloc_storage)]
        _fsdp_param.alloc_storage, _fsdp_param.free_storage = tracked_alloc, tracked_free
        _fsdp_param_group.alloc_storage = tracked_alloc
        return self

    def __exit__(self, *exc):
        for module, name, fn in self.saved:
            setattr(module, name, fn)
        self.saved = []


def fsdp_storage_tracking(tracker):
    return FsdpStorageTracking(tracker)


def init_data_parallel(device):
    """This rank's device and process group, from torchrun's environment: NCCL and
    ``cuda:LOCAL_RANK`` on GPUs, gloo on CPU. Torch only: the exported script embeds it."""
    import os

    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return device


def python_for_ranks() -> str:
    return sys.executable


def combine(ranks: list[dict]) -> dict:
    """One result from every rank's result dict: the worst rank's (highest peak allocated) numbers,
    with ``extra["ranks"]`` holding each rank's peak, reserved, breakdown and shards and
    ``extra["worst_rank"]`` naming it."""
    worst = max(range(len(ranks)), key=lambda r: ranks[r]["peak_allocated_bytes"])
    out = dict(ranks[worst])
    out["extra"] = dict(out.get("extra", {}))
    out["extra"]["worst_rank"] = worst
    out["extra"]["ranks"] = [
        {"rank": r, "peak_allocated_bytes": d["peak_allocated_bytes"],
         "peak_reserved_bytes": d["peak_reserved_bytes"], "device_used_bytes": d["device_used_bytes"],
         "breakdown": d["breakdown"], "oom": d["oom"], "step_time_s": d["step_time_s"],
         **d.get("extra", {}).get("sharding", {})}
        for r, d in enumerate(ranks)]
    out["oom"] = any(d["oom"] for d in ranks)
    # the ranks step together, each on its own batch: the data-parallel throughput is their sum
    for key in ("tokens_per_s", "useful_tokens_per_s", "real_tokens", "padded_tokens"):
        out[key] = sum(d[key] for d in ranks)
    return out
