"""Precision: fp32, autocast (fp16 with a GradScaler, bf16) or pure bf16/fp16 weights.

The loop applies autocast and the scaler (measure, the traced step, the exported script); the
weight dtype is ``engine.models.dtype_of``.
"""

from __future__ import annotations

from engine.techniques.base import Control, Field, Technique

PRECISIONS = ("fp32", "fp16-amp", "bf16-amp", "fp16", "bf16")

EXPLANATION = (
    "Mixed precision (AMP) runs matrix multiplications in fp16 or bf16 under autocast while the "
    "weights and optimizer state stay fp32. Saved activations are mostly half size and tensor "
    "cores make steps much faster on modern GPUs; autocast also keeps a half-precision copy of "
    "weights during the step. fp16 needs a GradScaler against underflow; bf16 does not. Pure "
    "bf16/fp16 stores the weights themselves in half precision (half the weight, gradient and "
    "optimizer memory) at some risk to training stability."
)

_LABELS = {"fp32": "fp32 (off)", "fp16-amp": "fp16 autocast + GradScaler", "bf16-amp": "bf16 autocast",
           "fp16": "pure fp16 weights", "bf16": "pure bf16 weights"}

TECHNIQUE = Technique(
    name="amp",
    title="Mixed precision (AMP)",
    order=20,
    fields=(Field("precision", str, "fp32", "fp32 | fp16-amp | bf16-amp (autocast) | fp16 | bf16 "
                  "(pure weights)", choices=PRECISIONS, after="seq"),),
    controls=(Control("precision", "combo", "Precision", field="precision", choices=_LABELS),),
    explanations={"amp": EXPLANATION},
    summary_title=lambda p: f"Precision: {p.precision}",
    active=lambda p: p.precision != "fp32",
)
