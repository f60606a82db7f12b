"""LoRA adapters through peft (``LoraConfig`` + ``get_peft_model``): the base weights freeze, small
rank-r matrices A (in -> r) and B (r -> out) beside the chosen Linear layers train.

``get_peft_model`` injects the adapters into the transformers model in place (peft's ``LoraModel``
replaces each target Linear by a ``lora.Linear`` wrapping it, freezes every other parameter and
keeps the adapters in fp32 when the base is half precision, ``autocast_adapter_dtype``); the
engine keeps that same model object, so measure, both estimators and the model facts see one
build (``engine.models.build_model``). What changes in memory, and who counts it:

* weights: the frozen base plus the adapters (``r * (in + out)`` per target), from the built model;
* gradients and optimizer state: the adapters (and ``modules_to_save`` copies) only; the frozen
  base has neither (``engine/estimate/analytic.py`` reads the trainable tensors of the build);
* activations: a frozen Linear saves no input for its weight gradient; each adapter saves the
  input of A (the dropout output and its mask when dropout > 0) and A's output for B.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from engine.errors import BadInput
from engine.techniques.base import AnalyticTerms, Control, Field, ScriptHooks, Technique

if TYPE_CHECKING:
    import torch

    from engine.profile import Profile

EXPLANATION = (
    "LoRA freezes the model and trains small rank-r adapters beside the chosen Linear layers "
    "(peft). Gradients and optimizer state exist only for the adapters (often under 1% of the "
    "parameters), so a 7B model's 84 GB of AdamW state and gradients become a few hundred MB; the "
    "frozen weights stay, and activations are still saved for backward through every layer. "
    "QLoRA also stores the frozen weights in 4 bits (see base-weight quantization)."
)

#: Default targets by transformers model_type: every attention projection (the QLoRA paper trains
#: all linear layers; attention-only is the common cheaper default). Others: peft's own table.
DEFAULT_TARGETS = {
    **{t: "q_proj,k_proj,v_proj,o_proj" for t in (
        "llama", "qwen2", "qwen3", "mistral", "mixtral", "gemma", "gemma2", "gemma3_text", "phi3",
        "olmo", "olmo2", "granite", "smollm3", "cohere", "stablelm", "starcoder2", "opt")},
    "gpt2": "c_attn,c_proj",  # attention's fused qkv and both c_proj (attention and MLP)
    "gpt_neox": "query_key_value,dense",
    "bert": "query,key,value", "roberta": "query,key,value", "xlm-roberta": "query,key,value",
    "electra": "query,key,value",
    "distilbert": "q_lin,k_lin,v_lin",
}

_NAMES = re.compile(r"[A-Za-z0-9_.\-]+(,[A-Za-z0-9_.\-]+)*")


def _check_names(value: str) -> None:
    if value and not _NAMES.fullmatch(value):
        raise BadInput(f"module names must be a comma list of names like q_proj,v_proj; got {value!r}")


def _check_dropout(value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise BadInput(f"lora_dropout must be in [0, 1); got {value!r}")


def _check_alpha(value: float) -> None:
    if not 0.0 < value <= 1 << 20:
        raise BadInput(f"lora_alpha must be > 0; got {value!r}")


def applies(profile: "Profile") -> bool:
    return profile.lora > 0 and profile.mode == "train"


def target_modules(profile: "Profile", model_type: str) -> list[str]:
    """The Linear layers the adapters go beside: the profile's list, or the architecture's."""
    if profile.lora_targets:
        return profile.lora_targets.split(",")
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type].split(",")
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT

    if model_type in PEFT:
        return list(PEFT[model_type])
    raise BadInput(f"no default LoRA targets for model type {model_type!r}; name them with "
                   f"--lora-targets (e.g. q_proj,v_proj)")


def lora_config(profile: "Profile", model_type: str):
    """peft's LoraConfig for the profile."""
    from peft import LoraConfig

    save = profile.lora_modules_to_save.split(",") if profile.lora_modules_to_save else None
    return LoraConfig(r=profile.lora, lora_alpha=profile.lora_alpha,
                      lora_dropout=profile.lora_dropout, target_modules=target_modules(profile, model_type),
                      modules_to_save=save, bias="none", fan_in_fan_out=model_type == "gpt2")


