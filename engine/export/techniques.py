"""The model-side techniques of an exported script: GeGLU, pruning (unstructured, heads, FFN
neurons) and local attention (gradient checkpointing and feed-forward chunking export their own
functions: ``Technique.export_source``).

Each is a standalone port of its ``engine.techniques`` module: the same modifications in the same
order (``engine.techniques``' apply_rank), the same initialisation (so the random stream, the
parameter count and the losses equal ``headroom measure``'s), written as plain code for the one
model family at hand. Which sub-modules a block has (``mlp.c_fc`` or ``intermediate.dense``, a fused
``c_attn`` or ``q_proj``/``k_proj``/...) is read here from a meta-device build of the model, so the
script names them directly instead of searching for them.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import Any

from engine.errors import BadInput
from engine.profile import Profile


def _code(text: str, **subs: str) -> str:
    text = textwrap.dedent(text).strip("\n")
    for key, value in subs.items():
        text = text.replace(f"@{key}@", value)
    return text


def _path(root: str, dotted: str) -> str:
    """``block.attention.self`` (or ``block.get_submodule("...")`` for names that are not identifiers)."""
    if not dotted:
        return root
    if all(part.isidentifier() for part in dotted.split(".")):
        return f"{root}.{dotted}"
    return f"{root}.get_submodule({dotted!r})"


def _is_conv1d(module: Any) -> bool:
    return type(module).__name__ == "Conv1D"


@dataclass
class Port:
    """What the techniques add to a script: sections, constants, imports and build_model's calls."""

    sections: list[tuple[str, str]] = field(default_factory=list)  # (title, code), in script order
    constants: list[tuple[str, Any, str, str | None]] = field(default_factory=list)  # name, value, why, raw
    imports: set[str] = field(default_factory=set)
    calls: list[str] = field(default_factory=list)  # lines of build_model after the model exists

    def const(self, name: str, value: Any, comment: str, raw: str | None = None) -> None:
        self.constants.append((name, value, comment, raw))


# ----- what the model looks like -------------------------------------------------------------------
@dataclass(frozen=True)
class _Geglu:
    kind: str  # "gated" (already gated: only the activation changes) | "replace"
    act: str  # dotted name of the activation module in a block ("" = none)
    fc_in: str = ""  # dotted name of the input projection (replace)
    fc_out: str = ""  # dotted name of the output projection (replace)
    in_conv1d: bool = False  # GPT-2's Conv1D: weight (in, out)
    out_conv1d: bool = False
    bias_in: bool = True
    bias_out: bool = True
    inner: int = 0  # original hidden width
    hidden: int = 0  # GeGLU hidden width of matched parameter count
    d_model: int = 0


def _meta_model(profile: Profile):
    from engine import models

    model = models.build_model(profile, "meta", apply_techniques=False)
    _, layers = models.find_layers(model)
    return model, layers


def _geglu_layout(block: Any) -> _Geglu:
    """The feed-forward of a block as ``engine.techniques.geglu.apply`` sees it."""
    from engine.techniques import geglu

    mlp = getattr(block, "mlp", None)
    if mlp is not None and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return _Geglu("gated", "mlp." + ("act_fn" if hasattr(mlp, "act_fn") else "act"))
    if mlp is not None and hasattr(mlp, "c_fc") and hasattr(mlp, "c_proj"):
        names = ("mlp.c_fc", "mlp.c_proj", "mlp.act")
    elif hasattr(block, "intermediate") and hasattr(getattr(block, "output", None), "dense"):
        act = "intermediate.intermediate_act_fn" if hasattr(block.intermediate, "intermediate_act_fn") else ""
        names = ("intermediate.dense", "output.dense", act)
    elif hasattr(block, "ffn") and hasattr(block.ffn, "lin1") and hasattr(block.ffn, "lin2"):
        names = ("ffn.lin1", "ffn.lin2", "ffn.activation")
    else:
        raise BadInput(f"GeGLU: the feed-forward of {type(block).__name__} is not recognised "
                       f"(supported: GPT-2, BERT, DistilBERT, Llama-style gated MLPs)")
    fc_in, fc_out = block.get_submodule(names[0]), block.get_submodule(names[1])
    d_in, inner = geglu._dims(fc_in)
    bias = getattr(fc_in, "bias", None) is not None
    return _Geglu("replace", names[2], names[0], names[1], _is_conv1d(fc_in), _is_conv1d(fc_out), bias,
                  getattr(fc_out, "bias", None) is not None, inner, geglu.matched_hidden(d_in, inner, bias),
                  d_in)


