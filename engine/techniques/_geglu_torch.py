"""GeGLU's torch code: the gated projection module and the feed-forward swap.

A module of its own because it imports torch at the top (the class needs ``torch.nn.Module``) while
importing ``engine.techniques.geglu`` must not (the app reads every technique's texts at start-up);
the leading underscore keeps it out of the registry. ``geglu.apply`` runs ``use_geglu`` and the
exported script embeds these definitions' own source (``inspect.getsource``): torch only, no
Headroom import.
"""

from __future__ import annotations

import torch

from engine.models import transformer_blocks


class GatedProjection(torch.nn.Module):
    """x -> gelu(gate(x)) * up(x): the first half of a GeGLU block (B, T, d) -> (B, T, h)."""

    def __init__(self, in_features, hidden, bias=True, device=None, dtype=None):
        super().__init__()
        self.gate = torch.nn.Linear(in_features, hidden, bias=bias, device=device, dtype=dtype)
        self.up = torch.nn.Linear(in_features, hidden, bias=bias, device=device, dtype=dtype)

    @property
    def out_features(self):
        return self.gate.out_features

    def forward(self, x):  # (B, T, d) -> (B, T, h)
        return torch.nn.functional.gelu(self.gate(x)) * self.up(x)


def matched_hidden(d_in, inner, bias=True):
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


def linear_dims(module):
    """(in_features, out_features) of a Linear or transformers' Conv1D (weight stored (in, out))."""
    if type(module).__name__ == "Conv1D":
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return int(module.weight.shape[1]), int(module.weight.shape[0])


def replace_feed_forward(owner_in, in_name, owner_out, out_name, owner_act, act_name):
    """Swap (in-projection, activation, out-projection) for (GatedProjection, Identity, Linear) of
    matched parameter count; the new layers start from N(0, 0.02). Returns (old, new) width."""
    fc_in = getattr(owner_in, in_name)
    fc_out = getattr(owner_out, out_name)
    d_in, inner = linear_dims(fc_in)
    inner2, d_out = linear_dims(fc_out)
    if inner2 != inner:
        raise ValueError(f"GeGLU: unexpected MLP shapes ({d_in}->{inner}, {inner2}->{d_out})")
    bias = getattr(fc_in, "bias", None) is not None
    hidden = matched_hidden(d_in, inner, bias)
    device, dtype = fc_in.weight.device, fc_in.weight.dtype
    gated = GatedProjection(d_in, hidden, bias=bias, device=device, dtype=dtype)
    down = torch.nn.Linear(hidden, d_out, bias=getattr(fc_out, "bias", None) is not None,
                           device=device, dtype=dtype)
    if device.type != "meta":  # a meta build has no values to initialise
        for layer in (gated.gate, gated.up, down):
            torch.nn.init.normal_(layer.weight, std=0.02)
            if layer.bias is not None:
                torch.nn.init.zeros_(layer.bias)
    setattr(owner_in, in_name, gated)
    setattr(owner_out, out_name, down)
    if owner_act is not None:
        setattr(owner_act, act_name, torch.nn.Identity())
    return inner, hidden


def use_geglu(model):
    """GeGLU (Shazeer 2020, "GLU Variants Improve Transformer"): every block's feed-forward becomes
    down(gelu(gate(x)) * up(x)) with the hidden width that keeps the parameter count. An MLP that
    is already gated (Llama-style gate/up/down) only swaps its SiLU for GELU. Returns the number
    of blocks swapped to GELU, of feed-forwards replaced, and the (old, new) width."""
    swapped = replaced = 0
    widths = None
    for block in transformer_blocks(model):
        mlp = getattr(block, "mlp", None)
        if mlp is not None and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            setattr(mlp, "act_fn" if hasattr(mlp, "act_fn") else "act", torch.nn.GELU())
            swapped += 1
        elif mlp is not None and hasattr(mlp, "c_fc") and hasattr(mlp, "c_proj"):  # GPT-2 (Conv1D)
            widths = replace_feed_forward(mlp, "c_fc", mlp, "c_proj", mlp, "act")
            replaced += 1
        elif hasattr(block, "intermediate") and hasattr(getattr(block, "output", None), "dense"):
            inter = block.intermediate
            act_name = "intermediate_act_fn" if hasattr(inter, "intermediate_act_fn") else None
            widths = replace_feed_forward(inter, "dense", block.output, "dense",
                                          inter if act_name else None, act_name or "")
            replaced += 1
        elif hasattr(block, "ffn") and hasattr(block.ffn, "lin1") and hasattr(block.ffn, "lin2"):
            widths = replace_feed_forward(block.ffn, "lin1", block.ffn, "lin2", block.ffn, "activation")
            replaced += 1
        else:
            raise ValueError(f"GeGLU: the feed-forward of {type(block).__name__} is not recognised "
                             f"(supported: GPT-2, BERT, DistilBERT, Llama-style gated MLPs)")
    config = getattr(model, "config", None)
    if swapped and config is not None and hasattr(config, "hidden_act"):
        config.hidden_act = "gelu"
    elif widths is not None and config is not None:
        config.headroom_geglu_hidden = widths[1]  # the width the estimators and FFN pruning read
    return swapped, replaced, widths


#: What the exported script embeds, in order.
PORTABLE = (GatedProjection, matched_hidden, linear_dims, replace_feed_forward, use_geglu)