def add_lora_adapters(model, rank, alpha, dropout, targets, modules_to_save=()):
    """peft's LoRA adapters beside the ``targets`` Linear layers (LoraConfig + get_peft_model);
    returns the PeftModel, whose ``save_pretrained`` writes the adapter only. peft injects the
    adapters into ``model`` itself and freezes everything else. Torch, transformers and peft only:
    the exported script embeds this function."""
    import warnings

    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                        modules_to_save=list(modules_to_save) or None, bias="none",
                        fan_in_fan_out=model.config.model_type == "gpt2")  # GPT-2's Conv1D
    with warnings.catch_warnings():  # peft's notice about fan_in_fan_out
        warnings.simplefilter("ignore")
        return get_peft_model(model, config)


def _modules_to_save(profile: "Profile") -> tuple[str, ...]:
    return tuple(profile.lora_modules_to_save.split(",")) if profile.lora_modules_to_save else ()


def apply(model: "torch.nn.Module", profile: "Profile") -> str | None:
    targets = target_modules(profile, model.config.model_type)
    try:
        # the adapters go into this model object; the PeftModel wrapper is not kept
        add_lora_adapters(model, profile.lora, profile.lora_alpha, profile.lora_dropout, targets,
                          _modules_to_save(profile))
    except ValueError as exc:
        from engine.errors import exception_line

        raise BadInput(f"LoRA cannot be applied: {exception_line(exc, 200)}") from None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"LoRA r={profile.lora}: {trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%)"


def _analytic_terms(profile, arch, b, t, padded, cuda) -> AnalyticTerms:
    """Per block, beyond the layer model's itemised tensors: each adapter's saved A output (r per
    token) and, with dropout, the dropout output and mask of its input (in per token)."""
    from engine.estimate.analytic import _r

    e = 2 if profile.precision != "fp32" else 4
    E = b * t
    r = profile.lora
    saved = 0
    for fan_in, _ in arch.lora_linears:
        saved += _r(E * r * e, cuda)
        if profile.lora_dropout > 0:
            saved += _r(E * fan_in * e, cuda) + _r(E * fan_in * (1 if cuda else e), cuda)
    return AnalyticTerms(layer_saved=saved)


METHODS = {"full": "Full fine-tuning", "lora": "LoRA adapters", "qlora": "QLoRA (4-bit base + LoRA)"}
QUANT_LABELS = {"none": "none (profile precision)", "nf4": "4-bit NF4", "nf4-dq": "4-bit NF4, double quant",
                "int8": "8-bit (LLM.int8)"}


def _method_of(profile: "Profile") -> str:
    if not profile.lora:
        return "full"
    return "qlora" if profile.quant != "none" else "lora"


def _method_choices() -> dict[str, str]:
    """The methods; QLoRA says when bitsandbytes is missing (it can still be estimated)."""
    from engine.optimizers import bitsandbytes_missing

    missing = bitsandbytes_missing(quick=True)
    out = dict(METHODS)
    if missing:
        out["qlora"] += f" - estimate only: {missing}"
    return out


def _write_method(values: dict) -> dict:
    method = values["finetune_method"]
    rank = values["lora_rank"] or 16
    if method == "full":
        return {"lora": 0, "quant": "none"}
    if method == "lora":
        return {"lora": rank, "quant": "none"}
    quant = values["quant"] if values["quant"] != "none" else "nf4"
    return {"lora": rank, "quant": quant}


def _adapters_on(profile: "Profile") -> bool:
    return profile.lora > 0 and profile.mode == "train"