# ----- GeGLU ----------------------------------------------------------------------------------------
_GATED_CLASS = '''
class GatedGELU(torch.nn.Module):
    """x -> gelu(gate(x)) * up(x): the first half of a GeGLU feed-forward, (B, T, d) -> (B, T, h)."""

    def __init__(self, d_model, hidden, bias, device, dtype):
        super().__init__()
        self.gate = torch.nn.Linear(d_model, hidden, bias=bias, device=device, dtype=dtype)
        self.up = torch.nn.Linear(d_model, hidden, bias=bias, device=device, dtype=dtype)

    def forward(self, x):  # (B, T, d) -> (B, T, h)
        return F.gelu(self.gate(x)) * self.up(x)
'''

_USE_GEGLU = '''
def use_geglu(model):
    """GeGLU (Shazeer 2020, "GLU Variants Improve Transformer"): every block's feed-forward becomes
    down(gelu(gate(x)) * up(x)) with hidden width GEGLU_HIDDEN, chosen so that the parameter count
    matches the original linear-activation-linear MLP. The new layers start from N(0, 0.02)."""
    for block in transformer_blocks(model):
        weight = @IN@.weight
        d_model = weight.shape[@DIM@]
        d_out = @OUT@.weight.shape[@OUT_DIM@]
        gated = GatedGELU(d_model, GEGLU_HIDDEN, bias=@BIAS_IN@, device=weight.device, dtype=weight.dtype)
        down = torch.nn.Linear(GEGLU_HIDDEN, d_out, bias=@BIAS_OUT@, device=weight.device, dtype=weight.dtype)
        for layer in (gated.gate, gated.up, down):
            torch.nn.init.normal_(layer.weight, std=0.02)
            if layer.bias is not None:
                torch.nn.init.zeros_(layer.bias)
        @IN@ = gated
        @OUT@ = down
@ACT@
'''

_USE_GEGLU_GATED = '''
def use_geglu(model):
    """GeGLU: this model's MLP is already gated, down(act(gate(x)) * up(x)); GeGLU only makes its
    activation GELU instead of SiLU. Shapes, parameters and memory are unchanged."""
    for block in transformer_blocks(model):
        @ACT@ = torch.nn.GELU()
    model.config.hidden_act = "gelu"
'''


def _geglu(port: Port, layout: _Geglu) -> None:
    if layout.kind == "gated":
        port.sections.append(("GeGLU feed-forward", _code(_USE_GEGLU_GATED, ACT=_path("block", layout.act))))
        port.calls.append("use_geglu(model)")
        return
    port.imports.add("import torch.nn.functional as F")
    port.const("GEGLU_HIDDEN", layout.hidden,
               f"GeGLU width: 3 matrices of {layout.d_model}x{layout.hidden} replace 2 of "
               f"{layout.d_model}x{layout.inner}")
    act = (f"        {_path('block', layout.act)} = torch.nn.Identity()  # the gate applies the GELU"
           if layout.act else "")
    code = _code(_USE_GEGLU, IN=_path("block", layout.fc_in), OUT=_path("block", layout.fc_out),
                 DIM="0" if layout.in_conv1d else "1", OUT_DIM="1" if layout.out_conv1d else "0",
                 BIAS_IN=str(layout.bias_in), BIAS_OUT=str(layout.bias_out), ACT=act)
    if layout.in_conv1d:
        code = code.replace("d_model = weight.shape[0]",
                            "d_model = weight.shape[0]  # Conv1D weight: (in, out)")
    port.sections.append(("GeGLU feed-forward", _code(_GATED_CLASS) + "\n\n\n" + code.rstrip()))
    port.calls.append("use_geglu(model)")


