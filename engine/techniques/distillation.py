"""Knowledge distillation: a frozen teacher's logits train the student.

Loop contract (the measure loop and the exported script do this)::

    teacher = build_teacher(profile, device)          # once, before the steps
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=mask).logits
    s_logits = student(input_ids=ids, attention_mask=mask).logits   # under autocast if AMP
    loss = distillation_loss(s_logits, t_logits, labels, profile)
    loss.backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)

Teacher precision rule (``profile.teacher_precision``): ``fp32``, ``bf16`` or ``fp16`` store the
teacher's weights in that dtype on any device. ``auto``: on CUDA the teacher is stored in bf16
whenever the student computes in bf16 (``bf16-amp`` or pure ``bf16``) and in fp16 for
``fp16-amp``/``fp16``; otherwise (fp32 student, or CPU) it keeps the student's weight dtype. A
frozen teacher needs no fp32 master copy: half precision halves its weight memory (and, outside
autocast, its forward's activations and logits), and it keeps no activations (``no_grad``).

Vocabulary rule: teacher and student must share the tokenizer. Vocab sizes that differ only by
padding rows (e.g. 50257 vs 50304) are handled by slicing both logits to the common first
``min(V_s, V_t)`` entries; a difference larger than 1% (or 128 rows) means a different vocabulary
and raises BadInput (``check_vocab``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.errors import BadInput
from engine.techniques.base import AnalyticTerms, Control, Field, LoopHooks, ScriptHooks, Technique

if TYPE_CHECKING:
    import torch

    from engine.profile import Profile

TEMPERATURE = 2.0  # softens both distributions; the KL term is scaled by T² (Hinton et al. 2015)
ALPHA = 0.5  # weight of the hard-label loss when labels are given

EXPLANATION = (
    "Knowledge distillation trains the (smaller) student model to match a frozen teacher's "
    "output distribution: loss = KL(teacher || student) on temperature-softened logits, times T², "
    "plus a weighted ordinary loss on the labels. The teacher runs forward only, under no_grad, "
    "so it adds its weights (kept in bf16/fp16 on a GPU when the student uses that precision, or in "
    "the teacher precision chosen) and "
    "one forward's temporary activations, but no gradients, optimizer state or saved activations. "
    "Each step costs one extra teacher forward pass. Teacher and student must share the tokenizer "
    "(same vocabulary)."
)


def applies(profile: "Profile") -> bool:
    return bool(profile.distill_from)


def apply(model: "torch.nn.Module", profile: "Profile") -> str | None:
    """Distillation changes the loop, not the student: nothing to do here."""
    return None


def teacher_dtype(profile: "Profile", device) -> "torch.dtype":
    """The teacher's weight dtype (see the module docstring for the rule)."""
    import torch

    from engine.models import dtype_of

    chosen = getattr(profile, "teacher_precision", "auto")
    if chosen != "auto":
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[chosen]
    dev = getattr(device, "type", str(device).split(":")[0])
    if dev == "cuda":
        if profile.precision in ("bf16-amp", "bf16"):
            return torch.bfloat16
        if profile.precision in ("fp16-amp", "fp16"):
            return torch.float16
    return dtype_of(profile)


def check_vocab(student_vocab: int, teacher_vocab: int) -> int:
    """The common vocabulary size, or BadInput when the vocabularies clearly differ."""
    if student_vocab == teacher_vocab:
        return student_vocab
    low, high = sorted((int(student_vocab), int(teacher_vocab)))
    if high - low > max(128, 0.01 * high):
        raise BadInput(f"distillation needs teacher and student to share a vocabulary; "
                       f"student has {student_vocab} tokens, teacher {teacher_vocab}")
    return low


