"""Pruning: unstructured L1 (zeros, dense storage) and structured (heads / FFN neurons removed).

``prune = "unstructured:F"``: ``torch.nn.utils.prune.l1_unstructured`` on every Linear/Conv1D
weight of the transformer blocks, made permanent with ``prune.remove``. The weights stay dense
tensors of the same shape: **no memory is saved** (the note says so). On the meta device nothing is
done (no values; shapes are unchanged anyway).

``prune = "heads:F"``: remove round(F·heads) attention heads per block by slicing the q/k/v and
output projections and updating the head counts on the attention modules and on the config
(transformers 5 dropped ``prune_heads``). Grouped-query attention (``num_key_value_heads <
num_attention_heads``: Llama, Qwen2, Mistral) removes whole key/value groups with their query
heads, so the group ratio is kept. Handled layouts: GPT-2 fused ``c_attn`` (Conv1D, q|k|v
concatenated) + ``c_proj``; BERT ``self.query/key/value`` + ``output.dense``; DistilBERT
``q_lin/k_lin/v_lin/out_lin``; Llama-style ``q_proj/k_proj/v_proj/o_proj``.

``prune = "ffn:F"``: remove round(F·width) intermediate neurons per block: gated MLPs (rows of
``gate_proj``/``up_proj``, columns of ``down_proj``), GPT-2 ``c_fc``/``c_proj``, BERT
``intermediate.dense``/``output.dense``, DistilBERT ``lin1``/``lin2`` and GeGLU blocks (pruning
runs after GeGLU, so it prunes the GeGLU width).

Which heads/neurons go: on real weights the ones with the smallest L1 norm (summed over all the
weights that belong to them); on meta (estimates) the last ones, since only shapes matter there.
After structured pruning the config describes the pruned model: ``num_attention_heads``,
``num_key_value_heads`` (with an explicit ``head_dim``), ``intermediate_size``/``n_inner``.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING

from engine.errors import BadInput
from engine.models import transformer_blocks
from engine.techniques.base import AnalyticSetup, Control, Field, Technique

if TYPE_CHECKING:
    import torch

    from engine.profile import Profile

EXPLANATION = (
    "Pruning removes weights. Unstructured pruning zeros the fraction F of weights with the "
    "smallest magnitude (L1) in every linear layer; the weights stay dense tensors of the same "
    "shape, so it saves no memory and no time on a GPU (it only helps with sparse storage or "
    "kernels, which this run does not use) - Headroom shows it for honesty. Structured pruning "
    "really removes parts of the network: 'heads:F' removes a fraction of attention heads "
    "(for grouped-query models whole key/value groups with their query heads) and 'ffn:F' removes "
    "a fraction of the feed-forward neurons. Weights, gradients, optimizer state and the pruned "
    "parts' activations shrink, and steps get faster. The cost is accuracy: a pruned model "
    "usually needs fine-tuning to recover, and the quality loss grows with F."
)


def applies(profile: "Profile") -> bool:
    return bool(profile.prune) and profile.prune_fraction > 0


def apply(model: "torch.nn.Module", profile: "Profile") -> str | None:
    from engine.models import find_layers

    kind, fraction = profile.prune_kind, profile.prune_fraction
    prune = {"unstructured": prune_unstructured, "heads": prune_heads, "ffn": prune_ffn}.get(kind)
    if prune is None:
        raise BadInput(f"unknown pruning kind {kind!r}")
    find_layers(model)  # BadInput when the model has no block list
    try:
        return prune(model, fraction)
    except ValueError as exc:  # a layout that is not recognised
        raise BadInput(str(exc)) from None


# ----- helpers (torch only from here on: the exported script embeds what its call needs) ------
def _is_gated(module) -> bool:
    """GeGLU's GatedProjection (gate and up projections, no weight of its own)."""
    return getattr(module, "weight", None) is None and hasattr(module, "gate") and hasattr(module, "up")


def _is_conv1d(module) -> bool:
    return type(module).__name__ == "Conv1D"


def _is_on_meta(model) -> bool:
    for p in model.parameters():
        return p.device.type == "meta"
    return False


def _linear_like(module) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear) or _is_conv1d(module)


