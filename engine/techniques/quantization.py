"""Quantized base weights (QLoRA): the transformer blocks' Linear layers stored in 4-bit NF4 (with or
without double quantization) or 8-bit, through bitsandbytes, with LoRA adapters training beside them.

The blocks' ``nn.Linear`` (and GPT-2's ``Conv1D``) layers become ``bitsandbytes.nn.Linear4bit`` /
``Linear8bitLt`` with frozen weights, as transformers' ``BitsAndBytesConfig`` loading does
(embeddings, norms and the LM head stay in the profile's precision). Their quantization state
(absmax per block of 64 weights, the NF4 code, double quantization's second level; int8's
per-row scales) is registered as non-persistent buffers of the layer, so every counter of weights
(measure, both estimators) sees it. On ``meta`` (the estimators) the packed tensors are made with
the shapes bitsandbytes gives them and bitsandbytes' own layers run on them (its ops have meta
kernels); without bitsandbytes a torch stand-in of the same shapes and dequantized temporaries
runs, so the estimate still works where it cannot be measured.

Bytes per weight: NF4 0.5 + 4/64 (fp32 absmax per 64) = 0.5625; double quantization 0.5 + 1/64 +
4/(64*256) = 0.5159; int8 1 + 4/in_features (fp32 scale per row). Each forward and backward
dequantizes one layer's weight to the compute dtype (a temporary of out x in).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.errors import BadInput
from engine.models import transformer_blocks
from engine.techniques.base import AnalyticTerms, Field, Technique

if TYPE_CHECKING:
    import torch

    from engine.profile import Profile

QUANTS = ("none", "nf4", "nf4-dq", "int8")
COMPUTE_DTYPES = ("bf16", "fp16")
BLOCK = 64  # bitsandbytes' 4-bit block size (transformers' default)
BLOCK2 = 256  # double quantization's second-level block

EXPLANATION = (
    "Quantized base weights (QLoRA) store the frozen Linear weights of the transformer blocks in "
    "4 bits (NF4, 0.56 bytes per weight with its scales; 0.52 with double quantization) or 8 bits, "
    "instead of 2 (bf16) or 4 (fp32). Each layer's weight is dequantized to the compute dtype for "
    "its matmul and freed again, so only one layer's full-precision copy exists at a time. Needs "
    "bitsandbytes; training goes through LoRA adapters (the quantized weights do not train)."
)


def quant_missing() -> str:
    from engine.optimizers import bitsandbytes_missing

    return bitsandbytes_missing()


def applies(profile: "Profile") -> bool:
    return profile.quant != "none"


def _validate(profile: "Profile") -> None:
    if profile.quant != "none" and profile.mode == "train" and profile.lora == 0:
        raise BadInput("quantized base weights do not train: add LoRA adapters (--lora R) for QLoRA")


def compute_dtype(profile: "Profile"):
    import torch

    return torch.float16 if profile.quant_dtype == "fp16" else torch.bfloat16


def quantize_linears(model, quant, compute_dtype):
    """The transformer blocks' Linear (and GPT-2 Conv1D) layers as bitsandbytes' frozen 4-bit NF4
    (``quant`` "nf4", "nf4-dq": double quantization) or 8-bit layers, quantized from their weights
    on the model's device, with the quantization state registered as non-persistent buffers (so
    memory counters that walk parameters and buffers see it). Returns the number of layers.
    Torch, transformers' Conv1D and bitsandbytes only: the exported script embeds this function."""
    import bitsandbytes as bnb
    import torch

    device = next(model.parameters()).device
    count = 0
    for block in transformer_blocks(model):
        for parent in list(block.modules()):
            for attr, old in list(parent.named_children()):
                if isinstance(old, torch.nn.Linear):
                    weight = old.weight.detach()
                elif type(old).__name__ == "Conv1D" and old.weight.dim() == 2:
                    weight = old.weight.detach().t()  # Conv1D stores (in, out)
                else:
                    continue
                fan_out, fan_in = weight.shape
                bias = old.bias is not None
                if quant == "int8":  # Int8Params quantize when they move from the CPU
                    new = bnb.nn.Linear8bitLt(fan_in, fan_out, bias=bias, has_fp16_weights=False,
                                              device="meta")
                    new.weight = bnb.nn.Int8Params(weight.to(compute_dtype).cpu(), requires_grad=False,
                                                   has_fp16_weights=False)
                else:
                    dq = quant == "nf4-dq"
                    new = bnb.nn.Linear4bit(fan_in, fan_out, bias=bias, compute_dtype=compute_dtype,
                                            compress_statistics=dq, quant_type="nf4", device="meta")
                    new.weight = bnb.nn.Params4bit(weight.to(compute_dtype), requires_grad=False,
                                                   blocksize=64, compress_statistics=dq,
                                                   quant_type="nf4", module=new)
                if bias:
                    new.bias = torch.nn.Parameter(old.bias.detach().to("cpu" if quant == "int8" else device),
                                                  requires_grad=False)
                new = new.to(device)  # bitsandbytes quantizes as the weight moves to the device
                qs = getattr(new.weight, "quant_state", None)
                state = {"scb": new.weight.SCB} if qs is None else {
                    "absmax": qs.absmax, "code": qs.code, "offset": qs.offset,
                    "absmax2": qs.state2.absmax if qs.state2 is not None else None,
                    "code2": qs.state2.code if qs.state2 is not None else None}
                for name, t in state.items():
                    if t is not None:
                        new.register_buffer(f"quant_{name}", t, persistent=False)
                setattr(parent, attr, new)
                count += 1
    return count