def build_teacher(profile: "Profile", device: str = "cpu", target: str | None = None) -> "torch.nn.Module":
    """The frozen teacher on ``device``: eval mode, no gradients, in ``teacher_dtype`` for a run
    on ``target`` (default: the device; the traced estimate builds on meta for CUDA); vocab checked."""
    from engine.models import build_model, load_config

    if not profile.distill_from:
        raise BadInput("no teacher: set distill_from to a preset or a model folder")
    student_cfg = load_config(profile.model, profile.trust_remote_code)
    teacher_cfg = load_config(profile.distill_from, profile.trust_remote_code)
    check_vocab(int(getattr(student_cfg, "vocab_size", 0)), int(getattr(teacher_cfg, "vocab_size", 0)))
    teacher = build_model(profile, device, model_name=profile.distill_from, apply_techniques=False)
    dtype = teacher_dtype(profile, target or device)
    if dtype != next(teacher.parameters()).dtype:
        teacher.to(dtype)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def distillation_loss(student_logits, teacher_logits, labels=None, *extra,
                      temperature: float = TEMPERATURE, alpha: float = ALPHA, profile=None,
                      ce_loss=None):
    """KL(softmax(t/T) || softmax(s/T)) · T² (+ alpha · hard-label loss when labels are given).

    Logits are (B, T, V) (or (B, V)); labels (B, T) in the model's own convention (-100 ignored).
    ``extra`` positionals may be the Profile and/or the student's own hard-label loss tensor
    (``out.loss``), in any order: ``distillation_loss(s, t, labels, profile)`` (measure) and
    ``distillation_loss(s, t, labels, out.loss, profile)`` (traced estimate) both work. With a
    causal-lm profile the logits are shifted against the labels (token i+1 from position i).
    With labels the loss is (1 - alpha) · KL + alpha · CE (``ce_loss`` when given); without, KL.
    """
    import torch

    for arg in extra:
        if isinstance(arg, torch.Tensor):
            ce_loss = arg
        elif hasattr(arg, "distill_from"):
            profile = arg
        elif isinstance(arg, (int, float)):
            temperature = float(arg)
    vocab = check_vocab(student_logits.shape[-1], teacher_logits.shape[-1])
    s = student_logits[..., :vocab].float()
    t = teacher_logits[..., :vocab].detach().float()
    causal = False
    if profile is not None and labels is not None:
        from engine.models import load_config, resolve_task

        causal = resolve_task(profile, load_config(profile.model, profile.trust_remote_code)) == "causal-lm"
    if causal and s.dim() == 3:  # predict token i+1 from position i
        s, t = s[:, :-1], t[:, :-1]
        labels = labels[:, 1:]
    return soft_target_loss(s, t, labels, temperature, alpha, ce_loss)


def soft_target_loss(student, teacher, labels, temperature, alpha, ce=None):
    """Hinton et al. 2015 on fp32 logits of one vocabulary, (..., V), aligned with ``labels``
    (-100 ignored): (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + alpha * CE
    (``ce`` when given); without labels the KL term alone. Torch only: the exported script
    embeds this function, so its loss is the one measure computes."""
    import torch.nn.functional as F

    vocab = student.shape[-1]
    # New names: the (B, T, V) fp32 inputs stay alive until the loss returns, as in measure's loop.
    s_flat, t_flat = student.reshape(-1, vocab), teacher.reshape(-1, vocab)  # (N, V)
    if labels is not None:
        valid = labels.reshape(-1) != -100  # (N,)
        kl_rows = F.kl_div(F.log_softmax(s_flat / temperature, -1), F.log_softmax(t_flat / temperature, -1),
                           reduction="none", log_target=True).sum(-1)  # (N,)
        kl = (kl_rows * valid).sum() / valid.sum().clamp(min=1)
    else:
        kl = F.kl_div(F.log_softmax(s_flat / temperature, -1), F.log_softmax(t_flat / temperature, -1),
                      reduction="batchmean", log_target=True)
    kl = kl * temperature ** 2
    if labels is None:
        return kl
    if ce is None:
        ce = F.cross_entropy(s_flat, labels.reshape(-1).to(s_flat.device), ignore_index=-100)
    return (1.0 - alpha) * kl + alpha * ce


TEACHER_PRECISIONS = ("auto", "fp32", "bf16", "fp16")


# ----- estimators ----------------------------------------------------------------------------
def teacher_profile(profile: "Profile") -> "Profile":
    """The teacher's profile: the student's run (mode, task, precision, target) on the teacher's
    model, without the student's model techniques (dense, unpruned, full attention)."""
    import dataclasses

    from engine import techniques

    plain = {f.name: f.default for t in techniques.model_techniques() for f in t.fields}
    return dataclasses.replace(profile, model=profile.distill_from, distill_from="",
                               teacher_precision="auto", **plain)


