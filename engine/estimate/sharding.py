"""Per-rank memory of a data-parallel profile (``engine.techniques.sharding``), for both estimators.

Both estimators model one rank's step on its local batch (activations, temporaries, the loss) as
they do for one GPU; this module turns each of their candidate moments (phase, weights, gradients
so far, optimizer state, activations, temporaries) into the rank's, from the built meta model's
real parameter shapes grouped as FSDP2 groups them (every transformer block, then the root holding
the rest: embeddings, final norm, LM head).

FSDP2 (``torch/distributed/fsdp/_fully_shard/_fsdp_param.py``, ``_fsdp_collectives.py``):

* each parameter is split on dim 0 into N chunks and stored padded: every rank holds
  ``ceil(d0 / N) * rest`` elements (``padded_sharded_param``), so the sharded weights, gradients
  and AdamW states are the same on every rank (rank 0 is never smaller);
* a group's weights are all-gathered (per parameter, N x the padded shard, in ``param_dtype``)
  before it runs and freed after its forward (``reshard_after_forward``) or kept until its
  backward; the root is never resharded after forward; in backward the previous block is
  prefetched while a block runs (two blocks gathered);
* a group's gradients are computed unsharded, copied into the reduce-scatter input (N x padded
  shard, ``reduce_dtype``) while still alive, then reduced into a padded shard per rank; the root's
  gradients (LM head first, embeddings last) are reduced after the last block's.

DDP (``torch/nn/parallel/distributed.py``, ``reducer.cpp``): full weights, gradients and states on
every rank, plus the reducer's gradient buckets (``bucket_cap_mb`` each, together the size of the
trainable gradients, allocated when the model is wrapped: ``gradient_as_bucket_view=False``).

Offload: ``params`` (CPUOffloadPolicy) keeps the sharded weights, gradients and optimizer state in
CPU memory; ``optimizer`` keeps the optimizer state (and fp32 master shards) there. On a CPU target
nothing moves: those bytes stay in the rank's count.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from engine.estimate.allocator import round_size
from engine.profile import Profile

_ELT = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Group:
    """One FSDP2 group: its parameters' (dim 0, numel, element bytes)."""

    name: str
    params: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class Layout:
    blocks: tuple[Group, ...]
    root: Group  # everything outside the blocks
    head_numels: tuple[int, ...]  # root parameters registered after the blocks (reduced first)
    buffer_bytes: int = 0
    tied: bool = False  # the output embedding is the input embedding's tensor


@functools.lru_cache(maxsize=16)
def _layout(key: tuple) -> Layout:
    from engine.models import build_model, transformer_blocks

    model = build_model(Profile(**dict(key)), "meta")
    blocks = transformer_blocks(model)
    in_blocks = {id(p) for p in blocks.parameters()}
    groups = []
    for i, block in enumerate(blocks):
        groups.append(Group(f"block {i}", tuple(
            (int(p.shape[0]) if p.dim() else 1, p.numel(), p.element_size())
            for p in block.parameters() if p.requires_grad)))
    root, head, after, seen = [], [], False, set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in in_blocks:
            after = True
            continue
        if not p.requires_grad:
            continue
        root.append((int(p.shape[0]) if p.dim() else 1, p.numel(), p.element_size()))
        if after:
            head.append(p.numel())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = bool(out_emb is not None and in_emb is not None
                and getattr(out_emb, "weight", None) is getattr(in_emb, "weight", 0))
    return Layout(tuple(groups), Group("root", tuple(root)), tuple(head), buffers, tied)


def layout_of(profile: Profile) -> Layout:
    from engine.estimate.analytic import _arch_fields

    return _layout(tuple((f, getattr(profile, f)) for f in _arch_fields()))


