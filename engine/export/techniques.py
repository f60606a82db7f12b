"""The model-side techniques of an exported script: GeGLU and pruning (unstructured, heads, FFN
neurons). Gradient checkpointing, feed-forward chunking and local attention export their own
functions (``Technique.export_source``).

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
    return port