def _teacher_elt(profile: "Profile") -> int:
    """Bytes per teacher weight: the distillation technique's rule (``teacher_precision``; auto:
    bf16/fp16 teacher on CUDA for half-precision profiles, ``engine.techniques.distillation.
    teacher_dtype``)."""
    if profile.teacher_precision != "auto":
        return 4 if profile.teacher_precision == "fp32" else 2
    if profile.target == "cuda" and profile.precision != "fp32":
        return 2
    return 2 if profile.precision in ("bf16", "fp16") else 4


def _teacher_precision(profile: "Profile") -> str:
    """The precision the teacher's forward computes in, as ``layer_cost`` understands it: the
    student's autocast when there is one (it casts the teacher's matmuls too), else its weights'."""
    if profile.precision in ("bf16-amp", "fp16-amp"):
        return profile.precision
    if _teacher_elt(profile) == 4:
        return "fp32"
    if profile.teacher_precision == "auto":
        return profile.precision  # auto picks a half dtype only for a half-precision student
    return profile.teacher_precision


def _distill_loss_costs(arch, t_arch, b: int, t: int, precision: str, cuda: bool,
                        t_elt: int) -> tuple[int, int, int]:
    """(teacher logits, forward transient at the loss, backward transient at the loss) of
    ``engine.techniques.distillation.distillation_loss`` with hard labels, as measure calls it.

    Forward, at its peak (inside ``kl_div``): both models' logits (E x V, in their output
    dtype), their fp32 upcasts (none when already fp32), for a causal LM the shifted
    ``reshape`` copies of both (N = B x (T-1) rows), both log-softmaxes, and the elementwise
    ``exp(target) * (target - input)`` (three N x V fp32 tensors). Backward: the saved student
    log-softmax, ``exp(target)`` and the hard-label log-softmax, plus three gradients of N x V.
    """
    from engine.estimate.analytic import _r

    e = 2 if precision != "fp32" else 4  # the student's logits dtype
    # the teacher's logits dtype: autocast's for AMP, else its weights' (teacher_precision)
    te = 2 if precision in ("bf16-amp", "fp16-amp") else t_elt
    E = b * t
    V = min(arch.vocab, t_arch.vocab)
    causal = arch.task == "causal-lm"
    n = b * (t - 1) if causal else E
    u = _r(n * V * 4, cuda)
    s_logits = _r(E * arch.vocab * e, cuda)
    t_logits = _r(E * t_arch.vocab * te, cuda)
    upcasts = (_r(E * V * 4, cuda) if e != 4 else 0) + (_r(E * V * 4, cuda) if te != 4 else 0)
    copies = 2 * u if causal else 0
    fwd = s_logits + upcasts + copies + 5 * u  # log-softmax x2, exp(t), t - s, product
    bwd = 6 * u
    return t_logits, fwd, bwd


def analytic_terms(profile: "Profile", arch, b: int, t: int, padded: bool, cuda: bool):
    """The teacher's weights (in its dtype), the distillation loss's tensors, and the teacher's
    own forward (no_grad, before the student's: one block's tensors live at a time, in the
    teacher's compute dtype, then its logits)."""
    from engine.estimate.analytic import _r, arch_of, layer_cost

    if profile.mode != "train":
        return AnalyticTerms()
    t_arch = arch_of(teacher_profile(profile))
    t_elt = _teacher_elt(profile)
    weights = sum(_r(n * t_elt, cuda) for n, _ in t_arch.param_tensors)
    loss = _distill_loss_costs(arch, t_arch, b, t, profile.precision, cuda, t_elt)
    t_cost = layer_cost(t_arch, b, t, _teacher_precision(profile), cuda, "sdpa", padded, False)
    forward = max(sum(t_cost.saved) + t_cost.fwd_transient, loss[0])
    row = (f"teacher ({profile.distill_from}, frozen)", t_arch.params, t_arch.params * t_elt)
    return AnalyticTerms(weights=weights, loss=loss, forward_phases=(forward,), layers=t_arch.layers,
                         rows=(row,))


def _extra_models(profile: "Profile", device: str, target: str) -> list:
    return [build_teacher(profile, device, target)]


