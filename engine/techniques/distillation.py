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


def build_teacher(profile: "Profile", device: str = "cpu") -> "torch.nn.Module":
    """The frozen teacher: eval mode, no gradients, in ``teacher_dtype``; vocab checked."""
    from engine.models import build_model, load_config

    if not profile.distill_from:
        raise BadInput("no teacher: set distill_from to a preset or a model folder")
    student_cfg = load_config(profile.model, profile.trust_remote_code)
    teacher_cfg = load_config(profile.distill_from, profile.trust_remote_code)
    check_vocab(int(getattr(student_cfg, "vocab_size", 0)), int(getattr(teacher_cfg, "vocab_size", 0)))
    teacher = build_model(profile, device, model_name=profile.distill_from, apply_techniques=False)
    dtype = teacher_dtype(profile, device)
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
    import torch.nn.functional as F

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
    s_flat, t_flat = s.reshape(-1, vocab), t.reshape(-1, vocab)
    if labels is not None:
        valid = labels.reshape(-1) != -100
        kl_rows = F.kl_div(F.log_softmax(s_flat / temperature, -1), F.log_softmax(t_flat / temperature, -1),
                           reduction="none", log_target=True).sum(-1)
        kl = (kl_rows * valid).sum() / valid.sum().clamp(min=1)
    else:
        kl = F.kl_div(F.log_softmax(s_flat / temperature, -1), F.log_softmax(t_flat / temperature, -1),
                      reduction="batchmean", log_target=True)
    kl = kl * temperature ** 2
    if labels is None:
        return kl
    ce = ce_loss if ce_loss is not None else F.cross_entropy(
        s_flat, labels.reshape(-1).to(s_flat.device), ignore_index=-100)
    return (1.0 - alpha) * kl + alpha * ce