# ----- pruning ----------------------------------------------------------------------------------------
_PRUNE_UNSTRUCTURED = '''
def prune_unstructured(model):
    """Zero the PRUNE_FRACTION smallest-magnitude (L1) weights of every linear layer in the
    transformer blocks. The weights stay dense tensors of the same shape: no memory is saved."""
    with torch.no_grad():
        for module in transformer_blocks(model).modules():
            if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
                prune.l1_unstructured(module, "weight", amount=PRUNE_FRACTION)
                prune.remove(module, "weight")  # permanent: a plain dense Parameter again
'''


def _feature_helpers(conv1d: bool, gated: bool) -> str:
    """out_l1 / in_l1 / keep_out_features / keep_in_features / strongest (+ feature_index)."""
    gate_l1 = ('    if isinstance(layer, GatedGELU):  # a neuron owns a row of gate and a row of up\n'
               '        return out_l1(layer.gate) + out_l1(layer.up)\n') if gated else ""
    gate_keep = ('    if isinstance(layer, GatedGELU):\n'
                 '        keep_out_features(layer.gate, index)\n'
                 '        keep_out_features(layer.up, index)\n'
                 '        return\n') if gated else ""
    if conv1d:
        out_l1 = ('def out_l1(layer):\n'
                  '    """(out,) L1 norm of the weights feeding each output feature of a linear layer."""\n'
                  f'{gate_l1}'
                  '    weight = layer.weight.detach().float()\n'
                  '    return weight.abs().sum(0) if is_conv1d(layer) else weight.abs().sum(1)\n\n\n'
                  'def in_l1(layer):\n'
                  '    """(in,) L1 norm of the weights reading each input feature of a linear layer."""\n'
                  '    weight = layer.weight.detach().float()\n'
                  '    return weight.abs().sum(1) if is_conv1d(layer) else weight.abs().sum(0)\n')
        keep = ('def keep_out_features(layer, index):\n'
                '    """Keep only the output features `index` of a linear layer (weight, bias)."""\n'
                f'{gate_keep}'
                '    conv1d = is_conv1d(layer)\n'
                '    index = index.to(layer.weight.device)\n'
                '    weight = layer.weight.data.index_select(1 if conv1d else 0, index)\n'
                '    layer.weight = torch.nn.Parameter(weight)\n'
                '    if layer.bias is not None:\n'
                '        layer.bias = torch.nn.Parameter(layer.bias.data.index_select(0, index))\n'
                '    if conv1d:\n'
                '        layer.nf = len(index)\n'
                '    else:\n'
                '        layer.out_features = len(index)\n\n\n'
                'def keep_in_features(layer, index):\n'
                '    """Keep only the input features `index` of a linear layer."""\n'
                '    conv1d = is_conv1d(layer)\n'
                '    index = index.to(layer.weight.device)\n'
                '    weight = layer.weight.data.index_select(0 if conv1d else 1, index)\n'
                '    layer.weight = torch.nn.Parameter(weight)\n'
                '    if conv1d:\n'
                '        layer.nx = len(index)\n'
                '    else:\n'
                '        layer.in_features = len(index)\n')
        head = ('def is_conv1d(layer):\n'
                '    """GPT-2\'s Conv1D: a linear layer whose weight is stored as (in, out)."""\n'
                '    return type(layer).__name__ == "Conv1D"\n\n\n')
    else:
        out_l1 = ('def out_l1(layer):\n'
                  '    """(out,) L1 norm of the weights feeding each output feature of a linear layer."""\n'
                  f'{gate_l1}'
                  '    return layer.weight.detach().float().abs().sum(1)\n\n\n'
                  'def in_l1(layer):\n'
                  '    """(in,) L1 norm of the weights reading each input feature of a linear layer."""\n'
                  '    return layer.weight.detach().float().abs().sum(0)\n')
        keep = ('def keep_out_features(layer, index):\n'
                '    """Keep only the output features `index` of a linear layer (weight rows, bias)."""\n'
                f'{gate_keep}'
                '    index = index.to(layer.weight.device)\n'
                '    layer.weight = torch.nn.Parameter(layer.weight.data.index_select(0, index))\n'
                '    if layer.bias is not None:\n'
                '        layer.bias = torch.nn.Parameter(layer.bias.data.index_select(0, index))\n'
                '    layer.out_features = len(index)\n\n\n'
                'def keep_in_features(layer, index):\n'
                '    """Keep only the input features `index` (weight columns) of a linear layer."""\n'
                '    index = index.to(layer.weight.device)\n'
                '    layer.weight = torch.nn.Parameter(layer.weight.data.index_select(1, index))\n'
                '    layer.in_features = len(index)\n')
        head = ""
    strongest = ('def strongest(scores, keep):\n'
                 '    """Indices (ascending) of the `keep` largest scores."""\n'
                 '    return torch.sort(torch.topk(scores.float().cpu(), keep).indices).values\n')
    return (head + out_l1 + "\n\n" + keep + "\n\n" + strongest).rstrip("\n")


