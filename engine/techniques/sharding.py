"""Data parallelism over N GPUs: DDP (replicated weights, gradient buckets) or FSDP2 (``fully_shard``).

``gpus`` ranks each run ``batch`` sequences (the data-parallel batch is ``batch x gpus``).
``shard = ddp``: ``DistributedDataParallel`` with ``bucket_cap_mb`` gradient buckets;
``shard = fsdp2``: ``fully_shard`` on every transformer block (``engine.models.transformer_blocks``)
and on the root, with ``reshard_after_forward``, a ``MixedPrecisionPolicy`` (param / reduce dtypes)
and ``offload`` (``params``: FSDP2's ``CPUOffloadPolicy``, sharded parameters, gradients and the
optimizer step on the CPU; ``optimizer``: the optimizer's state and step on the CPU, parameters and
gradients on the device). ``nodes > 1`` plans HSDP on paper: a 2-D mesh (replicate across nodes,
shard within one).

The run (``engine.distributed``) and the per-rank estimate (``engine.estimate.sharding``) live
outside this module: this one declares fields, rules, controls and texts and imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.errors import BadInput
from engine.techniques.base import Control, Field, Technique

if TYPE_CHECKING:
    from engine.profile import Profile

SHARDS = ("none", "ddp", "fsdp2")
OFFLOADS = ("none", "optimizer", "params")
MP_DTYPES = ("off", "fp32", "bf16", "fp16")
#: DDP's default bucket size (torch.nn.parallel.DistributedDataParallel, bucket_cap_mb=25).
DDP_BUCKET_MB = 25

EXPLANATION = (
    "Data parallelism runs the step on N GPUs at once, each on its own batch (the global batch is "
    "batch x N). DDP keeps a full copy of the weights, gradients and optimizer state on every GPU "
    "and adds gradient buckets (bucket_cap_mb each, together as large as the gradients) that it "
    "all-reduces during backward: it saves no memory, it adds throughput. FSDP2 (fully_shard) "
    "splits weights, gradients and optimizer state into N shards (each parameter's first dimension, "
    "rounded up so every rank holds the same padded size); a block's full weights are all-gathered "
    "just before it runs and freed after it (reshard after forward on), or kept until its backward "
    "(off: one all-gather fewer, more memory), and its gradients are reduce-scattered into shards. "
    "Activations are those of the local batch. Offload moves the optimizer state (and with "
    "'params' the sharded weights and gradients too) to CPU memory, at the cost of PCIe copies and "
    "a CPU optimizer step. HSDP (nodes > 1) shards within a node and replicates across nodes."
)


def _per_node(p: "Profile") -> int:
    return p.gpus // p.nodes if p.nodes else p.gpus


def shard_ranks(p: "Profile") -> int:
    """Ranks a parameter is split over: FSDP2's shard dimension (within a node under HSDP)."""
    return _per_node(p) if p.shard == "fsdp2" else 1


def validate(p: "Profile") -> None:
    if p.gpus > 1 and p.shard == "none":
        raise BadInput(f"gpus = {p.gpus} needs a data-parallel engine: --shard ddp or --shard fsdp2")
    if p.shard != "none" and p.mode != "train":
        raise BadInput(f"--shard {p.shard} applies to training (inference runs on one GPU here)")
    if p.shard != "fsdp2":
        for name, value, default in (("offload", p.offload, "none"),
                                     ("reshard_after_forward", p.reshard_after_forward, "on"),
                                     ("mp_param_dtype", p.mp_param_dtype, "off"),
                                     ("mp_reduce_dtype", p.mp_reduce_dtype, "off")):
            if value != default:
                raise BadInput(f"{name} = {value} is an FSDP2 option: it needs --shard fsdp2")
        if p.nodes > 1:
            raise BadInput("nodes > 1 (HSDP: replicate across nodes) needs --shard fsdp2")
    if p.gpus % p.nodes:
        raise BadInput(f"gpus ({p.gpus}) must be a multiple of nodes ({p.nodes}): the same GPUs "
                       f"per node")
    if p.bucket_cap_mb != DDP_BUCKET_MB and p.shard != "ddp":
        raise BadInput("bucket_cap_mb is DDP's gradient bucket size: it needs --shard ddp")