def _linears(model):
    """(parent, attribute, module, in, out) of the blocks' Linear/Conv1D layers."""
    import torch

    found = []
    for block in transformer_blocks(model):
        for parent in block.modules():
            for attr, child in parent.named_children():
                if isinstance(child, torch.nn.Linear):
                    found.append((parent, attr, child, child.in_features, child.out_features))
                elif type(child).__name__ == "Conv1D" and child.weight.dim() == 2:
                    w = child.weight
                    found.append((parent, attr, child, int(w.shape[0]), int(w.shape[1])))
    return found


def apply(model: "torch.nn.Module", profile: "Profile") -> str | None:
    device = next(model.parameters()).device
    dtype = compute_dtype(profile)
    missing = quant_missing()
    if device.type != "meta":
        if missing:
            raise BadInput(f"cannot run {profile.quant} base weights here: {missing} (the estimate "
                           f"still works)")
        count = quantize_linears(model, profile.quant, dtype)
    else:
        layers = _linears(model)
        for parent, attr, old, fan_in, fan_out in layers:
            if missing:
                new = _StandIn(profile.quant, fan_in, fan_out, old.bias, dtype)
            else:
                new = _meta_bnb(profile.quant, fan_in, fan_out, old.bias, dtype)
                _register_state(new)
            setattr(parent, attr, new)
        count = len(layers)
    return f"{profile.quant} base weights: {count} Linear layers quantized (compute {profile.quant_dtype})"


def _bias_param(bias, device):
    import torch

    if bias is None:
        return None
    return torch.nn.Parameter(bias.detach().to(device), requires_grad=False)


