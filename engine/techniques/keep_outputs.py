"""The loop people write: ``outputs = model(**batch)`` kept alive through backward and into the next
step's forward (the Hugging Face course's loop, and many hand-written ones).

Headroom's measured loop, like the Trainer, keeps only the loss: the logits are freed when the
forward returns (the loss saved what backward needs). A loop that binds the forward's output object
to a name keeps it, logits included, until that name is bound again, i.e. until the *next* forward
has returned: through backward, the optimizer step and the next forward. The measured loop, the
traced step and the exported script do exactly that with this option on; the analytic estimate
adds the output object's bytes (``outputs_bytes``) to every phase after the first forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.errors import BadInput
from engine.techniques.base import AnalyticTerms, Control, Field, LoopHooks, ScriptHooks, Technique

if TYPE_CHECKING:
    from engine.profile import Profile

EXPLANATION = (
    "Many hand-written training loops (the Hugging Face course's among them) write "
    "outputs = model(**batch); loss = outputs.loss; loss.backward(). The name outputs keeps the "
    "model's output object, with its logits (batch x tokens x vocabulary in the compute dtype), "
    "alive through backward, the optimizer step and the next step's forward, until the next "
    "forward's result replaces it. A loop that keeps only the loss (as Headroom's and the "
    "Trainer's do) frees the logits when the forward returns. The difference is exactly the "
    "output object's bytes at the peak: for GPT-2 at batch 8 x 512 tokens under bf16 autocast "
    "that is 8 x 512 x 50,257 x 2 bytes = 393 MiB more (traced estimate: +5% of its 7.1 GiB AdamW peak, +6% with "
    "SGD); for Llama-3.2-1B (128,256-token vocabulary) at 8 x 512, 1002 MiB more (+3% of 30.4 GiB). "
    "Measured on CPU for tiny GPT-2- and Llama-like models, the difference is exactly those bytes "
    "(the logits and the 4-byte loss). Writing "
    "del outputs after loss.backward(), or keeping only loss = model(**batch).loss, gives them back."
)


def applies(profile: "Profile") -> bool:
    return profile.keep_outputs and profile.mode == "train"


def validate(p: "Profile") -> None:
    """Outside training ``Field.modes`` refuses it; in training, a technique whose loss replaces
    the model's (distillation) keeps only that loss, so the two are not combined."""
    if not (p.keep_outputs and p.mode == "train"):
        return
    from engine.techniques.base import active

    for other in active(p):
        if other.name != TECHNIQUE.name and other.loop is not None and other.loop.loss is not None:
            raise BadInput(f"keep_outputs with {other.name} is not modelled: the {other.name} loss "
                           "keeps only the loss; choose one")


def outputs_bytes(arch, b: int, t: int, precision: str, cuda: bool) -> int:
    """Bytes of the output object a kept ``outputs`` holds: the logits in the compute dtype
    (half under autocast or half weights, else fp32; a classifier's are batch x labels) and the
    fp32 scalar loss, each rounded to the allocator's blocks on CUDA."""
    from engine.estimate.analytic import _r

    elt = 4 if precision == "fp32" else 2
    logits = b * arch.vocab * elt if arch.task == "classification" else b * t * arch.vocab * elt
    return _r(logits, cuda) + _r(4, cuda)


def analytic_terms(profile: "Profile", arch, b: int, t: int, padded: bool, cuda: bool) -> AnalyticTerms:
    if not applies(profile):
        return AnalyticTerms()
    return AnalyticTerms(held=outputs_bytes(arch, b, t, profile.precision, cuda))


# ----- the exported script ---------------------------------------------------------------------
def _script_step_code(profile: "Profile", tools) -> str:
    return ("# The loop keeps the model outputs, as `outputs = model(**batch)` in a hand-written loop\n"
            "# does: the last forward's output object (its logits) stays alive through backward, the\n"
            "# optimizer step and the next forward, until the next forward's outputs replace it.\n"
            'KEPT = {"outputs": None}')


def _script_loss_lines(inner: str, inputs: str, divide: str) -> list[str]:
    return [f"{inner}outputs = model({inputs}, labels=labels)",
            f'{inner}KEPT["outputs"] = outputs  # the previous outputs are freed only now',
            f"{inner}loss = outputs.loss{divide}"]


SCRIPT = ScriptHooks(step_code=_script_step_code, loss_lines=_script_loss_lines,
                     step_doc="The model outputs are kept until the next forward has returned (KEPT).")


TECHNIQUE = Technique(
    name="keep_outputs",
    title="Training loop",
    order=85,
    fields=(Field("keep_outputs", bool, False, "training: the loop keeps the model outputs (outputs = "
                  "model(**batch)) through backward and the next forward", modes=("train",),
                  mode_hint="the loop keeps the model outputs", label="loop keeps the model outputs"),),
    controls=(Control("keep_outputs", "check", text="My loop keeps the model outputs", field="keep_outputs",
                      tooltip="outputs = model(**batch) kept through backward and into the next step "
                              "(the Hugging Face course's loop): the logits stay alive",
                      enabled_when=lambda p: p.mode == "train"),),
    explanations={"keep_outputs": EXPLANATION},
    summary_title=lambda p: "The loop keeps the model outputs",
    active=applies,
    validate=validate,
    analytic_terms=analytic_terms,
    loop=LoopHooks(keep_outputs=True),
    script=SCRIPT,
)
