"""Gradient (activation) checkpointing through transformers' own switch, non-reentrant.

With ``checkpoint_every = k`` only every k-th transformer block is checkpointed: a dial between
memory (k = 1 keeps only each block's input) and speed (k large recomputes little).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

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