_PRUNE_HEADS = '''
def prune_heads(model):
    """Structured pruning of attention heads: in every block remove round(PRUNE_FRACTION * G) of the
    G key/value head groups together with their query heads (grouped-query models keep their
    ratio), the groups whose weights have the smallest L1 norm. The q/k/v projections lose those
    rows and the output projection those columns: the model really gets smaller."""
    heads = model.config.num_attention_heads
    for block in transformer_blocks(model):
        attn = @ATTN@
        q, k, v, o = @Q@, @K@, @V@, @O@
        head_dim = q.weight.shape[0] // heads
        groups = k.weight.shape[0] // head_dim  # key/value heads
        per_group = heads // groups  # query heads sharing one key/value head
        kept = groups - min(round(PRUNE_FRACTION * groups), groups - 1)
        # A group's importance: the L1 norm of every weight that belongs to it.
        query = out_l1(q).reshape(heads, head_dim).sum(1) + in_l1(o).reshape(heads, head_dim).sum(1)
        key_value = out_l1(k).reshape(groups, head_dim).sum(1) + out_l1(v).reshape(groups, head_dim).sum(1)
        scores = query.reshape(groups, per_group).sum(1) + key_value  # (groups,)
        kept_groups = strongest(scores, kept)
        kept_heads = (kept_groups[:, None] * per_group + torch.arange(per_group)[None, :]).reshape(-1)
        q_index = head_features(kept_heads, head_dim)
        kv_index = head_features(kept_groups, head_dim)
        keep_out_features(q, q_index)
        keep_out_features(k, kv_index)
        keep_out_features(v, kv_index)
        keep_in_features(o, q_index)
        set_head_counts(attn, kept * per_group, kept, kept * per_group * head_dim)
    model.config.head_dim = head_dim  # no longer hidden size / heads
    model.config.num_attention_heads = kept * per_group
    if getattr(model.config, "num_key_value_heads", None):
        model.config.num_key_value_heads = kept
'''

_PRUNE_HEADS_FUSED = '''
def prune_heads(model):
    """Structured pruning of attention heads: remove round(PRUNE_FRACTION * heads) heads in every
    block, those whose weights have the smallest L1 norm. c_attn (q | k | v side by side) loses
    their columns in each part and c_proj their rows: the model really gets smaller."""
    heads = model.config.num_attention_heads
    for block in transformer_blocks(model):
        attn = @ATTN@
        width = attn.c_attn.weight.shape[1] // 3  # Conv1D weight: (in, out) = (d, q | k | v)
        head_dim = width // heads
        kept = heads - min(round(PRUNE_FRACTION * heads), heads - 1)
        # A head's importance: the L1 norm of every weight that belongs to it.
        rows = out_l1(attn.c_attn)  # (3 * width,)
        query = (rows[:width].reshape(heads, head_dim).sum(1)
                 + in_l1(attn.c_proj).reshape(heads, head_dim).sum(1))
        key_value = (rows[width:2 * width].reshape(heads, head_dim).sum(1)
                     + rows[2 * width:].reshape(heads, head_dim).sum(1))
        scores = query + key_value  # (heads,)
        index = head_features(strongest(scores, kept), head_dim)
        keep_out_features(attn.c_attn, torch.cat([index, index + width, index + 2 * width]))
        keep_in_features(attn.c_proj, index)
        set_head_counts(attn, kept, kept, kept * head_dim)
    model.config.head_dim = head_dim  # no longer hidden size / heads
    model.config.num_attention_heads = kept
'''