def _set_param(module, name: str, value) -> None:
    import torch

    old = getattr(module, name)
    setattr(module, name, torch.nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def keep_outputs(module, index) -> None:
    """Keep only output features ``index`` of a Linear / Conv1D (weights sliced, sizes updated)."""
    import torch

    if _is_gated(module):
        keep_outputs(module.gate, index)
        keep_outputs(module.up, index)
        return
    w = module.weight
    index = index.to(w.device)
    if _is_conv1d(module):  # weight (in, out)
        _set_param(module, "weight", torch.index_select(w.data, 1, index))
        module.nf = int(index.numel())
    else:  # weight (out, in)
        _set_param(module, "weight", torch.index_select(w.data, 0, index))
        module.out_features = int(index.numel())
    if getattr(module, "bias", None) is not None:
        _set_param(module, "bias", torch.index_select(module.bias.data, 0, index))


def keep_inputs(module, index) -> None:
    """Keep only input features ``index`` of a Linear / Conv1D."""
    import torch

    w = module.weight
    index = index.to(w.device)
    if _is_conv1d(module):
        _set_param(module, "weight", torch.index_select(w.data, 0, index))
        module.nx = int(index.numel())
    else:
        _set_param(module, "weight", torch.index_select(w.data, 1, index))
        module.in_features = int(index.numel())


def _out_rows_l1(module):
    """(out,) L1 norm of each output feature's incoming weights (float32, on the weight's device)."""
    if _is_gated(module):
        return _out_rows_l1(module.gate) + _out_rows_l1(module.up)
    w = module.weight.detach().float()
    return w.abs().sum(0) if _is_conv1d(module) else w.abs().sum(1)


def _in_cols_l1(module):
    w = module.weight.detach().float()
    return w.abs().sum(1) if _is_conv1d(module) else w.abs().sum(0)


def _n_out(module) -> int:
    if _is_gated(module):
        return _n_out(module.gate)
    return int(module.weight.shape[1] if _is_conv1d(module) else module.weight.shape[0])


def _choose(scores, total: int, keep: int, on_meta: bool):
    """Sorted indices of the ``keep`` units to keep out of ``total`` (largest score)."""
    import torch

    if on_meta or scores is None:
        return torch.arange(keep)
    top = torch.topk(scores.float().cpu(), keep).indices
    return torch.sort(top).values


def _unit_index(units, size: int):
    """Feature indices of whole units (heads) of ``size`` features each."""
    import torch

    units = units.to("cpu")
    return (units[:, None] * size + torch.arange(size)[None, :]).reshape(-1)


# ----- unstructured ---------------------------------------------------------------------------
def prune_unstructured(model, fraction: float) -> str:
    import torch
    from torch.nn.utils import prune

    layers = transformer_blocks(model)
    targets = [m for m in layers.modules() if _linear_like(m)]
    if _is_on_meta(model):
        return (f"unstructured pruning ({fraction:.0%} of weights zeroed in {len(targets)} layers) "
                f"saves no dense memory: the weights stay dense tensors of the same shape")
    zeroed = total = 0
    with torch.no_grad():
        for m in targets:
            prune.l1_unstructured(m, "weight", amount=fraction)
            prune.remove(m, "weight")  # permanent: weight is a plain dense Parameter again
            zeroed += int((m.weight == 0).sum())
            total += m.weight.numel()
    return (f"unstructured pruning zeroed {zeroed / max(total, 1):.0%} of {total:,} weights in "
            f"{len(targets)} layers; saves no dense memory (weights stay dense, same shape)")


# ----- attention heads ------------------------------------------------------------------------
class _AttnSpec:
    """Where one self-attention's projections are, and how to update its head counts."""

    def __init__(self, module, q, k, v, o, fused=None):
        self.module = module  # the module holding head-count attributes
        self.q, self.k, self.v, self.o = q, k, v, o  # projection modules (q=k=v=fused for GPT-2)
        self.fused = fused  # GPT-2 c_attn (q|k|v concatenated on the output dim), else None


def _find_attention(block) -> list[tuple[_AttnSpec, object]]:
    """The self-attention modules of a block (cross-attention left alone)."""
    found = []
    for _, mod in block.named_modules():
        if getattr(mod, "is_cross_attention", False):
            continue
        if all(hasattr(mod, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            found.append(_AttnSpec(mod, mod.q_proj, mod.k_proj, mod.v_proj, mod.o_proj))
        elif hasattr(mod, "c_attn") and hasattr(mod, "c_proj") and _is_conv1d(mod.c_attn):
            found.append(_AttnSpec(mod, None, None, None, mod.c_proj, fused=mod.c_attn))
        elif all(hasattr(mod, n) for n in ("q_lin", "k_lin", "v_lin", "out_lin")):
            found.append(_AttnSpec(mod, mod.q_lin, mod.k_lin, mod.v_lin, mod.out_lin))
        elif (hasattr(mod, "self") and all(hasattr(mod.self, n) for n in ("query", "key", "value"))
              and hasattr(getattr(mod, "output", None), "dense")
              and not getattr(mod, "is_cross_attention", False)
              and type(mod.self).__name__.find("Cross") < 0):
            found.append(_AttnSpec(mod.self, mod.self.query, mod.self.key, mod.self.value,
                                   mod.output.dense))
    return found


def _head_counts(spec: _AttnSpec, config) -> tuple[int, int, int]:
    """(heads, kv_heads, head_dim), from module attributes, the config, and weight shapes."""
    m = spec.module
    heads = None
    for name in ("num_heads", "num_attention_heads", "n_heads", "n_head"):
        if isinstance(getattr(m, name, None), int):
            heads = getattr(m, name)
            break
    if heads is None:
        heads = int(getattr(config, "num_attention_heads"))
    q_out = _n_out(spec.fused) // 3 if spec.fused is not None else _n_out(spec.q)
    head_dim = getattr(m, "head_dim", None) or getattr(m, "attention_head_size", None)
    if not isinstance(head_dim, int) or head_dim * heads != q_out:
        head_dim = q_out // heads
    kv_out = q_out if spec.fused is not None else _n_out(spec.k)
    kv_heads = kv_out // head_dim
    if heads % kv_heads:
        raise ValueError(f"head pruning: {heads} query heads do not group over {kv_heads} key/value heads")
    return heads, kv_heads, head_dim


def _group_scores(spec: _AttnSpec, heads: int, kv_heads: int, head_dim: int):
    """(kv_heads,) L1 importance of each key/value group with its query heads."""
    per_group = heads // kv_heads
    inner = heads * head_dim
    o_cols = _in_cols_l1(spec.o).reshape(heads, head_dim).sum(1)
    if spec.fused is not None:
        rows = _out_rows_l1(spec.fused)
        q_rows, k_rows, v_rows = rows[:inner], rows[inner:2 * inner], rows[2 * inner:]
    else:
        q_rows, k_rows, v_rows = _out_rows_l1(spec.q), _out_rows_l1(spec.k), _out_rows_l1(spec.v)
    q_heads = q_rows.reshape(heads, head_dim).sum(1) + o_cols
    kv = k_rows.reshape(kv_heads, head_dim).sum(1) + v_rows.reshape(kv_heads, head_dim).sum(1)
    return q_heads.reshape(kv_heads, per_group).sum(1) + kv


def _set_if_int(obj, name: str, value: int) -> None:
    if isinstance(getattr(obj, name, None), int) and not isinstance(getattr(obj, name), bool):
        setattr(obj, name, value)


def prune_heads(model, fraction: float) -> str:
    import torch

    layers = transformer_blocks(model)
    config = getattr(model, "config", None)
    on_meta = _is_on_meta(model)
    before = after = kv_before = kv_after = None
    n_attn = 0
    head_dim = None
    for block in layers:
        specs = _find_attention(block)
        if not specs:
            raise ValueError(f"head pruning: no self-attention recognised in {type(block).__name__} "
                           f"(supported: GPT-2, BERT, DistilBERT, Llama-style q/k/v/o projections)")
        for spec in specs:
            heads, kv_heads, head_dim = _head_counts(spec, config)
            per_group = heads // kv_heads
            remove = min(int(round(fraction * kv_heads)), kv_heads - 1)
            keep_groups = kv_heads - remove
            scores = None if on_meta else _group_scores(spec, heads, kv_heads, head_dim)
            groups = _choose(scores, kv_heads, keep_groups, on_meta)  # kept kv heads
            q_heads = (groups[:, None] * per_group + torch.arange(per_group)[None, :]).reshape(-1)
            q_idx = _unit_index(q_heads, head_dim)
            kv_idx = _unit_index(groups, head_dim)
            inner = heads * head_dim
            if spec.fused is not None:  # GPT-2: q | k | v on the output dim, all MHA
                keep_outputs(spec.fused, torch.cat([q_idx, q_idx + inner, q_idx + 2 * inner]))
            else:
                keep_outputs(spec.q, q_idx)
                keep_outputs(spec.k, kv_idx)
                keep_outputs(spec.v, kv_idx)
            keep_inputs(spec.o, q_idx)
            new_heads, new_kv = keep_groups * per_group, keep_groups
            m = spec.module
            for name in ("num_heads", "num_attention_heads", "n_heads", "n_head"):
                _set_if_int(m, name, new_heads)
            for name in ("num_key_value_heads", "num_kv_heads"):
                _set_if_int(m, name, new_kv)
            new_inner = new_heads * head_dim
            for name in ("all_head_size", "split_size", "inner_dim"):
                _set_if_int(m, name, new_inner)
            if spec.fused is not None:  # GPT-2 (transformers 4.x sdpa reshapes by embed_dim)
                _set_if_int(m, "embed_dim", new_inner)
            if hasattr(m, "q_lin"):  # DistilBERT (transformers 4.x reshapes by dim)
                _set_if_int(m, "dim", new_inner)
            if hasattr(m, "q_proj"):  # Qwen2/Mistral in transformers 4.x reshape by hidden_size
                _set_if_int(m, "hidden_size", new_inner)
            if isinstance(getattr(m, "pruned_heads", None), set):
                m.pruned_heads = set()
            before = before or heads
            kv_before = kv_before or kv_heads
            after, kv_after = new_heads, new_kv
            n_attn += 1
    if config is not None and after is not None:
        try:
            config.head_dim = head_dim  # the head size no longer follows hidden / heads
        except (AttributeError, TypeError):
            pass
        config.num_attention_heads = after
        if hasattr(config, "num_key_value_heads") and getattr(config, "num_key_value_heads", None):
            config.num_key_value_heads = kv_after
    gqa = f" ({kv_before}->{kv_after} key/value groups)" if kv_before != before else ""
    how = "first heads kept (meta build)" if on_meta else "lowest-L1 heads removed"
    return (f"head pruning: {before}->{after} heads in each of {n_attn} attention layers{gqa}; "
            f"{how}")


# ----- feed-forward neurons -------------------------------------------------------------------
def _find_ffn(block):
    """(input projections, output projection, owner, width-attribute) of a block's feed-forward."""
    mlp = getattr(block, "mlp", None)
    if mlp is not None and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return [mlp.gate_proj, mlp.up_proj], mlp.down_proj, mlp, "intermediate_size"
    if mlp is not None and hasattr(mlp, "c_fc") and hasattr(mlp, "c_proj"):
        return [mlp.c_fc], mlp.c_proj, mlp, "intermediate_size"
    if mlp is not None and hasattr(mlp, "fc1") and hasattr(mlp, "fc2"):
        return [mlp.fc1], mlp.fc2, mlp, "intermediate_size"
    if hasattr(block, "intermediate") and hasattr(getattr(block, "output", None), "dense"):
        return [block.intermediate.dense], block.output.dense, block.intermediate, "intermediate_size"
    ffn = getattr(block, "ffn", None)
    if ffn is not None and hasattr(ffn, "lin1") and hasattr(ffn, "lin2"):
        return [ffn.lin1], ffn.lin2, ffn, "hidden_dim"
    raise ValueError(f"FFN pruning: the feed-forward of {type(block).__name__} is not recognised "
                   f"(supported: GPT-2, BERT, DistilBERT, Llama-style gated MLPs, GeGLU)")


def prune_ffn(model, fraction: float) -> str:
    layers = transformer_blocks(model)
    config = getattr(model, "config", None)
    on_meta = _is_on_meta(model)
    width = new_width = None
    for block in layers:
        ins, out, owner, attr = _find_ffn(block)
        width = _n_out(ins[0])
        keep = max(1, int(round(width * (1.0 - fraction))))
        if width >= 256 and keep >= 8:
            keep = max(8, int(round(keep / 8.0)) * 8)  # tensor-core friendly widths
        scores = None
        if not on_meta:
            scores = _in_cols_l1(out)
            for m in ins:
                scores = scores + _out_rows_l1(m)
        index = _choose(scores, width, keep, on_meta)
        for m in ins:
            keep_outputs(m, index)
        keep_inputs(out, index)
        _set_if_int(owner, attr, keep)
        new_width = keep
    if config is not None and new_width is not None:
        if getattr(config, "headroom_geglu_hidden", None):
            config.headroom_geglu_hidden = new_width
        elif getattr(config, "model_type", "") == "gpt2":
            config.n_inner = new_width
        elif hasattr(config, "intermediate_size"):
            config.intermediate_size = new_width
        elif hasattr(config, "hidden_dim"):
            config.hidden_dim = new_width
    how = "first neurons kept (meta build)" if on_meta else "lowest-L1 neurons removed"
    return f"FFN pruning: feed-forward width {width}->{new_width} in {len(layers)} blocks; {how}"


#: The functions the exported script may embed, in order (torch only); it keeps those its call
#: ``prune_<kind>(model, PRUNE_FRACTION)`` reaches.
PORTABLE = (_is_on_meta, _is_conv1d, _is_gated, _linear_like, _set_param, keep_outputs, keep_inputs,
            _out_rows_l1, _in_cols_l1, _n_out, _choose, _unit_index, prune_unstructured, _AttnSpec,
            _find_attention, _head_counts, _group_scores, _set_if_int, prune_heads, _find_ffn,
            prune_ffn)
_PRUNE_COMMENTS = {"unstructured": "unstructured pruning: fraction of weights zeroed",
                   "heads": "structured pruning: fraction of attention heads removed",
                   "ffn": "structured pruning: fraction of feed-forward neurons removed"}

PRUNE_KINDS = ("unstructured", "heads", "ffn")
_PRUNE_RE = re.compile(r"(unstructured|heads|ffn):(0(\.\d+)?|1(\.0+)?|\.\d+)")


def _check_prune(value: str) -> None:
    if value and not _PRUNE_RE.fullmatch(value):
        raise BadInput(f"prune must be unstructured:F, heads:F or ffn:F with 0 <= F < 1; got {value!r}")
    if value and float(value.split(":", 1)[1]) >= 1.0:
        raise BadInput("prune fraction must be below 1 (something must remain)")


def check(prepared) -> list[str]:
    p = prepared.profile
    notes = []
    if p.prune_kind == "unstructured" and p.prune_fraction > 0:
        notes.append("unstructured pruning zeros weights but keeps them dense: no memory saved")
    if p.prune_kind == "heads" and p.prune_fraction > 0:
        cfg = prepared.config
        kv = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_attention_heads", 0)
        if kv and int(round(p.prune_fraction * kv)) == 0:
            notes.append(f"heads:{p.prune_fraction:g} removes no head: the model has "
                         f"{kv} key/value groups (whole groups are removed)")
    return notes


def analytic_setup(p: "Profile", setup: AnalyticSetup) -> AnalyticSetup:
    """Structured pruning changes the built model's shapes (the formulas read them); unstructured
    pruning is made permanent (prune.remove): plain dense weights, the same bytes as unpruned."""
    if p.prune_kind != "unstructured":
        return setup
    return replace(setup, notes=setup.notes + (
        "unstructured pruning zeroes weights in dense storage: no memory saved",))


def _prune_changes(values: dict) -> dict:
    kind, fraction = values["prune_kind"], values["prune_fraction"]
    if not kind:
        return {"prune": ""}
    return {"prune": f"{kind}:{fraction if fraction > 0 else 0.25:.2f}"}


TECHNIQUE = Technique(
    name="pruning",
    title="Pruning",
    order=40,
    fields=(Field("prune", str, "", '"" | unstructured:F | heads:F | ffn:F (F = fraction removed)',
                  check=_check_prune, metavar="unstructured:F|heads:F|ffn:F", after="chunk_input",
                  label="pruning"),),
    controls=(
        Control("prune_kind", "combo", "Kind", choices={
            "": "off", "unstructured": "Unstructured L1 (masks only)",
            "heads": "Structured: attention heads", "ffn": "Structured: FFN neurons"},
            read=lambda p: p.prune_kind, write=_prune_changes),
        Control("prune_fraction", "float", "Fraction removed", low=0.0, high=0.95, step=0.05,
                decimals=2, read=lambda p: p.prune_fraction if p.prune else None,
                write=_prune_changes, enabled_when=lambda p: bool(p.prune)),
    ),
    explanations={"pruning": EXPLANATION},
    summary_title=lambda p: f"Pruning ({p.prune})",
    properties={
        "prune_kind": lambda p: p.prune.split(":", 1)[0] if p.prune else "",
        "prune_fraction": lambda p: float(p.prune.split(":", 1)[1]) if p.prune else 0.0,
    },
    active=applies,
    check=check,
    apply_model=apply,
    apply_rank=20,
    analytic_setup=analytic_setup,
    export_source=lambda: list(PORTABLE),
    export_calls=lambda p: [f"prune_{p.prune_kind}(model, PRUNE_FRACTION)"],
    export_constants=lambda p: [("PRUNE_FRACTION", p.prune_fraction, _PRUNE_COMMENTS[p.prune_kind])],
)
