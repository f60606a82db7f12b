"""Techniques: one module each, every one declaring a ``Technique`` (``base.py``).

The registry (``registry()``) is every module of this package's path, ordered; the CLI flags, the
Profile's fields, validation, ``engine.prepare``'s checks, the technique panel, both estimators,
measure and export iterate it. Model-side changes apply in ``apply_rank`` order: structural
changes (GeGLU, pruning) before wrappers (feed-forward chunking, attention, checkpointing).

How the model-side techniques compose:

* GeGLU then pruning: ``ffn:F`` prunes the GeGLU hidden width (gate/up rows, down columns);
  ``heads:F`` is independent of the MLP; ``unstructured:F`` zeros the GeGLU weights too.
* Pruning then local attention: the window applies to the remaining heads (any head count).
* Feed-forward chunking wraps whatever MLP results (original, GeGLU, pruned).
* Checkpointing last: it wraps the final blocks.
* Distillation's teacher is built without any technique (dense, full attention).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.techniques.base import (AnalyticSetup, AnalyticTerms, Control, Field, LoopHooks,
                                    ProcessHooks, ScriptHooks, Technique, active, all_fields,
                                    analytic_setup, explanations, get, loop_hooks,
                                    model_techniques, process_hooks, registry, resized,
                                    script_hooks)

if TYPE_CHECKING:
    import torch

    from engine.profile import Profile


def apply_model_techniques(model: "torch.nn.Module", profile: "Profile") -> list[str]:
    """Apply every model-side technique the profile selects; return their notes for the result."""
    notes: list[str] = []
    for technique in model_techniques():
        if technique.active(profile):
            note = technique.apply_model(model, profile)
            if note:
                notes.append(note)
    return notes


__all__ = ["AnalyticSetup", "AnalyticTerms", "analytic_setup", "resized", "Control", "Field", "LoopHooks", "Technique", "active", "all_fields",
           "apply_model_techniques", "explanations", "get", "loop_hooks", "model_techniques",
           "registry", "ProcessHooks", "process_hooks", "ScriptHooks", "script_hooks"]