def padded_shard_numel(dim0: int, numel: int, n: int) -> int:
    """Elements one rank holds of a parameter split on dim 0 over ``n`` ranks (FSDP2 pads every
    rank to ``ceil(dim0 / n)`` rows)."""
    rest = numel // dim0 if dim0 else 0
    return -(-dim0 // n) * rest


@dataclass(frozen=True)
class RankModel:
    """What one rank holds, in bytes (device unless said), for a profile."""

    shard: str
    n: int  # ranks a parameter is split over (1: DDP)
    cuda: bool
    weights: int  # sharded (FSDP2) or full (DDP) weights on the device
    grads: int  # sharded gradients after the step's reduce-scatter
    states: int  # optimizer state per rank
    unsharded: dict  # group name -> bytes all-gathered (param dtype)
    unsharded_grads: dict  # group name -> unsharded gradient bytes
    rs_input: dict  # group name -> reduce-scatter input bytes
    shard_grads: dict  # group name -> sharded gradient bytes
    order: tuple[str, ...]  # backward order of the block groups (last block first)
    largest_shard: int  # numel of the largest local parameter shard
    buckets: int  # DDP gradient buckets
    host: int  # bytes in CPU memory (offloaded state), counted on the device for a CPU target
    head_grads: int  # unsharded gradient bytes of the root's head parameters (reduced last)
    persistent_host: dict  # category -> offloaded bytes moved off the device
    single_opt_temp: int  # the one-GPU optimizer step's temporaries (what the estimators counted)
    largest_grad: dict  # group name -> its largest unsharded gradient's bytes
    buffers: int  # module buffers (rotary tables): every rank holds them whole
    tied: bool  # the LM head shares the input embedding's weight
    full_grads: int  # the one-GPU gradients

    @property
    def state_bytes(self) -> dict:
        return {"weights": self.weights, "gradients": self.grads, "optimizer": self.states}


def _r(n: int, cuda: bool) -> int:
    return round_size(int(n)) if cuda and n > 0 else int(n)


def rank_model(profile: Profile) -> RankModel:
    lay = layout_of(profile)
    cuda = profile.target == "cuda"
    n = profile.shard_ranks
    # state tensors per parameter tensor (engine.optimizers has the exact bytes of each optimizer;
    # the 8-bit ones and Adafactor are counted here as their nearest fp32 equivalent)
    n_states = {"adamw": 2, "sgd": 1, "lion": 1, "adamw-8bit": 2, "paged-adamw-8bit": 2,
                "adafactor": 1}.get(profile.optimizer, 2)
    groups = lay.blocks + (lay.root,)
    unsharded, ugrads, rs_in, sgrads, largest_grad = {}, {}, {}, {}, {}
    weights = grads = states = 0
    largest = 0
    for g in groups:
        u = ug = rsi = sg = 0
        for d0, numel, elt in g.params:
            if profile.shard == "fsdp2":
                shard = padded_shard_numel(d0, numel, n)
            else:
                shard = numel
            largest = max(largest, shard)
            p_elt = _ELT.get(profile.mp_param_dtype, elt)
            r_elt = _ELT.get(profile.mp_reduce_dtype, p_elt)
            weights += _r(shard * elt, cuda)
            states += n_states * _r(shard * elt, cuda)
            u += _r(shard * n * p_elt, cuda)  # the per-parameter all-gather output
            ug += _r(numel * p_elt, cuda)
            rsi += shard * n * r_elt
            sg += shard * elt
        unsharded[g.name], ugrads[g.name] = u, ug
        largest_grad[g.name] = max((_r(numel * _ELT.get(profile.mp_param_dtype, elt), cuda)
                                    for _, numel, elt in g.params), default=0)
        rs_in[g.name], sgrads[g.name] = _r(rsi, cuda), _r(sg, cuda)
        grads += sgrads[g.name] if profile.shard == "fsdp2" else ug
    if profile.shard == "ddp":
        weights = sum(_r(numel * elt, cuda) for g in groups for _, numel, elt in g.params)
        grads = weights
    buckets = grads if profile.shard == "ddp" else 0
    p_elt_head = [elt for _, _, elt in lay.root.params][:1] or [4]
    head_grads = sum(_r(x * _ELT.get(profile.mp_param_dtype, p_elt_head[0]), cuda)
                     for x in lay.head_numels)
    host, moved = 0, {}
    if profile.offload == "params":
        moved = {"weights": weights, "gradients": grads, "optimizer": states}
    elif profile.offload == "optimizer":
        moved = {"optimizer": states}
        # fp32 master shards beside the state (the shards themselves on a CPU target)
        host += weights * 4 // max(1, p_elt_head[0]) if cuda else 0
    host += sum(moved.values())
    full = [(numel, elt) for g in groups for _, numel, elt in g.params]
    if not n_states:
        single_tmp = 0
    elif cuda:
        single_tmp = sum(_r(numel * elt, cuda) for numel, elt in full)
    else:
        single_tmp = 2 * max((numel for numel, _ in full), default=0) * 4
    return RankModel(profile.shard, n, cuda, weights, grads, states, unsharded, ugrads, rs_in,
                     sgrads, tuple(g.name for g in reversed(lay.blocks)), largest, buckets, host,
                     head_grads, moved if cuda else {}, single_tmp, largest_grad,
                     _r(lay.buffer_bytes, cuda), lay.tied, sum(ugrads.values()))


def _device(rm: RankModel, cat: str, value: int) -> int:
    """``value`` less what offload moved off the device (CUDA targets)."""
    return max(0, value - rm.persistent_host.get(cat, 0))


def adjust(rm: RankModel, profile: Profile, phase: str, w: int, g: int, o: int, a: int, tmp: int,
           single_w: int, single_g: int, single_o: int, where: str = "",
           traced: bool = False) -> tuple[int, ...]:
    """The rank's (weights, gradients, optimizer, activations, temporaries) at a candidate moment of
    the one-GPU model: ``single_*`` are that model's full weights / gradients / states, ``g`` the
    gradients it holds at that moment, ``where`` the moment ("loss", "end", "" = infer from ``g``).
    Weights and temporaries of a frozen extra model (a teacher) pass through unchanged. ``traced``:
    the moment's temporaries are a traced step's, which hold the ops' own transients (a tied
    embedding's gradient sum) already."""
    extra_w = max(0, w - single_w)
    if rm.shard == "ddp":
        return (w, g + rm.buckets, o, a, tmp)
    opt = _device(rm, "optimizer", rm.states if o else 0)
    sharded_w = _device(rm, "weights", rm.weights) + rm.buffers + extra_w  # buffers: not sharded
    root_u = rm.unsharded["root"]
    blocks_u = [rm.unsharded[name] for name in rm.order]  # last block first
    keep_all = profile.reshard_after_forward == "off"
    if phase == "optimizer":
        # the optimizer step on the shards; its temporaries scale with the shards (on the CPU
        # when the optimizer is offloaded to a CUDA target's host)
        grads = _device(rm, "gradients", rm.grads)
        rank_tmp = 0 if (rm.persistent_host and "optimizer" in rm.persistent_host) \
            else optimizer_temp(rm, rm.cuda)
        return (sharded_w, grads, opt, a, max(0, tmp - rm.single_opt_temp) + rank_tmp)
    if phase == "forward":
        gathered = root_u + (sum(blocks_u) if keep_all else 0)
        # a later micro-batch's forward: the earlier ones' gradients were reduced into shards
        return (sharded_w + gathered, _device(rm, "gradients", rm.grads) if g else 0, opt, a, tmp)
    # backward: where are we? the one-GPU gradients so far tell how many groups are done
    if not where:
        if g <= 0:
            where = "loss"
        elif g >= single_g:
            # a traced moment inside the root's backward (its gradients complete, the ops' own
            # transients in ``tmp``); the analytic model's end is its post-backward
            where = "root" if traced else "end"
        else:  # inside block k: the head's and the later blocks' gradients reach g
            acc, where = rm.head_grads, str(len(rm.order) - 1)
            for k, name in enumerate(rm.order):
                acc += rm.unsharded_grads[name]
                if acc >= g:
                    where = str(k)
                    break
    if where == "loss":
        gathered = root_u + (sum(blocks_u) if keep_all else 0)
        return (sharded_w + gathered, rm.head_grads if g else 0, opt, a, tmp)
    if where == "root":
        done = _device(rm, "gradients", sum(rm.shard_grads[name] for name in rm.order))
        return (sharded_w + root_u, done + rm.unsharded_grads["root"], opt, a, tmp)
    if where == "end":
        # the root's post-backward, its reduce-scatter (the largest of the group's moments)
        done = _device(rm, "gradients", sum(rm.shard_grads[name] for name in rm.order))
        return (sharded_w, done, opt, a, tmp + _post_backward(rm, "root", not traced))
    # block k (backward order: 0 = the last block) after its backward: its gradients, its weights
    # then the reduce-scatter input; the next block to run is prefetched; the root's head
    # gradients wait for the root's reduce-scatter at the end
    k = int(where)
    name = rm.order[k]
    prefetch = blocks_u[k + 1] if k + 1 < len(blocks_u) else 0
    gathered = root_u + prefetch
    if keep_all:
        gathered = root_u + sum(blocks_u[k + 1:])
    done = _device(rm, "gradients", sum(rm.shard_grads[x] for x in rm.order[:k]))
    return (sharded_w + gathered, rm.head_grads + done, opt, a,
            tmp + _post_backward(rm, name, not traced))


def _post_backward(rm: RankModel, name: str, tied_sum: bool = True) -> int:
    """The largest moment of a group's post-backward (``FSDPParamGroup.post_backward``,
    ``foreach_reduce``): its unsharded gradients with its gathered weights (before the reshard),
    then with the reduce-scatter input (the copy-in), then the reduce-scatter itself: the input, the
    padded output shard, the group's largest unsharded gradient (the one autograd produced last,
    still referenced until the hook returns) and, on gloo (CPU), the backend's copy of the input."""
    ug, u, rsi = rm.unsharded_grads[name], rm.unsharded[name], rm.rs_input[name]
    staging = 0 if rm.cuda else rsi
    scatter = rsi + staging + rm.shard_grads[name] + rm.largest_grad[name]
    # a tied embedding's second gradient (the embedding's backward) is added to the LM head's:
    # the old, the new and the sum are alive at once, beside the gathered weights
    tied = 2 * rm.largest_grad[name] if name == "root" and rm.tied and tied_sum else 0
    return max(ug + u + tied, ug + rsi, scatter)


def optimizer_temp(rm: RankModel, cuda: bool) -> int:
    """The optimizer step's temporaries on the shards: torch's foreach AdamW on CUDA
    (``exp_avg_sq.sqrt()`` of every shard), the for-loop's two largest-shard fp32 tensors on CPU."""
    if rm.states == 0:
        return 0
    if cuda:
        return rm.weights
    return 2 * rm.largest_shard * 4


def summary(rm: RankModel, profile: Profile) -> dict:
    """The estimate's ``extra["sharding"]``: what one rank holds and what moved to the CPU."""
    return {"shard": profile.shard, "gpus": profile.gpus, "nodes": profile.nodes,
            "shard_ranks": rm.n, "dp_batch": profile.batch * profile.gpus,
            "param_shard_bytes": rm.weights, "grad_shard_bytes": rm.grads,
            "optimizer_shard_bytes": rm.states, "ddp_bucket_bytes": rm.buckets,
            "unsharded_root_bytes": rm.unsharded.get("root", 0),
            "unsharded_block_bytes": max((rm.unsharded[x] for x in rm.order), default=0),
            "host_bytes": rm.host, "offload": profile.offload}


def rank_peak(profile: Profile, points) -> tuple[int, dict, str]:
    """(peak, breakdown, phase) of one rank from the traced one-GPU step's phase points: each
    point's weights / gradients / optimizer state become the rank's (``adjust``)."""
    rm = rank_model(profile)
    lay = layout_of(profile)
    # the traced weights are the model's parameters and buffers (a teacher's too): what is beyond
    # the student's passes through
    single_w = sum(_r(numel * elt, rm.cuda) for g in lay.blocks + (lay.root,)
                   for _, numel, elt in g.params) + rm.buffers
    best = None
    for phase, where, bd in points:
        w, g, o, a, tmp = (bd.get(k, 0) for k in ("weights", "gradients", "optimizer",
                                                    "activations", "temporaries"))
        out = adjust(rm, profile, phase, w, g, o, a, tmp, single_w, rm.full_grads, o, where,
                     traced=True)
        if best is None or sum(out) > best[0]:
            best = (sum(out), dict(zip(("weights", "gradients", "optimizer", "activations",
                                         "temporaries"), out)), phase)
    return best