def _loss(model, extras, ids, mask, labels, profile: "Profile"):
    import torch

    (teacher,) = extras
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids, attention_mask=mask).logits
    logits = model(input_ids=ids, attention_mask=mask).logits
    loss = distillation_loss(logits, teacher_logits, labels, profile)
    del teacher_logits, logits
    return loss


LOOP = LoopHooks(extra_models=_extra_models, loss=_loss)


# ----- the exported script ---------------------------------------------------------------------
_TEACHER_HALF = {"bf16-amp": "torch.bfloat16", "bf16": "torch.bfloat16", "fp16-amp": "torch.float16",
                 "fp16": "torch.float16"}
_TEACHER_DTYPES = {"fp32": "torch.float32", "bf16": "torch.bfloat16", "fp16": "torch.float16"}


def _script_constants(profile: "Profile", tools) -> None:
    tools.const("TEMPERATURE", TEMPERATURE, "distillation: both distributions softened by this")
    tools.const("ALPHA", ALPHA, "distillation: weight of the ordinary loss on the labels (the rest: KL)")
    if profile.teacher_precision != "auto":
        tools.const("TEACHER_DTYPE", None, f"teacher_precision {profile.teacher_precision}: the frozen "
                    "teacher's weights", raw=_TEACHER_DTYPES[profile.teacher_precision])


def _script_model_constants(profile: "Profile", tools) -> None:
    tools.model_constants(tools.model_facts(profile.distill_from), "TEACHER", "the distillation teacher: ")


def _script_build_teacher(profile: "Profile", tools) -> str:
    """``build_teacher(device)``: as ``build_teacher`` above (the teacher dtype rule included)."""
    chosen = profile.teacher_precision != "auto"
    half = None if chosen else _TEACHER_HALF.get(profile.precision)
    doc = ["def build_teacher(device):",
           '    """The distillation teacher: built like the student but without its techniques (dense,',
           '    unpruned), frozen: eval mode, no gradients.']
    if chosen:
        doc[-1] += " Its weights are stored in TEACHER_DTYPE on any"
        doc.append("    device: a frozen teacher needs no fp32 master copy.\"\"\"")
    elif half:
        doc[-1] += " On a GPU it is stored in the precision the student"
        doc.append("    computes in: a frozen teacher needs no fp32 master copy.\"\"\"")
    else:
        doc[-1] += '"""'
    lines = doc + tools.build_lines(tools.model_facts(profile.distill_from), "TEACHER", "teacher")
    if chosen:
        lines.append("    teacher.to(TEACHER_DTYPE)")
    elif half:
        lines += ['    if device.type == "cuda":', f"        teacher.to({half})"]
    lines += ["    teacher.eval()", "    teacher.requires_grad_(False)", "    return teacher"]
    return "\n".join(lines)


_SCRIPT_LOSS = '''
def distillation_loss(logits, teacher_logits, labels):
    """Knowledge distillation (Hinton et al. 2015): KL(teacher || student) on logits softened by
    TEMPERATURE, times TEMPERATURE^2, mixed with the ordinary cross-entropy on the labels:
    (1 - ALPHA) * KL + ALPHA * CE. Positions whose label is -100 are left out of both."""
    vocab = min(logits.shape[-1], teacher_logits.shape[-1])  # vocabularies may differ by padding rows
    student = logits[..., :vocab].float()  # (B, T, V)
    teacher = teacher_logits[..., :vocab].detach().float()  # (B, T, V)
#SHIFT#
    return soft_target_loss(student, teacher, labels, TEMPERATURE, ALPHA)
'''

_SCRIPT_SHIFT = ("    # A causal LM predicts token i + 1 at position i.\n"
                 "    student, teacher, labels = student[:, :-1], teacher[:, :-1], labels[:, 1:]")


def _script_loss_code(profile: "Profile", tools) -> str:
    """``soft_target_loss`` (this module's own source) and the script's ``distillation_loss``."""
    import inspect
    import textwrap

    shift = _SCRIPT_SHIFT + "\n" if tools.model_facts(profile.model).task == "causal-lm" else ""
    own = textwrap.dedent(inspect.getsource(soft_target_loss)).strip("\n")
    return own + "\n\n\n" + textwrap.dedent(_SCRIPT_LOSS).strip("\n").replace("#SHIFT#\n", shift)