_HEAD_HELPERS = '''
def head_features(units, size):
    """Feature indices of whole heads of `size` features each."""
    return (units[:, None] * size + torch.arange(size)[None, :]).reshape(-1)


def set_head_counts(attn, heads, groups, width):
    """The attention module reshapes by these counts; their names differ between models and
    transformers versions, so each one it has is updated."""
    counts = (
        (("num_heads", "num_attention_heads", "n_heads", "n_head"), heads),
        (("num_key_value_heads", "num_kv_heads"), groups),
        (("all_head_size", "split_size", "inner_dim"@WIDTH_NAMES@), width),
    )
    for names, value in counts:
        for name in names:
            if type(getattr(attn, name, None)) is int:
                setattr(attn, name, value)
    if isinstance(getattr(attn, "pruned_heads", None), set):
        attn.pruned_heads = set()
'''

_PRUNE_FFN = '''
def prune_ffn(model):
    """Structured pruning of the feed-forward: remove PRUNE_FRACTION of every block's hidden neurons,
    those whose weights (their rows of the input projections, their column of the output
    projection) have the smallest L1 norm. The model really gets smaller."""
    for block in transformer_blocks(model):
        inputs, output = @INPUTS@, @OUTPUT@
        scores = in_l1(output)
        for layer in inputs:
            scores = scores + out_l1(layer)  # (width,)
        width = len(scores)
        kept = max(1, round(width * (1.0 - PRUNE_FRACTION)))
        if width >= 256 and kept >= 8:
            kept = max(8, round(kept / 8) * 8)  # tensor-core friendly widths
        index = strongest(scores, kept)
        for layer in inputs:
            keep_out_features(layer, index)
        keep_in_features(output, index)
'''