def check(prepared) -> list[str]:
    p = prepared.profile
    notes = [f"data parallel over {p.gpus} rank(s) ({p.shard}): global batch {p.batch} x "
             f"{p.gpus} = {p.batch * p.gpus} sequences per step; memory is per rank"]
    if p.target != "cuda":
        notes.append("CPU target: every rank runs on this machine with the gloo backend")
        if p.offload != "none":
            notes.append(f"offload = {p.offload} on a CPU target moves nothing (the device is the "
                         "CPU): the offloaded state is counted in the rank's bytes")
    if p.nodes > 1:
        notes.append(f"HSDP on paper: {p.nodes} nodes x {_per_node(p)} GPUs, shard within a node, "
                     "replicate across nodes (measure and export run one node)")
    return notes


def _export_source() -> list:
    """What the exported script embeds: the rank's setup, the wrapping, the offloaded optimizer and
    the tracker's view of FSDP2's storage resizes (``engine.distributed``, torch only)."""
    from engine import distributed

    return [distributed.init_data_parallel, distributed.wrap_data_parallel,
            distributed.CpuOffloadedOptimizer, distributed.FsdpStorageTracking]


def _shard_changes(values: dict) -> dict:
    """Back to one GPU: one rank and the FSDP2/DDP options at their defaults (they need a shard);
    DDP: the FSDP2 options at their defaults."""
    shard = values["shard"]
    out = {"shard": shard}
    if shard != "fsdp2":
        out.update(reshard_after_forward="on", offload="none", mp_param_dtype="off",
                   mp_reduce_dtype="off", nodes=1)
    if shard != "ddp":
        out["bucket_cap_mb"] = DDP_BUCKET_MB
    if shard == "none":
        out["gpus"] = 1
    return out


def _gpus_changes(values: dict) -> dict:
    """More than one GPU needs a data-parallel engine: FSDP2 unless one is chosen."""
    out = {"gpus": values["gpus"]}
    if values["gpus"] > 1 and values.get("shard", "none") == "none":
        out["shard"] = "fsdp2"
    return out


