"""GeGLU: replace each block's feed-forward by a gated GELU unit of matched parameter count.

GeGLU (Shazeer 2020, "GLU Variants Improve Transformer") computes ``down(gelu(gate(x)) * up(x))``.
A plain MLP ``d -> 4d -> d`` has 8d^2 weights; a GeGLU with hidden width h has 3dh, so h ~ 8d/3
keeps the parameter count (we match the original, biases included, within 1-2%).

How it is wired per family (the block's own forward code is kept, only sub-modules change):

* GPT-2 (``mlp.c_fc``/``mlp.act``/``mlp.c_proj``, Conv1D): ``c_fc`` becomes a ``GatedProjection``
  (gate+up, output ``gelu(gate) * up``), ``act`` becomes Identity, ``c_proj`` a Linear(h, d).
* BERT (``intermediate.dense`` + act, ``output.dense`` + dropout + residual + LayerNorm):
  ``intermediate.dense`` becomes a ``GatedProjection``, the activation Identity, ``output.dense`` a
  Linear(h, d); ``BertOutput`` keeps its residual and LayerNorm.
* DistilBERT (``ffn.lin1``/``activation``/``lin2``): the same with ``lin1``/``lin2``.
* Llama-style gated MLPs (``gate_proj``/``up_proj``/``down_proj``, SiLU): already gated; GeGLU
  only swaps SiLU for GELU, shapes and memory unchanged (the note says so).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.errors import BadInput
from engine.techniques.base import Control, Field, Technique

if TYPE_CHECKING:
    import torch

    from engine.profile import Profile

EXPLANATION = (
    "GeGLU replaces each transformer block's feed-forward network (linear, GELU, linear) by a gated "
    "unit: down(GELU(gate(x)) * up(x)). Its hidden width is chosen (about 8/3 of the model width "
    "instead of 4x) so that the parameter count stays within 2% of the original: weights, "
    "gradients and optimizer state are unchanged. Gated units often train to a better loss for the "
    "same parameters. The cost is activation memory and time: per token the block keeps three "
    "hidden-width tensors (gate, up, their product) instead of two, so with width 8/3·d activations "
    "of the feed-forward are about the same or slightly larger, and there are three matrix "
    "multiplications instead of two. For models whose MLP is already gated (Llama, Qwen2, Mistral) "
    "only the activation changes from SiLU to GELU; shapes and memory are unchanged."
)


def applies(profile: "Profile") -> bool:
    return profile.mlp == "geglu"


def _torch():
    import torch

    return torch


def _make_gated_projection_class():
    torch = _torch()
    nn = torch.nn

    class GatedProjection(nn.Module):
        """x -> gelu(gate(x)) * up(x): the first half of a GeGLU block (B, T, d) -> (B, T, h)."""

        def __init__(self, in_features: int, hidden: int, bias: bool = True, device=None, dtype=None):
            super().__init__()
            self.gate = nn.Linear(in_features, hidden, bias=bias, device=device, dtype=dtype)
            self.up = nn.Linear(in_features, hidden, bias=bias, device=device, dtype=dtype)

        @property
        def out_features(self) -> int:
            return self.gate.out_features

        def forward(self, x):  # (B, T, d) -> (B, T, h)
            return nn.functional.gelu(self.gate(x)) * self.up(x)

    GatedProjection.__module__ = __name__  # picklable: found through the module __getattr__
    GatedProjection.__qualname__ = "GatedProjection"
    return GatedProjection


_GATED_CLS = None


def __getattr__(name: str):
    if name == "GatedProjection":
        return gated_projection_class()
    raise AttributeError(name)


def gated_projection_class():
    """The GatedProjection module class (created lazily so importing this file stays light)."""
    global _GATED_CLS
    if _GATED_CLS is None:
        _GATED_CLS = _make_gated_projection_class()
    return _GATED_CLS


def is_gated_projection(module) -> bool:
    return _GATED_CLS is not None and isinstance(module, _GATED_CLS)


def matched_hidden(d_in: int, inner: int, bias: bool = True) -> int:
    """Hidden width h of a GeGLU matching the parameters of a d -> inner -> d MLP.

    Original: 2·d·inner (+ inner + d biases); GeGLU: 3·d·h (+ 2h + d). Rounded to a multiple of
    8 (friendlier for tensor cores) when that stays within 1%, else to the nearest integer.
    """
    original = 2 * d_in * inner + (inner + d_in if bias else 0)
    per_h = 3 * d_in + (2 if bias else 0)
    fixed = d_in if bias else 0
    exact = (original - fixed) / per_h
    h8 = max(8, int(round(exact / 8.0)) * 8)
    if abs((per_h * h8 + fixed) - original) / original <= 0.01:
        return h8
    return max(1, int(round(exact)))


def _weight_like(module):
    w = module.weight
    return w.device, w.dtype


def _dims(module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or transformers Conv1D."""
    if type(module).__name__ == "Conv1D":
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return int(module.weight.shape[1]), int(module.weight.shape[0])


