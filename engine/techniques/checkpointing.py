"""Gradient (activation) checkpointing through transformers' own switch, non-reentrant.

With ``checkpoint_every = k`` only every k-th transformer block is checkpointed: a dial between
memory (k = 1 keeps only each block's input) and speed (k large recomputes little).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

from engine.techniques.base import Control, Field, Technique

if TYPE_CHECKING:
    import torch

    from engine.profile import Profile

EXPLANATION = (
    "Gradient checkpointing keeps only each transformer block's input during the forward pass and "
    "recomputes the block's activations during backward. Activation memory drops from all layers' "
    "intermediates to one block's plus the saved inputs, at the cost of roughly one extra forward "
    "pass (about 20-35% slower steps). 'Every k-th layer' checkpoints only some blocks: a dial "
    "between memory and speed. Training only; inference keeps no activations anyway."
)


def applies(profile: "Profile") -> bool:
    return profile.checkpointing and profile.mode == "train"


def apply(model: "torch.nn.Module", profile: "Profile") -> str | None:
    from engine.models import find_layers

    kwargs = {"use_reentrant": False}
    every = profile.checkpoint_every
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None and "every_n_layers" in inspect.signature(enable).parameters:
        enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every)
    else:  # transformers < 5.2x: all layers, then switch off the ones not selected
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if every > 1:
            _, layers = find_layers(model)
            for i, layer in enumerate(layers):
                if hasattr(layer, "gradient_checkpointing"):
                    layer.gradient_checkpointing = i % every == 0
    model.train()
    if every > 1:
        return f"checkpointing every {every}th layer"
    return None


TECHNIQUE = Technique(
    name="checkpointing",
    title="Gradient checkpointing",
    order=30,
    fields=(
        Field("checkpointing", bool, False, "gradient checkpointing (recompute activations in "
              "backward)", after="precision", label="gradient checkpointing"),
        Field("checkpoint_every", int, 1, "with checkpointing: checkpoint every k-th layer "
              "(1 = all)", minimum=1, metavar="K", label="checkpoint every k-th layer"),
    ),
    controls=(
        Control("checkpointing", "check", text="Recompute activations in backward",
                field="checkpointing", enabled_when=lambda p: p.mode == "train"),
        Control("checkpoint_every", "spin", "Every k-th layer", field="checkpoint_every", low=1,
                high=128, enabled_when=lambda p: p.checkpointing),
    ),
    explanations={"checkpointing": EXPLANATION},
    active=applies,
    apply_model=apply,
    apply_rank=50,
)