def _pruning(port: Port, profile: Profile, layers: Any, geglu: _Geglu | None) -> None:
    kind, fraction = profile.prune_kind, profile.prune_fraction
    if kind == "unstructured":
        port.imports.add("from torch.nn.utils import prune")
        port.const("PRUNE_FRACTION", fraction, "unstructured pruning: fraction of weights zeroed")
        port.sections.append(("unstructured pruning", _code(_PRUNE_UNSTRUCTURED)))
        port.calls.append("prune_unstructured(model)")
        return
    from engine.techniques import pruning

    block = layers[0]
    names = {id(m): n for n, m in block.named_modules()}
    if kind == "heads":
        port.const("PRUNE_FRACTION", fraction, "structured pruning: fraction of attention heads removed")
        specs = pruning._find_attention(block)
        if not specs:
            raise BadInput(f"head pruning: no self-attention recognised in {type(block).__name__} "
                           f"(supported: GPT-2, BERT, DistilBERT, Llama-style q/k/v/o projections)")
        if len(specs) > 1:
            raise BadInput(f"export of head pruning: {type(block).__name__} has {len(specs)} "
                           "self-attention modules per block (one is supported)")
        spec = specs[0]
        attn = _path("block", names[id(spec.module)])
        if spec.fused is not None:
            code = _code(_PRUNE_HEADS_FUSED, ATTN=attn)
            width_names = ', "embed_dim"'
            conv1d = True
        else:
            attn_name = names[id(spec.module)]

            def where(module: Any) -> str:  # relative to `attn` where the projection lives in it
                name = names[id(module)]
                if name.startswith(attn_name + "."):
                    return _path("attn", name[len(attn_name) + 1:])
                return _path("block", name)

            code = _code(_PRUNE_HEADS, ATTN=attn, **{p: where(getattr(spec, p.lower())) for p in "QKVO"})
            attn_mod = spec.module
            width_names = ', "dim"' if hasattr(attn_mod, "q_lin") else ', "hidden_size"' if hasattr(
                attn_mod, "q_proj") else ""
            conv1d = any(_is_conv1d(m) for m in (spec.q, spec.k, spec.v, spec.o))
        helpers = (_feature_helpers(conv1d, gated=False) + "\n\n\n"
                   + _code(_HEAD_HELPERS, WIDTH_NAMES=width_names))
        port.sections.append(("structured pruning: attention heads", helpers + "\n\n\n" + code))
        port.calls.append("prune_heads(model)")
        return
    # ffn: the feed-forward as it is after GeGLU (pruning runs second)
    port.const("PRUNE_FRACTION", fraction, "structured pruning: fraction of feed-forward neurons removed")
    ins, out, owner, attr = pruning._find_ffn(block)  # after GeGLU: it prunes the GeGLU width
    gated = geglu is not None and geglu.kind == "replace"
    conv1d = (not gated and any(_is_conv1d(m) for m in ins)) or _is_conv1d(out)
    inputs = [_path("block", names[id(m)]) for m in ins]
    code = _code(_PRUNE_FFN, INPUTS="(" + ", ".join(inputs) + ("," if len(inputs) == 1 else "") + ")",
                 OUTPUT=_path("block", names[id(out)]))
    if isinstance(getattr(owner, attr, None), int) and not isinstance(getattr(owner, attr), bool):
        code += f"\n        {_path('block', names[id(owner)])}.{attr} = kept"
    config_key = _ffn_config_key(profile, gated)
    if config_key:
        code += f"\n    model.config.{config_key} = kept  # the config describes the pruned model"
    helpers = _feature_helpers(conv1d, gated=gated)
    port.sections.append(("structured pruning: feed-forward neurons", helpers + "\n\n\n" + code))
    port.calls.append("prune_ffn(model)")


def _ffn_config_key(profile: Profile, gated_geglu: bool) -> str:
    """The config field ``engine.techniques.pruning.prune_ffn`` updates (none after a GeGLU swap)."""
    if gated_geglu:
        return ""
    from engine.models import load_config

    config = load_config(profile.model, profile.trust_remote_code)
    if getattr(config, "model_type", "") == "gpt2":
        return "n_inner"
    if hasattr(config, "intermediate_size"):
        return "intermediate_size"
    if hasattr(config, "hidden_dim"):
        return "hidden_dim"
    return ""