def _replace_pair(owner_in, in_name, owner_out, out_name, owner_act, act_name) -> tuple[int, int]:
    """Swap (in-proj, activation, out-proj) for (GatedProjection, Identity, Linear)."""
    torch = _torch()
    nn = torch.nn
    fc_in = getattr(owner_in, in_name)
    fc_out = getattr(owner_out, out_name)
    d_in, inner = _dims(fc_in)
    inner2, d_out = _dims(fc_out)
    if inner2 != inner:
        raise BadInput(f"GeGLU: unexpected MLP shapes ({d_in}->{inner}, {inner2}->{d_out})")
    bias = getattr(fc_in, "bias", None) is not None
    h = matched_hidden(d_in, inner, bias)
    device, dtype = _weight_like(fc_in)
    gated = gated_projection_class()(d_in, h, bias=bias, device=device, dtype=dtype)
    down = nn.Linear(h, d_out, bias=getattr(fc_out, "bias", None) is not None, device=device,
                     dtype=dtype)
    if device.type != "meta":
        std = 0.02
        for lin in (gated.gate, gated.up, down):
            nn.init.normal_(lin.weight, std=std)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
    setattr(owner_in, in_name, gated)
    setattr(owner_out, out_name, down)
    if owner_act is not None:
        setattr(owner_act, act_name, nn.Identity())
    return inner, h


def apply(model: "torch.nn.Module", profile: "Profile") -> str | None:
    torch = _torch()
    nn = torch.nn
    from engine.models import find_layers

    _, layers = find_layers(model)
    swapped_act = 0
    replaced = 0
    shapes = None
    for block in layers:
        mlp = getattr(block, "mlp", None)
        if mlp is not None and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            act_name = "act_fn" if hasattr(mlp, "act_fn") else "act"
            setattr(mlp, act_name, nn.GELU())
            swapped_act += 1
        elif mlp is not None and hasattr(mlp, "c_fc") and hasattr(mlp, "c_proj"):
            shapes = _replace_pair(mlp, "c_fc", mlp, "c_proj", mlp, "act")
            replaced += 1
        elif hasattr(block, "intermediate") and hasattr(getattr(block, "output", None), "dense"):
            inter = block.intermediate
            act_name = "intermediate_act_fn" if hasattr(inter, "intermediate_act_fn") else None
            shapes = _replace_pair(inter, "dense", block.output, "dense", inter if act_name else None,
                                   act_name or "")
            replaced += 1
        elif hasattr(block, "ffn") and hasattr(block.ffn, "lin1") and hasattr(block.ffn, "lin2"):
            shapes = _replace_pair(block.ffn, "lin1", block.ffn, "lin2", block.ffn, "activation")
            replaced += 1
        else:
            raise BadInput(f"GeGLU: the feed-forward of {type(block).__name__} is not recognised "
                           f"(supported: GPT-2, BERT, DistilBERT, Llama-style gated MLPs)")
    config = getattr(model, "config", None)
    if swapped_act:
        if config is not None and hasattr(config, "hidden_act"):
            config.hidden_act = "gelu"
        return (f"GeGLU: the MLP is already gated; swapped SiLU for GELU in {swapped_act} blocks "
                f"(shapes and memory unchanged)")
    if config is not None and shapes is not None:
        config.headroom_geglu_hidden = shapes[1]  # estimators: feed-forward width is now h (3 matrices)
    return (f"GeGLU: {replaced} MLPs replaced, hidden {shapes[0]} -> {shapes[1]} gated "
            f"(parameter count matched)")


MLPS = ("default", "geglu")

TECHNIQUE = Technique(
    name="geglu",
    title="GeGLU",
    order=70,
    fields=(Field("mlp", str, "default", "default | geglu (gated GeGLU block of matched parameter "
                  "count)", choices=MLPS, after="prune", label="feed-forward"),),
    controls=(Control("geglu", "check", text="Gated GeGLU MLP (matched parameters)",
                      read=lambda p: p.mlp == "geglu",
                      write=lambda v: {"mlp": "geglu" if v["geglu"] else "default"}),),
    explanations={"geglu": EXPLANATION},
    summary_title=lambda p: "GeGLU feed-forward",
    active=applies,
    apply_model=apply,
    apply_rank=10,
)
