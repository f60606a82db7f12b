"""Gradient (activation) checkpointing through transformers' own switch, non-reentrant.

With ``checkpoint_every = k`` only every k-th transformer block is checkpointed: a dial between
memory (k = 1 keeps only each block's input) and speed (k large recomputes little).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from engine.models import transformer_blocks
from engine.techniques.base import AnalyticSetup, Control, Field, Technique

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


def enable_checkpointing(model, every=1):
    """Gradient checkpointing through transformers' own switch, non-reentrant, on every ``every``-th
    transformer block (1 = all). Torch and transformers only: the exported script embeds it."""
    import inspect

    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None and "every_n_layers" in inspect.signature(enable).parameters:
        enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every)
    else:  # transformers < 5.2x: all blocks, then switch off the ones not selected
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if every > 1:
            for i, block in enumerate(transformer_blocks(model)):
                if hasattr(block, "gradient_checkpointing"):
                    block.gradient_checkpointing = i % every == 0
    model.train()


def apply(model: "torch.nn.Module", profile: "Profile") -> str | None:
    enable_checkpointing(model, profile.checkpoint_every)
    if profile.checkpoint_every > 1:
        return f"checkpointing every {profile.checkpoint_every}th layer"
    return None


def _export_calls(profile: "Profile") -> list[str]:
    every = ", every=CHECKPOINT_EVERY" if profile.checkpoint_every > 1 else ""
    return [f"enable_checkpointing(model{every})"]


def analytic_setup(p: "Profile", setup: AnalyticSetup) -> AnalyticSetup:
    return replace(setup, checkpoint_every=p.checkpoint_every) if applies(p) else setup


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
    analytic_setup=analytic_setup,
    export_source=lambda: [enable_checkpointing],
    export_calls=_export_calls,
)
