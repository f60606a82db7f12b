"""GeGLU: replace each block's feed-forward by a gated GELU unit of matched parameter count.

GeGLU (Shazeer 2020, "GLU Variants Improve Transformer") computes ``down(gelu(gate(x)) * up(x))``.
A plain MLP ``d -> 4d -> d`` has 8d^2 weights; a GeGLU with hidden width h has 3dh, so h ~ 8d/3
keeps the parameter count (we match the original, biases included, within 1-2%).

How it is wired per family (the block's own forward code is kept, only sub-modules change; the
torch code is ``engine/techniques/_geglu_torch.py``, which the exported script embeds):

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


def apply(model: "torch.nn.Module", profile: "Profile") -> str | None:
    from engine.models import find_layers
    from engine.techniques._geglu_torch import use_geglu

    find_layers(model)  # BadInput when the model has no block list
    try:
        swapped, replaced, widths = use_geglu(model)
    except ValueError as exc:  # a feed-forward that is not recognised
        raise BadInput(str(exc)) from None
    if swapped:
        return (f"GeGLU: the MLP is already gated; swapped SiLU for GELU in {swapped} blocks "
                f"(shapes and memory unchanged)")
    return (f"GeGLU: {replaced} MLPs replaced, hidden {widths[0]} -> {widths[1]} gated "
            f"(parameter count matched)")


def _portable() -> list:
    from engine.techniques._geglu_torch import PORTABLE

    return list(PORTABLE)


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
    export_source=_portable,
    export_calls=lambda p: ["use_geglu(model)"],
)