def _script_loss_lines(inner: str, inputs: str, divide: str) -> list[str]:
    return [f"{inner}with torch.no_grad():",
            f"{inner}    teacher_logits = teacher({inputs}).logits",
            f"{inner}logits = model({inputs}).logits",
            f"{inner}loss = distillation_loss(logits, teacher_logits, labels){divide}",
            f"{inner}del teacher_logits, logits  # only the loss is kept: the logits are freed before backward"]


def _script_header(profile: "Profile") -> str:
    from engine.export.literals import docstring_safe

    chosen = f" ({profile.teacher_precision} teacher)" if profile.teacher_precision != "auto" else ""
    name = profile.distill_from.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1] or "model"
    return f"distilled from {docstring_safe(name)}{chosen}"


SCRIPT = ScriptHooks(
    extra_models=("teacher",), constants=_script_constants, model_constants=_script_model_constants,
    model_code=_script_build_teacher, step_code=_script_loss_code, loss_lines=_script_loss_lines,
    step_doc="The frozen teacher runs forward without gradients; the student learns from its\n"
             "logits (distillation_loss).",
    header=_script_header)


def validate(p: "Profile") -> None:
    if p.teacher_precision != "auto" and not p.distill_from:
        raise BadInput(f"teacher_precision {p.teacher_precision!r} needs a distillation teacher: "
                       f"set distill_from, or leave teacher_precision at auto")


def check(prepared) -> list[str]:
    from engine.models import load_config

    p = prepared.profile
    if not p.distill_from:
        return []
    teacher = load_config(p.distill_from, p.trust_remote_code)
    check_vocab(int(getattr(prepared.config, "vocab_size", 0)), int(getattr(teacher, "vocab_size", 0)))
    notes = []
    if p.distill_from == p.model:
        notes.append("the teacher is the student's own architecture (self-distillation)")
    if p.local_window or p.prune or p.mlp != "default":
        notes.append("the teacher is built without the student's techniques (dense, unpruned)")
    return notes


def _teacher_positions(p: "Profile") -> tuple[str, int]:
    from engine.models import load_config, max_positions

    return f"the teacher {p.distill_from}", max_positions(load_config(p.distill_from,
                                                                       p.trust_remote_code)) or 0


def _teacher_changes(values: dict) -> dict:
    teacher = str(values["teacher"]).strip()
    # no teacher, no teacher precision (the profile refuses one without the other)
    return {"distill_from": teacher} if teacher else {"distill_from": "", "teacher_precision": "auto"}


def _preset_choices() -> dict:
    from engine.models import list_presets

    return {"": "", **{name: name for name in list_presets()}}


TECHNIQUE = Technique(
    name="distillation",
    title="Knowledge distillation",
    order=80,
    fields=(
        Field("distill_from", str, "", "teacher model (preset or folder) for knowledge distillation",
              metavar="NAME|DIR", after="ffn_chunks", modes=("train",), mode_hint="knowledge distillation",
              label="distillation teacher", path=True),
        Field("teacher_precision", str, "auto", "teacher weights: auto (student's half dtype on "
              "CUDA) | fp32|bf16|fp16", choices=TEACHER_PRECISIONS, modes=("train",),
              label="teacher precision"),
    ),
    controls=(
        Control("teacher", "text", "Teacher", choices=_preset_choices, placeholder="off (no teacher)",
                read=lambda p: p.distill_from, write=_teacher_changes,
                enabled_when=lambda p: p.mode == "train"),
        Control("teacher_precision", "combo", "Teacher precision", field="teacher_precision",
                choices={"auto": "auto (student's half dtype on GPU)", "fp32": "fp32", "bf16": "bf16",
                         "fp16": "fp16"},
                tooltip="The frozen teacher's weight dtype. auto: bf16/fp16 on a GPU when the student "
                        "computes in that precision, else the student's weight dtype. bf16/fp16 halve "
                        "the teacher's weights and (outside autocast) its forward's activations and "
                        "logits. Needs a teacher.",
                enabled_when=lambda p: p.mode == "train" and bool(p.distill_from)),
    ),
    explanations={"distillation": EXPLANATION},
    active=applies,
    analytic_terms=analytic_terms,
    loop=LOOP,
    script=SCRIPT,
    position_limit=_teacher_positions,
    model_names=lambda p: (p.distill_from,),
    validate=validate,
    check=check,
)