def _meta_bnb(quant, fan_in, fan_out, bias, dtype):
    """bitsandbytes' layer with packed meta tensors of the shapes quantization gives."""
    import bitsandbytes as bnb
    import torch
    from bitsandbytes.functional import QuantState

    def meta(*shape, d=torch.float32):
        return torch.empty(*shape, dtype=d, device="meta")

    n = fan_in * fan_out
    if quant == "int8":
        new = bnb.nn.Linear8bitLt(fan_in, fan_out, bias=bias is not None, has_fp16_weights=False,
                                  device="meta")
        w = bnb.nn.Int8Params(meta(fan_out, fan_in, d=torch.int8), requires_grad=False,
                              has_fp16_weights=False)
        w.CB, w.SCB = w.data, meta(fan_out)
        new.weight = w
    else:
        dq = quant == "nf4-dq"
        new = bnb.nn.Linear4bit(fan_in, fan_out, bias=bias is not None, compute_dtype=dtype,
                                compress_statistics=dq, quant_type="nf4", device="meta")
        blocks = -(-n // BLOCK)
        state2 = QuantState(absmax=meta(-(-blocks // BLOCK2)), code=meta(256), blocksize=BLOCK2,
                            dtype=torch.float32) if dq else None
        qs = QuantState(absmax=meta(blocks, d=torch.uint8 if dq else torch.float32),
                        shape=torch.Size([fan_out, fan_in]), code=meta(16), blocksize=BLOCK,
                        quant_type="nf4", dtype=dtype, offset=meta(()) if dq else None, state2=state2)
        new.weight = bnb.nn.Params4bit(meta((n + 1) // 2, 1, d=torch.uint8), requires_grad=False,
                                       quant_state=qs, blocksize=BLOCK, compress_statistics=dq,
                                       quant_type="nf4", bnb_quantized=True, module=new)
    if bias is not None:
        new.bias = _bias_param(bias, "meta")
    return new


def _register_state(module) -> None:
    """The quantization state as non-persistent buffers: weights to every counter."""
    w = module.weight
    qs = getattr(w, "quant_state", None)
    tensors = {}
    if qs is not None:
        tensors = {"absmax": qs.absmax, "code": qs.code, "offset": qs.offset}
        if qs.state2 is not None:
            tensors.update({"absmax2": qs.state2.absmax, "code2": qs.state2.code})
    elif getattr(w, "SCB", None) is not None:
        tensors = {"scb": w.SCB}
    for name, t in tensors.items():
        if t is not None:
            module.register_buffer(f"quant_{name}", t, persistent=False)


def _state_shapes(quant: str, fan_in: int, fan_out: int) -> tuple[int, int]:
    """(packed weight bytes, quantization state bytes) of one layer."""
    n = fan_in * fan_out
    if quant == "int8":
        return n, 4 * fan_out
    blocks = -(-n // BLOCK)
    if quant == "nf4-dq":
        return (n + 1) // 2, blocks + 4 * -(-blocks // BLOCK2) + 256 * 4 + 16 * 4 + 4
    return (n + 1) // 2, 4 * blocks + 16 * 4


class _Dequantized:
    """The stand-in's matmul: a dequantized weight temporary in forward and again in backward."""

    @staticmethod
    def function():
        import torch

        class Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, packed, fan_out, fan_in, dtype):
                w = torch.empty(fan_out, fan_in, dtype=dtype, device=x.device)  # dequantized
                ctx.shape = (fan_out, fan_in, dtype)
                return x.to(dtype) @ w.t()

            @staticmethod
            def backward(ctx, grad):
                fan_out, fan_in, dtype = ctx.shape
                w = torch.empty(fan_out, fan_in, dtype=dtype, device=grad.device)
                return grad.to(dtype) @ w, None, None, None, None

        return Fn


def _StandIn(quant, fan_in, fan_out, bias, dtype):
    """Without bitsandbytes (meta only): a layer of the same packed shapes and temporaries."""
    import torch

    class StandIn(torch.nn.Linear):  # a Linear to peft, which wraps it with its adapter
        def __init__(self):
            torch.nn.Module.__init__(self)
            packed, state = _state_shapes(quant, fan_in, fan_out)
            self.in_features, self.out_features = fan_in, fan_out
            self.weight = torch.nn.Parameter(torch.empty(packed, 1, dtype=torch.uint8, device="meta"),
                                             requires_grad=False)
            self.register_buffer("quant_state", torch.empty(state, dtype=torch.uint8, device="meta"),
                                 persistent=False)
            self.bias = _bias_param(bias, "meta")
            self.fn = _Dequantized.function()

        def forward(self, x):
            y = self.fn.apply(x, self.weight, fan_out, fan_in, dtype)
            if self.bias is not None:
                y = y + self.bias.to(dtype)
            return y.to(x.dtype)

    return StandIn()


def _analytic_terms(profile, arch, b, t, padded, cuda) -> AnalyticTerms:
    """One layer's dequantized weight, alive during its forward and again during its backward."""
    from engine.estimate.analytic import _r

    e = 2
    largest = max((i * o for i, o in arch.quantized_linears), default=0)
    return AnalyticTerms(layer_transient=_r(largest * e, cuda))


TECHNIQUE = Technique(
    name="quantization",
    title="Fine-tuning method",
    order=5.5,
    group="finetune",
    fields=(
        Field("quant", str, "none", "base weights: none | nf4 | nf4-dq (double quant) | int8 "
              "(bitsandbytes; train with --lora)", choices=QUANTS, after="lora_modules_to_save",
              label="quantized base weights"),
        Field("quant_dtype", str, "bf16", "compute dtype of the quantized layers: bf16 | fp16",
              choices=COMPUTE_DTYPES, label="quantized compute dtype"),
    ),
    explanations={"quantization": EXPLANATION},
    summary_title=lambda p: f"Base weights: {p.quant} (compute {p.quant_dtype})",
    active=applies,
    validate=_validate,
    apply_model=apply,
    apply_rank=34,  # before LoRA wraps the (quantized) Linear layers
    analytic_terms=_analytic_terms,
    export_source=lambda: [quantize_linears],
    export_calls=lambda p: ["quantize_linears(model, QUANT, getattr(torch, QUANT_DTYPE))"],
    export_constants=lambda p: [("QUANT", p.quant, "base weights: bitsandbytes NF4 (dq: double quant) / int8"),
                                ("QUANT_DTYPE", {"bf16": "bfloat16", "fp16": "float16"}[p.quant_dtype],
                                 "compute dtype of the quantized layers")],
)
