"""A toy technique, for tests/test_toy_technique.py: a ballast buffer of N KiB in the model.

It is one module, like every technique: dropped on ``engine.techniques``' package path it must
reach the CLI flags, the Profile, validation, the GUI panel, both estimates, measure and the
exported script with no other file edited. Its weights grow by exactly N KiB, so every consumer's
numbers can be checked exactly.
"""

from __future__ import annotations

from engine.techniques.base import Control, Field, Technique


def add_ballast(model, kib):
    """Register ``kib`` KiB of zeros as a buffer of ``model`` (fp32, on the model's device)."""
    import torch

    device = next(model.parameters()).device
    model.register_buffer("toy_ballast", torch.zeros(kib * 256, dtype=torch.float32, device=device))
    return model


def _apply(model, profile):
    add_ballast(model, profile.toy_ballast_kib)
    return f"toy ballast: {profile.toy_ballast_kib} KiB"


TECHNIQUE = Technique(
    name="toy_ballast",
    title="Toy ballast",
    order=95,
    fields=(Field("toy_ballast_kib", int, 0, "toy: KiB of ballast buffer in the model (0 = off)",
                  minimum=0, metavar="KIB", modes=("train",), mode_hint="toy ballast"),),
    controls=(Control("toy_ballast_kib", "spin", "Ballast (KiB)", field="toy_ballast_kib", low=0,
                      high=1 << 20),),
    explanations={"toy_ballast": "A toy ballast buffer: it saves nothing and costs exactly its size."},
    active=lambda p: p.toy_ballast_kib > 0,
    apply_model=_apply,
    apply_rank=60,
    export_source=lambda: [add_ballast],
    export_calls=lambda p: [f"add_ballast(model, {p.toy_ballast_kib})"],
)
