"""Techniques: one module each. A model-side technique exposes

    applies(profile) -> bool           whether the profile switches it on
    apply(model, profile) -> None      change the built model in place (before it moves to a device
                                       for meta builds too, so estimators see the same model)
    EXPLANATION: str                   one paragraph for the UI: what it does, when it helps, costs

The order of TECHNIQUES is the order of application: structural changes (GeGLU, pruning) before
wrappers (feed-forward chunking, attention, checkpointing).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from engine.profile import Profile

#: module names under engine.techniques, in application order; missing ones are skipped so the
#: engine keeps working while a technique is being written.
TECHNIQUES = ("geglu", "pruning", "ffn_chunking", "local_attention", "checkpointing")


def technique_modules():
    mods = []
    for name in TECHNIQUES:
        try:
            mods.append(importlib.import_module(f"engine.techniques.{name}"))
        except ModuleNotFoundError as exc:
            if exc.name != f"engine.techniques.{name}":
                raise
    return mods


def apply_model_techniques(model: "torch.nn.Module", profile: "Profile") -> list[str]:
    """Apply every model-side technique the profile selects; return their notes for the result."""
    notes: list[str] = []
    for mod in technique_modules():
        if mod.applies(profile):
            note = mod.apply(model, profile)
            if note:
                notes.append(note)
    return notes
