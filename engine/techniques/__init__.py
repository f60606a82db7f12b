"""Techniques: one module each, every one declaring a ``Technique`` (``base.py``).

The registry (``registry()``) is every module of this package's path (plus the folders named in
``HEADROOM_TECHNIQUE_PATH``, which the measure child receives from its parent), ordered; the CLI flags, the
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

import os
from pathlib import Path
from typing import TYPE_CHECKING

from engine.techniques.base import (AnalyticSetup, AnalyticTerms, Control, Field, LoopHooks,
                                    ProcessHooks, ScriptHooks, Technique, active, all_fields,
                                    analytic_setup, explanations, get, loop_hooks,
                                    model_techniques, plan_axis, plan_varies, process_hooks,
                                    registry, resized, script_hooks)

if TYPE_CHECKING:
    import torch

    from engine.profile import Profile

#: Folders of more technique modules (``os.pathsep``-separated), discovered like the package's own:
#: a plugin's folder, or the folders a parent process put on ``__path__`` (the measure child).
PATH_ENV = "HEADROOM_TECHNIQUE_PATH"
for _entry in os.environ.get(PATH_ENV, "").split(os.pathsep):
    if _entry and _entry not in __path__:
        __path__.append(_entry)


def plugin_path() -> str:
    """The folders beyond the package's own on ``__path__`` (``PATH_ENV``'s form): what a child
    process needs to discover the same techniques."""
    own = Path(__file__).resolve().parent
    return os.pathsep.join(p for p in __path__ if Path(p).resolve() != own)


def apply_model_techniques(model: "torch.nn.Module", profile: "Profile") -> list[str]:
    """Apply every model-side technique the profile selects; return their notes for the result."""
    notes: list[str] = []
    for technique in model_techniques():
        if technique.active(profile):
            note = technique.apply_model(model, profile)
            if note:
                notes.append(note)
    return notes


__all__ = ["PATH_ENV", "plugin_path", "AnalyticSetup", "AnalyticTerms", "analytic_setup", "resized", "Control", "Field", "LoopHooks", "Technique", "active", "all_fields",
           "apply_model_techniques", "explanations", "get", "loop_hooks", "model_techniques",
           "registry", "ProcessHooks", "process_hooks", "ScriptHooks", "script_hooks"]