CONTROLS = (
    Control("finetune_method", "combo", "Method", choices=_method_choices, read=_method_of,
            write=_write_method, enabled_when=lambda p: p.mode == "train",
            tooltip="Full: every weight trains. LoRA: frozen base, rank-r adapters train. QLoRA: "
                    "LoRA over 4-bit base weights (bitsandbytes)."),
    Control("lora_rank", "spin", "Rank r", field="lora", low=0, high=4096, special="off",
            enabled_when=_adapters_on),
    Control("lora_alpha", "float", "Alpha", field="lora_alpha", low=0.01, high=4096, step=1,
            decimals=1, enabled_when=_adapters_on),
    Control("lora_dropout", "float", "Adapter dropout", field="lora_dropout", low=0.0, high=0.99,
            step=0.05, enabled_when=_adapters_on),
    Control("lora_targets", "text", "Target modules", field="lora_targets",
            placeholder="default for the architecture", choices={"": "", "q_proj,v_proj": "",
                                                                 "q_proj,k_proj,v_proj,o_proj": "",
                                                                 "c_attn,c_proj": "",
                                                                 "query,key,value": ""},
            enabled_when=_adapters_on),
    Control("quant", "combo", "Base weights", field="quant", choices=QUANT_LABELS,
            enabled_when=lambda p: p.lora > 0 or p.mode == "infer"),
    Control("quant_dtype", "combo", "Compute dtype", field="quant_dtype",
            choices={"bf16": "bf16", "fp16": "fp16"}, enabled_when=lambda p: p.quant != "none"),
)


def _export_calls(profile: "Profile") -> list[str]:
    save = ", LORA_MODULES_TO_SAVE" if profile.lora_modules_to_save else ""
    return [f"model = add_lora_adapters(model, LORA_RANK, LORA_ALPHA, LORA_DROPOUT, LORA_TARGETS{save})"]


def _export_constants(profile: "Profile") -> list[tuple]:
    from engine.models import load_config

    model_type = load_config(profile.model, profile.trust_remote_code).model_type
    out = [("LORA_RANK", profile.lora, "LoRA rank r"),
           ("LORA_ALPHA", profile.lora_alpha, "the update is scaled by alpha / r"),
           ("LORA_DROPOUT", profile.lora_dropout, "dropout on the adapters' input"),
           ("LORA_TARGETS", tuple(target_modules(profile, model_type)), "Linear layers with an adapter")]
    if profile.lora_modules_to_save:
        out.append(("LORA_MODULES_TO_SAVE", _modules_to_save(profile), "trained in full beside the adapters"))
    return out


def _summary(profile: "Profile") -> str:
    return f"LoRA: r={profile.lora}, alpha={profile.lora_alpha:g}"


TECHNIQUE = Technique(
    name="lora",
    title="Fine-tuning method",
    order=5,
    group="finetune",
    fields=(
        Field("lora", int, 0, "LoRA rank r (0 = full fine-tuning)", minimum=0, maximum=1 << 16,
              metavar="R", after="optimizer", modes=("train",), label="LoRA rank"),
        Field("lora_alpha", float, 16.0, "LoRA alpha (the update is scaled by alpha/r)",
              check=_check_alpha, metavar="A", label="LoRA alpha"),
        Field("lora_dropout", float, 0.0, "dropout on the adapters' input (0 = none)",
              check=_check_dropout, metavar="P", label="LoRA dropout"),
        Field("lora_targets", str, "", 'Linear layers that get adapters, comma list ("" = the '
              "architecture's attention projections)", check=_check_names, metavar="a,b,c",
              label="LoRA targets"),
        Field("lora_modules_to_save", str, "", "modules trained in full beside the adapters "
              '(e.g. lm_head; "" = none)', check=_check_names, metavar="a,b", label="LoRA modules to save"),
    ),
    controls=CONTROLS,  # the whole group's (quantization's fields too: one method combo sets both)
    explanations={"lora": EXPLANATION},
    summary_title=_summary,
    active=applies,
    apply_model=apply,
    apply_rank=35,  # after structural changes and feed-forward chunking, before checkpointing
    analytic_terms=_analytic_terms,
    export_source=lambda: [add_lora_adapters],
    export_calls=_export_calls,
    export_constants=_export_constants,
    script=ScriptHooks(header=lambda p: f"LoRA r={p.lora} (peft; the adapter is saved to --output-dir)"),
)