# ----- local attention --------------------------------------------------------------------------
_LOCAL_ATTENTION = '''
FLEX = {"compiled": None, "block_masks": {}, "failed": False}  # compiled FlexAttention, cached masks


def local_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Sliding-window attention for transformers' AttentionInterface: (B, H, T, D) in, (B, T, H, D)
    out. A decoder's query i sees keys i - LOCAL_WINDOW < j <= i; an encoder's |i - j| < LOCAL_WINDOW.
    FlexAttention on CUDA, the blocked implementation elsewhere (or if FlexAttention fails)."""
    causal = kwargs.get("is_causal")
    if causal is None:
        causal = getattr(module, "is_causal", True)
    causal = bool(causal)
    out = None
    if query.device.type == "cuda" and query.shape[2] == key.shape[2] and not FLEX["failed"]:
        try:
            out = flex_local_attention(query, key, value, causal, scaling, attention_mask)
        except Exception as exc:  # no flex_attention in this torch, or no kernel for this GPU
            FLEX["failed"] = True
            print(f"FlexAttention unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                  "using blocked local attention", file=sys.stderr)
    if out is None:
        out = blocked_local_attention(query, key, value, causal, scaling, attention_mask,
                                      dropout if module.training else 0.0)
    return out.transpose(1, 2).contiguous(), None


def padding_mask_only(*args, attention_mask=None, **kwargs):
    """AttentionMaskInterface function: hand local_attention the (B, T) padding mask (None when
    nothing is padded) instead of a dense T x T mask; local_attention applies the window itself."""
    if attention_mask is not None and attention_mask.dim() == 2 and bool(attention_mask.all()):
        return None
    return attention_mask


def use_local_attention(model):
    """Switch every attention layer of the model to local_attention."""
    AttentionInterface.register("local_window", local_attention)
    AttentionMaskInterface.register("local_window", padding_mask_only)
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("local_window")
        except (ValueError, KeyError, TypeError):
            pass  # set on the configs below
    configs = [model.config] + [m.config for m in model.modules()
                                if hasattr(getattr(m, "config", None), "_attn_implementation")]
    for config in configs:
        if config._attn_implementation != "local_window":
            config._attn_implementation_internal = "local_window"
        if config._attn_implementation != "local_window":
            config._attn_implementation = "local_window"
    if model.config._attn_implementation != "local_window":
        raise RuntimeError(f"{type(model).__name__} does not use transformers' AttentionInterface")


def key_padding(attention_mask, q_len, k_len):
    """The model's attention mask as booleans (True = attend): None, (B, Tk) or (B, 1|H, Tq, Tk)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        mask = attention_mask[:, -k_len:]
        return mask if mask.dtype == torch.bool else mask != 0
    mask = attention_mask[..., -q_len:, -k_len:]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2  # additive float mask: 0 keep, very negative drop


def repeat_kv(x, groups):
    """(B, Hkv, T, D) -> (B, Hkv * groups, T, D): grouped-query key/value heads shared by queries."""
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def blocked_local_attention(q, k, v, causal, scale, attention_mask, dropout):
    """Sliding-window attention in O(T * LOCAL_WINDOW) memory with plain tensor ops: queries in
    blocks of bs = max(LOCAL_WINDOW, 16), each block attending to its own keys plus the
    LOCAL_WINDOW - 1 before (and after, for encoders), masked to the exact window."""
    b, h, t, d = q.shape
    keep = key_padding(attention_mask, t, k.shape[2])
    if k.shape[2] != t or (keep is not None and keep.dim() == 4):  # a cache, or a T x T mask: dense band
        return dense_local_attention(q, k, v, causal, scale, keep, dropout)
    scale = d ** -0.5 if scale is None else scale
    groups = h // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    bs = max(LOCAL_WINDOW, 16)  # queries per block
    nb = math.ceil(t / bs)
    tp = nb * bs
    left = LOCAL_WINDOW - 1
    right = 0 if causal else LOCAL_WINDOW - 1
    span = bs + left + right  # keys one query block sees
    qb = F.pad(q, (0, 0, 0, tp - t)).reshape(b, h, nb, bs, d)  # (B, H, nb, bs, D)
    kb = F.pad(k, (0, 0, left, right + tp - t)).unfold(2, span, bs)  # (B, H, nb, D, span)
    vb = F.pad(v, (0, 0, left, right + tp - t)).unfold(2, span, bs)  # (B, H, nb, D, span)
    scores = torch.matmul(qb, kb) * scale  # (B, H, nb, bs, span)
    rows = torch.arange(bs, device=q.device)[:, None]
    cols = torch.arange(span, device=q.device)[None, :]
    diff = rows - cols + left  # query position - key position, the same in every block
    band = (diff >= 0) & (diff < LOCAL_WINDOW) if causal else diff.abs() < LOCAL_WINDOW  # (bs, span)
    k_pos = (torch.arange(nb, device=q.device)[:, None] * bs - left
             + torch.arange(span, device=q.device)[None, :])  # (nb, span)
    allowed = band[None] & ((k_pos >= 0) & (k_pos < t))[:, None, :]  # (nb, bs, span)
    if keep is not None:
        kp = F.pad(keep, (left, right + tp - t), value=False).unfold(1, span, bs)  # (B, nb, span)
        allowed = (allowed[None] & kp[:, :, None, :])[:, None]  # (B, 1, nb, bs, span)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    if dropout:
        probs = F.dropout(probs, p=dropout)
    out = torch.matmul(probs, vb.transpose(-1, -2))  # (B, H, nb, bs, D)
    return out.reshape(b, h, tp, d)[:, :, :t]


def dense_local_attention(q, k, v, causal, scale, keep, dropout):
    """The same window as a dense (Tq, Tk) mask for SDPA: O(T^2) memory. Only for decoding with a
    key/value cache or a mask the model built itself."""
    tq, tk = q.shape[2], k.shape[2]
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    diff = (torch.arange(tk - tq, tk, device=q.device)[:, None]
            - torch.arange(tk, device=q.device)[None, :])  # (Tq, Tk) query - key position
    mask = ((diff >= 0) & (diff < LOCAL_WINDOW) if causal else diff.abs() < LOCAL_WINDOW)[None, None]
    if keep is not None:
        mask = mask & (keep[:, None, None, :] if keep.dim() == 2 else keep)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)


def flex_local_attention(q, k, v, causal, scale, attention_mask):
    """Sliding-window attention with compiled FlexAttention (CUDA): the block mask lets the kernel
    skip every tile outside the window, so time and memory grow with T * LOCAL_WINDOW."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    t = q.shape[2]
    keep = key_padding(attention_mask, t, k.shape[2])
    if keep is not None and keep.dim() == 4:
        return dense_local_attention(q, k, v, causal, scale, keep, 0.0)

    def in_window(b, h, q_idx, kv_idx):
        if causal:
            return (q_idx >= kv_idx) & (q_idx - kv_idx < LOCAL_WINDOW)
        return (q_idx - kv_idx < LOCAL_WINDOW) & (kv_idx - q_idx < LOCAL_WINDOW)

    def in_window_not_padding(b, h, q_idx, kv_idx):
        return in_window(b, h, q_idx, kv_idx) & keep[b, kv_idx]

    cache_key = (t, causal, str(q.device))
    block_mask = FLEX["block_masks"].get(cache_key) if keep is None else None
    if block_mask is None:
        kwargs = {"_compile": True} if "_compile" in inspect.signature(create_block_mask).parameters else {}
        block_mask = create_block_mask(in_window if keep is None else in_window_not_padding,
                                       B=None if keep is None else keep.shape[0], H=None, Q_LEN=t,
                                       KV_LEN=t, device=q.device, **kwargs)  # never a T x T tensor
        if keep is None:
            FLEX["block_masks"][cache_key] = block_mask
    if FLEX["compiled"] is None:
        FLEX["compiled"] = torch.compile(flex_attention, dynamic=False)
    kwargs = {"block_mask": block_mask, "scale": scale}
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        if "enable_gqa" in inspect.signature(flex_attention).parameters:
            kwargs["enable_gqa"] = True
        else:
            k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    return FLEX["compiled"](q, k, v, **kwargs)
'''