TECHNIQUE = Technique(
    name="sharding",
    title="GPUs and sharding",
    order=95,
    fields=(
        Field("gpus", int, 1, "data-parallel ranks (GPUs); each runs the batch: global batch = "
              "batch x gpus", minimum=1, maximum=1 << 16, metavar="N", after="target",
              label="GPUs"),
        Field("shard", str, "none", "none | ddp | fsdp2 (data-parallel engine)", choices=SHARDS,
              label="sharding"),
        Field("reshard_after_forward", str, "on", "FSDP2: free a block's gathered weights after "
              "its forward (on) or keep them for backward (off)", choices=("on", "off"),
              label="reshard after forward"),
        Field("offload", str, "none", "FSDP2: none | optimizer (state and step on CPU) | params "
              "(CPUOffloadPolicy: sharded weights, gradients and optimizer on CPU)",
              choices=OFFLOADS, label="CPU offload"),
        Field("mp_param_dtype", str, "off", "FSDP2 MixedPrecisionPolicy param_dtype (all-gathered "
              "weights): off | fp32 | bf16 | fp16", choices=MP_DTYPES,
              label="FSDP2 param dtype"),
        Field("mp_reduce_dtype", str, "off", "FSDP2 MixedPrecisionPolicy reduce_dtype (gradient "
              "reduce-scatter): off | fp32 | bf16 | fp16", choices=MP_DTYPES,
              label="FSDP2 reduce dtype"),
        Field("bucket_cap_mb", int, DDP_BUCKET_MB, "DDP: gradient bucket size in MiB",
              minimum=1, maximum=1 << 16, metavar="MB", label="DDP bucket size (MiB)"),
        Field("nodes", int, 1, "FSDP2 HSDP on paper: nodes (shard within a node, replicate "
              "across)", minimum=1, maximum=1 << 12, metavar="N", label="nodes (HSDP)"),
    ),
    controls=(
        Control("gpus", "spin", "GPUs (ranks)", field="gpus", low=1, high=1024,
                write=_gpus_changes,
                enabled_when=lambda p: p.mode == "train",
                tooltip="Each rank runs the batch: the global batch is batch x GPUs. "
                        "Memory bars are per rank (the worst rank)."),
        Control("shard", "combo", "Data parallel", choices={
            "none": "One GPU", "ddp": "DDP (replicated)", "fsdp2": "FSDP2 (fully_shard)"},
            field="shard", write=_shard_changes, enabled_when=lambda p: p.mode == "train"),
        Control("reshard_after_forward", "check", text="Reshard after forward",
                read=lambda p: p.reshard_after_forward == "on",
                write=lambda v: {"reshard_after_forward": "on" if v["reshard_after_forward"]
                                 else "off"},
                enabled_when=lambda p: p.shard == "fsdp2"),
        Control("offload", "combo", "CPU offload", choices={
            "none": "None", "optimizer": "Optimizer state", "params": "Params + grads + optimizer"},
            field="offload", enabled_when=lambda p: p.shard == "fsdp2",
            tooltip="'params' is FSDP2's CPUOffloadPolicy. On a CPU target nothing moves."),
        Control("mp_param_dtype", "combo", "Gathered weights dtype", choices={
            "off": "As stored", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"},
            field="mp_param_dtype", enabled_when=lambda p: p.shard == "fsdp2"),
        Control("mp_reduce_dtype", "combo", "Gradient reduce dtype", choices={
            "off": "As gathered", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"},
            field="mp_reduce_dtype", enabled_when=lambda p: p.shard == "fsdp2"),
        Control("bucket_cap_mb", "spin", "DDP bucket size", field="bucket_cap_mb", low=1,
                high=4096, suffix=" MiB", enabled_when=lambda p: p.shard == "ddp"),
        Control("nodes", "spin", "Nodes (HSDP, on paper)", field="nodes", low=1, high=4096,
                enabled_when=lambda p: p.shard == "fsdp2",
                tooltip="Shard within a node, replicate across nodes. Estimated only: a measured "
                        "run uses one node."),
    ),
    explanations={"sharding": EXPLANATION},
    summary_title=lambda p: f"Data parallel: {p.shard} on {p.gpus} GPU(s)",
    properties={
        "dp_batch": lambda p: p.batch * p.gpus,
        "shard_ranks": shard_ranks,
        "distributed": lambda p: p.shard != "none",
    },
    active=lambda p: p.shard != "none",
    export_source=lambda: _export_source(),
    export_constants=lambda p: [
        ("SHARD", p.shard, "data parallel: ddp | fsdp2 (the script runs under torchrun)"),
        ("GPUS", p.gpus, "ranks: torchrun --nproc-per-node GPUS"),
        ("BUCKET_CAP_MB", p.bucket_cap_mb, "DDP gradient bucket size"),
        ("RESHARD_AFTER_FORWARD", p.reshard_after_forward == "on", "FSDP2"),
        ("OFFLOAD", p.offload, "FSDP2: none | optimizer | params"),
        ("MP_PARAM_DTYPE", None if p.mp_param_dtype == "off" else p.mp_param_dtype, "FSDP2"),
        ("MP_REDUCE_DTYPE", None if p.mp_reduce_dtype == "off" else p.mp_reduce_dtype, "FSDP2")],
    validate=validate,
    check=check,
)
