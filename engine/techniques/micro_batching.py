"""Micro-batching with gradient accumulation (training): N forward/backward passes, one step.

The measured loop, the traced step and the exported script split each batch in
``micro_batches`` slices (``torch.tensor_split`` along the batch) and divide each loss by N.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from engine.errors import BadInput
from engine.techniques.base import AnalyticSetup, Control, Field, Technique

if TYPE_CHECKING:
    from engine.profile import Profile

EXPLANATION = (
    "Micro-batching with gradient accumulation splits each batch into N micro-batches, runs "
    "forward and backward on each and steps the optimizer once. Activation memory is that of "
    "one micro-batch; weights, gradients and optimizer state are unchanged. The result equals "
    "the large batch (up to numerics, and except batch-dependent layers), at the cost of N "
    "smaller, less efficient passes."
)


def validate(p: "Profile") -> None:
    if p.micro_batches > p.batch:
        raise BadInput(f"micro_batches ({p.micro_batches}) cannot exceed batch ({p.batch})")


def analytic_setup(p: "Profile", setup: AnalyticSetup) -> AnalyticSetup:
    """Training: each pass sees ceil(B / N) rows, N passes per optimizer step."""
    if p.mode != "train":
        return setup
    passes = max(1, min(p.micro_batches, setup.rows))
    return replace(setup, rows=-(-setup.rows // passes), passes=passes)


def resize(p: "Profile", changes: dict) -> dict:
    """A smaller batch has at most that many micro-batches."""
    return {"micro_batches": min(p.micro_batches, changes["batch"])} if "batch" in changes else {}


TECHNIQUE = Technique(
    name="micro_batching",
    title="Chunking",
    group="chunking",
    order=50,
    fields=(Field("micro_batches", int, 1, "training: split each batch in N micro-batches, "
                  "accumulate gradients", minimum=1, metavar="N", after="max_tokens",
                  modes=("train",), mode_hint="gradient accumulation", label="micro-batches"),),
    controls=(Control("micro_batches", "spin", "Micro-batches (training)", field="micro_batches",
                      low=1, high=4096, enabled_when=lambda p: p.mode == "train"),),
    explanations={"micro_batching": EXPLANATION},
    summary_title=lambda p: "Micro-batches with gradient accumulation",
    active=lambda p: p.micro_batches > 1,
    validate=validate,
    analytic_setup=analytic_setup,
    resize=resize,
)