def _local_attention(port: Port, profile: Profile) -> None:
    port.imports |= {"import inspect", "import math", "import torch.nn.functional as F",
                     "from transformers import AttentionInterface",
                     "from transformers.masking_utils import AttentionMaskInterface"}
    port.const("LOCAL_WINDOW", profile.local_window, "local attention: tokens each query sees")
    port.sections.append(("local (sliding-window) attention", _code(_LOCAL_ATTENTION)))
    port.calls.append("use_local_attention(model)")


# ----- all of them ------------------------------------------------------------------------------------
def model_techniques(profile: Profile) -> Port:
    """The ported model-side techniques the profile selects, in ``engine.techniques`` order."""
    port = Port()
    structural = profile.mlp == "geglu" or profile.prune_kind in ("heads", "ffn")
    model = layers = None
    geglu_layout = None
    if structural:
        model, layers = _meta_model(profile)
    if profile.mlp == "geglu":
        geglu_layout = _geglu_layout(layers[0])
        _geglu(port, geglu_layout)
        from engine.techniques import geglu

        geglu.apply(model, profile)  # later techniques see the GeGLU blocks (meta: shapes only)
    if profile.prune and profile.prune_fraction > 0:
        _pruning(port, profile, layers, geglu_layout)
    if profile.local_window:
        _local_attention(port, profile)
    return port
