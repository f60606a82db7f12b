"""Analytic estimator: peak memory from formulas over the model's shapes and the profile, in ms.

What it counts, for a batch of E = B x T tokens (micro-batch rows when accumulating):

* **weights, gradients, optimizer states** from the built meta model's real parameter tensors
  (pruned / GeGLU shapes included), each rounded to the allocator's 512-byte blocks on CUDA.
  AdamW keeps 2 states per parameter in the parameter's dtype (``torch/optim/adamw.py``, lazily
  created at step 1); SGD (momentum 0, torch's default) keeps none. On CUDA torch defaults to
  ``foreach=True``: ``_multi_tensor_adam`` allocates ``exp_avg_sq_sqrt = _foreach_sqrt(exp_avg_sqs)``,
  one parameter-group's worth, during the step; on CPU the for-loop allocates one tensor's worth.
* **activations saved for backward per layer**, itemised tensor by tensor for each family
  (after Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models", Sec. 4.1, whose 34·s·b·h + 5·a·s²·b per-layer count this generalises to other
  precisions, GQA, gated MLPs, RMSNorm/LayerNorm and fused attention):
  Llama/Qwen2-style decoders (RMSNorm upcast to fp32, q/k/v/o, RoPE outputs, SwiGLU g/u/silu/product),
  GPT-2 (pre-LN, fused c_attn, gelu_new's five saved intermediates, 1-byte dropout masks), BERT
  (post-LN encoder, GELU, dropout masks). Under autocast each linear saves its own low-precision
  copy of its input (autocast casts per call; only leaf weights are cached). Attention: fused SDPA
  (flash / memory-efficient: output + fp32 logsumexp, no T x T; a padded batch's additive mask is
  converted per layer and kept; fp32 grouped-query attention without a mask runs the math path on
  CUDA, which keeps the T x T probabilities), or eager (fp32 softmax probabilities, their low-precision copy,
  dropout mask and output: O(a·T²) per layer).
* **logits and loss temporaries**: ``ForCausalLMLoss`` / ``ForMaskedLMLoss``
  (``transformers/loss/loss_utils.py``) upcast logits (``logits.float()``), cross entropy saves its
  fp32 log-softmax; backward holds that, the nll gradient and the log-softmax gradient
  (3 x 4·E·V bytes) — often the peak for big vocabularies.
* **autocast weight copies**: low-precision copies of the weights, cached for the forward.
* **gradient checkpointing** (every k-th layer): a checkpointed layer keeps its input only; its
  activations come back during its backward.
* the **step structure**: step 1's optimizer step (weights + grads + new states + foreach temp) vs
  step 2's forward/backward (weights + states + activations + gradients growing layer by layer);
  gradient accumulation keeps gradients through later micro-batches.
* library workspaces allocated through the caching allocator (``device.py``).

Known limitations: unusual architectures are mapped to the nearest family; per-op transients
inside a layer's backward are approximated by two MLP-intermediate tensors plus the attention
kernel's workspace; reserved memory replays these sizes in the protocol's order through the
allocator model (``analytic_stream``; the closed form ``reserved_from_sizes`` with expandable
segments, a pre-reserved pool, max_split, micro-batches, sharding or a technique's extra terms,
and for searches: ``reserved_model="sizes"``), coarser than the traced estimator's replay of the
real operators; local attention is modelled as flash-like on CUDA and
as blocked O(T·2W) on CPU; transformers versions before 4.48 copied shifted logits (not counted).
"""

from __future__ import annotations

import functools
from collections import Counter
import math
from dataclasses import dataclass

from engine.estimate import device as dev
from engine.estimate.allocator import reserved_from_sizes, round_size
from engine.profile import Profile
from engine.results import MemoryCategory as C

def _arch_fields() -> tuple[str, ...]:
    """Fields that shape the built model: the run's own, and every model technique's."""
    from engine import techniques

    own = ("model", "trust_remote_code", "mode", "task", "precision")
    return own + tuple(f.name for t in techniques.model_techniques() for f in t.fields)


#: Keys of ``layer_activations`` for the parts outside the transformer blocks.
EMBEDDINGS_ROW, HEAD_ROW, LOGITS_ROW = "embeddings", "final norm + LM head", "logits + loss"


@dataclass(frozen=True)
class Arch:
    family: str  # llama | gpt2 | phi | bert
    task: str  # causal-lm | masked-lm | classification
    layers: int  # transformer blocks
    hidden: int  # model width h
    heads: int  # query heads a (after pruning)
    kv_heads: int  # key/value heads
    head_dim: int  # d
    ffn: int  # MLP intermediate width f (after pruning; GeGLU's gate width)
    gated: bool  # gated MLP (SwiGLU / GeGLU)
    act: str  # silu | gelu | gelu_new
    vocab: int  # V (classification: labels)
    attn_dropout: float  # attention probability dropout
    resid_dropout: float  # hidden dropout
    params: int  # unique parameters
    param_tensors: tuple[tuple[int, int], ...]  # (numel, element bytes) per parameter tensor
    buffer_bytes: int  # buffers (rotary tables, position ids)
    layer_params: tuple[int, ...]  # parameters per block
    layer_names: tuple[str, ...]  # module path of each block
    largest_param: int  # numel of the largest parameter tensor (embedding)
    head_params: int = 0  # unique parameters registered after the blocks (final norm, untied head)
    trainable_tensors: tuple[tuple[tuple[int, ...], int], ...] = ()  # (shape, element bytes) of
    #                                                the parameters that train (LoRA: the adapters)
    layer_trainable_bytes: tuple[int, ...] = ()  # bytes of the trainable parameters per block
    lora_linears: tuple[tuple[int, int], ...] = ()  # (in, out) of the first block's LoRA-adapted layers
    quantized_linears: tuple[tuple[int, int], ...] = ()  # (in, out) of its quantized Linear layers

    @property
    def trainable_params(self) -> int:
        import math

        return sum(math.prod(s) for s, _ in self.trainable_tensors)
    proj_dim: int = 0  # OPT's word_embed_proj_dim when it differs from hidden (project_in/out)
    matmul_tensors: tuple[tuple[int, int], ...] = ()  # (numel, bytes) of linear layers' params
    qk_norm: bool = False  # RMSNorm on q and k per head (Qwen3, Gemma-3, OLMo-2)
    lora_names: tuple[str, ...] = ()  # paths inside the first block of its LoRA-adapted layers
    block_norms: int = 2  # norms on the residual path per block (Gemma's sandwich: 4)
    #: leaf modules of the first block by kind (linear, rmsnorm, layernorm, dropout, other) and
    #: whether positions are rotary: what the speed estimate's host-op count is made of
    block_modules: tuple[tuple[str, int], ...] = ()
    rotary: bool = False
    tied_head_bytes: int = 0  # a head tied to the embeddings: its own weight, made and dropped at build


def module_kind(module) -> str:
    """A leaf module's kind for the host-op count: each kind issues a typical number of ops."""
    name = type(module).__name__
    if name in ("Linear", "Conv1D") or hasattr(module, "in_features"):
        return "linear"
    if "RMSNorm" in name:
        return "rmsnorm"
    if "LayerNorm" in name or "GroupNorm" in name:
        return "layernorm"
    if "Dropout" in name:
        return "dropout"
    if name == "Identity":
        return "identity"
    return "other"


def _family(model_type: str, config) -> str:
    if model_type == "phi":  # parallel attention + MLP under one LayerNorm (modeling_phi.py)
        return "phi"
    if model_type == "modernbert":  # pre-LN encoder, fused Wqkv, GLU MLP (modeling_modernbert.py)
        return "modernbert"
    if model_type in ("gpt2", "gpt_neo", "gptj", "gpt_bigcode", "opt", "bloom", "gpt_neox"):
        return "gpt2"
    if model_type in ("bert", "roberta", "distilbert", "electra", "xlm-roberta", "deberta",
                      "deberta-v2", "albert", "camembert", "mpnet"):
        return "bert"
    if hasattr(config, "num_key_value_heads") or hasattr(config, "rms_norm_eps"):
        return "llama"
    from engine.models import family

    return "bert" if family(config) == "encoder" else "gpt2"


@functools.lru_cache(maxsize=32)
def _arch(key: tuple) -> Arch:
    import torch

    from engine.models import build_model, count_parameters, find_layers, resolve_task

    profile = Profile(**dict(key))
    model = build_model(profile, "meta")
    config = model.config
    task = resolve_task(profile, config)
    fam = _family(config.model_type, config)
    path, layers = find_layers(model)
    h = int(getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
            or config.dim)
    a_cfg = int(getattr(config, "num_attention_heads", None) or config.n_head)
    d = int(getattr(config, "head_dim", None) or h // a_cfg)
    kv_cfg = int(getattr(config, "num_key_value_heads", None) or a_cfg)
    # Shapes of the first block's projections (pruning changes them).
    q_out = kv_out = ffn = None
    gated = False
    for name, mod in layers[0].named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            continue
        conv1d = type(mod).__name__ == "Conv1D"
        # a quantized layer's weight is packed: its module knows the real width
        out_f = getattr(mod, "out_features", None) or (w.shape[1] if conv1d else w.shape[0])
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("q_proj", "query", "q_lin"):
            q_out = out_f
        elif leaf in ("k_proj", "key", "k_lin"):
            kv_out = out_f
        elif leaf == "c_attn":
            q_out = out_f // 3
            kv_out = out_f // 3
        elif leaf in ("gate_proj", "w1", "wi_0"):
            gated = True
            ffn = out_f
        elif leaf in ("up_proj", "c_fc", "fc1", "w3", "lin1") or name.endswith("intermediate.dense"):
            ffn = ffn or out_f
        elif "geglu" in name.lower() or "gate" in leaf:
            gated = True
    proj = int(getattr(config, "word_embed_proj_dim", None) or h)
    leaves = [n.rsplit(".", 1)[-1] for n, _m in layers[0].named_modules() if n]
    qk_norm = "q_norm" in leaves and "k_norm" in leaves
    block_norms = sum(1 for n in leaves if "norm" in n.lower() and n not in ("q_norm", "k_norm"))
    heads = max(1, (q_out or a_cfg * d) // d)
    kv = max(1, (kv_out or kv_cfg * d) // d)
    ffn = int(ffn or getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
              or 4 * h)
    geglu = bool(getattr(config, "headroom_geglu_hidden", None))  # set by GeGLU's apply_model
    if geglu:
        gated = True
    act = str(getattr(config, "hidden_act", None) or getattr(config, "activation_function", "gelu"))
    if fam == "modernbert":
        act = str(getattr(config, "hidden_activation", "gelu"))
        gated = True
    if "silu" in act or "swish" in act:
        act = "silu"
    elif act == "relu":
        act = "relu"
    elif act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        act = "gelu_new" if act == "gelu_new" else "gelu"
    else:
        act = "gelu"
    if geglu:
        act = "gelu"
    attn_drop = float(getattr(config, "attention_dropout", None) or getattr(config, "attn_pdrop", 0.0)
                      or getattr(config, "attention_probs_dropout_prob", 0.0) or 0.0)
    resid_drop = float(getattr(config, "resid_pdrop", None) or getattr(config, "hidden_dropout_prob", 0.0)
                       or getattr(config, "hidden_dropout", 0.0) or 0.0)
    vocab = 2 if task == "classification" else int(getattr(config, "vocab_size", 0))
    seen: set[int] = set()
    tensors = []
    trainable = []
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        tensors.append((p.numel(), p.element_size()))
        if p.requires_grad:
            trainable.append((tuple(p.shape), p.element_size()))
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    layer_params = tuple(sum(p.numel() for p in blk.parameters()) for blk in layers)
    lora_linears, quantized, lora_names = [], [], []
    for mod_name, mod in layers[0].named_modules():
        lora_a = getattr(mod, "lora_A", None)
        if lora_a is not None and "default" in lora_a:
            lora_names.append(mod_name)
            lora_linears.append((int(lora_a["default"].in_features),
                                 int(mod.lora_B["default"].out_features)))
        elif hasattr(mod, "quant_absmax") or hasattr(mod, "quant_scb") or hasattr(mod, "quant_state"):
            quantized.append((int(mod.in_features), int(mod.out_features)))
    layer_trainable = tuple(sum(p.numel() * p.element_size() for p in blk.parameters()
                                if p.requires_grad) for blk in layers)
    # parameters after the blocks in registration order: final norm, an untied LM head, a
    # classifier; a head tied to the embeddings is the embedding's tensor (counted there)
    in_blocks = {id(p) for p in layers.parameters()}
    head_params, after = 0, False
    for p in model.parameters():  # unique, in registration order
        if id(p) in in_blocks:
            after = True
        elif after:
            head_params += p.numel()
    # Autocast casts what F.linear is given (weight and bias), not embeddings or norms; a head
    # tied to the embeddings is a linear's weight and is cast once (the cast is cached).
    matmul, seen_mm = [], set()
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D":
            for p in mod.parameters(recurse=False):
                if id(p) not in seen_mm:
                    seen_mm.add(id(p))
                    matmul.append((p.numel(), p.element_size()))
    kinds = Counter(module_kind(m) for m in layers[0].modules() if not list(m.children()))
    kinds.pop("identity", None)
    rotary = any("rotary" in n.lower() for n, _m in model.named_modules())
    tied_head_bytes = 0
    try:
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
        if out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight:
            tied_head_bytes = out_emb.weight.numel() * out_emb.weight.element_size()
    except (AttributeError, NotImplementedError):
        pass
    return Arch(family=fam, task=task, layers=len(layers), hidden=h, heads=heads, kv_heads=kv,
                head_dim=d, ffn=ffn, gated=gated, act=act, vocab=vocab, attn_dropout=attn_drop,
                resid_dropout=resid_drop, params=count_parameters(model),
                param_tensors=tuple(tensors), buffer_bytes=buffers, layer_params=layer_params,
                layer_names=tuple(f"{path}.{i}" for i in range(len(layers))),
                largest_param=max(n for n, _ in tensors), head_params=head_params,
                trainable_tensors=tuple(trainable), layer_trainable_bytes=layer_trainable,
                lora_linears=tuple(lora_linears), quantized_linears=tuple(quantized),
                lora_names=tuple(lora_names),
                matmul_tensors=tuple(matmul), qk_norm=qk_norm, block_norms=block_norms or 2,
                proj_dim=proj if proj != h else 0, block_modules=tuple(sorted(kinds.items())),
                rotary=rotary, tied_head_bytes=tied_head_bytes)


def arch_of(profile: Profile) -> Arch:
    """The shapes of the profile's built (technique-modified) model, cached per architecture."""
    return _arch(tuple((f, getattr(profile, f)) for f in _arch_fields()))


def _r(n: float, cuda: bool) -> int:
    n = int(n)
    return round_size(n) if (cuda and n > 0) else n


@dataclass
class LayerCost:
    saved: list[int]  # tensors saved for backward (bytes, each)
    fwd_transient: int  # extra bytes alive inside the layer's forward (beyond saved)
    bwd_transient: int  # extra bytes alive inside the layer's backward


def _attention(arch: Arch, b: int, t: int, e: int, cuda: bool, attn: str, padded: bool,
               training: bool, window: int, half: bool) -> tuple[list[int], int, int]:
    """Saved tensors, forward transient and backward workspace of one attention call."""
    a, k, d = arch.heads, arch.kv_heads, arch.head_dim
    E = b * t
    drop = arch.attn_dropout if training else 0.0
    saved: list[int] = []
    eager = attn == "eager" or (not cuda and drop > 0)  # CPU SDPA with dropout -> math
    # repeat_kv copies: with a mask, on the eager path, or (transformers' use_gqa_in_sdpa) a head
    # dim over 256, where flash is not eligible either
    kv_rep = k != a and (padded or eager or d > 256)
    if kv_rep:
        saved += [E * a * d * e, E * a * d * e]  # expanded k, v
    if window and cuda:
        eager = False
    if eager:
        s = window * 2 if window else t
        probs = b * a * t * s
        fwd = probs * e * 2  # scores and scaled/masked scores
        saved.append(probs * 4)  # fp32 softmax output (upcast on CUDA autocast / fp32)
        if e != 4:
            saved.append(probs * e)  # cast back to the value dtype
        if drop > 0:
            saved += [probs * 1 if cuda else probs * e, probs * e]  # mask, dropped probs
        saved.append(E * a * d * e)  # attention output (b, T, a, d)
        bwd = probs * 4 * 2
        return saved, fwd, bwd
    # fused kernels
    flash = cuda and half and not padded and d <= 256  # sdp_utils.cpp: flash head dim <= 256
    if cuda and not flash and k != a and not kv_rep and not window:
        # transformers passes enable_gqa (no repeat_kv) when there is no mask, but CUDA's
        # efficient kernel rejects grouped-query heads: the math path runs (sdp_utils.cpp,
        # attention.cpp: _scaled_dot_product_attention_math). It saves the scaled q, the
        # scaled repeated k, the repeated v and the T x T probabilities.
        probs = b * a * t * t
        saved += [E * a * d * e, E * a * d * e, E * a * d * e, probs * e]
        fwd = probs * e + t * t * (1 + e)  # scores before softmax, causal mask (bool + float)
        bwd = 2 * probs * e + 2 * E * a * d * e  # grad of probs and of scores; dk/dv repeated
        return saved, fwd, bwd
    saved.append(E * a * d * e)  # output
    saved.append(b * a * (t if flash else -(-t // 32) * 32) * 4)  # logsumexp
    if not cuda:
        saved[-1] = b * a * t * 4
    if padded and cuda:  # additive mask in q dtype, columns padded to 16, per layer
        saved.append(b * t * (-(-t // 16) * 16) * e)
    elif padded:
        saved.append(b * t * t * e)
    if flash:
        t128 = -(-t // 128) * 128
        dr = -(-d // 32) * 32
        bwd = b * t128 * a * dr * 4 + b * a * t128 * 4
    elif cuda and half:
        bwd = E * a * d * 4
    else:
        bwd = 0
    if k != a and not kv_rep:
        bwd += 2 * E * a * d * e  # expanded dk/dv before the group sum
    return saved, 0, bwd


def layer_cost(arch: Arch, b: int, t: int, precision: str, cuda: bool, attn: str, padded: bool,
               training: bool, window: int = 0, lora_dropout: float = 0.0) -> LayerCost:
    """Bytes one transformer block saves for backward (train) and its transients."""
    amp = precision in ("bf16-amp", "fp16-amp")
    half = precision != "fp32"
    e = 2 if half else 4  # compute dtype bytes
    r = 2 if precision in ("bf16", "fp16") else 4  # residual stream bytes
    E = b * t
    h, f = arch.hidden, arch.ffn
    a, k, d = arch.heads, arch.kv_heads, arch.head_dim
    hq, hk = a * d, k * d
    drop = arch.resid_dropout if training else 0.0
    mask_b = 1 if cuda else r  # CUDA fused dropout saves a bool mask
    saved: list[int] = []

    def lin_in(n_linears: int, width: int = h, in_bytes: int = r) -> list[int]:
        # Autocast: every linear saves its own low-precision copy of a float32 input.
        if amp and in_bytes == 4:
            return [E * width * 2] * n_linears
        return [E * width * in_bytes]

    attn_saved, attn_fwd, attn_bwd = _attention(arch, b, t, e, cuda, attn, padded, training,
                                               window, half)
    # LoRA (llama and gpt2 families): the base weights are frozen, and y = x W^T needs only W for
    # grad_x, so a frozen Linear (or Conv1D) saves nothing of its input, nor a frozen norm weight
    # its normalised input. An adapted layer's lora_A saves its input for A's weight gradient:
    # the one shared tensor once, under autocast each adapter's own bf16 cast, and with dropout
    # each adapter's dropout output and mask instead (engine/techniques/lora.py counts those and
    # lora_B's saved A output).
    # Checked against the traced estimate for fp32 and autocast only: a half-precision base with
    # fp32 adapters promotes the adapted outputs to fp32, and a quantized base has its own saved
    # tensors, so those keep the full fine-tuning layer model (which over-counts them).
    frozen = training and bool(arch.lora_names) and arch.family in ("llama", "gpt2") \
        and precision in ("fp32", "bf16-amp", "fp16-amp") and not arch.quantized_linears

    def adapted(*suffixes: str) -> int:
        return sum(1 for n in arch.lora_names for s in suffixes if n == s or n.endswith("." + s))

    def adapter_in(n_adapted: int, width: int = h, in_bytes: int = r) -> list[int]:
        return lin_in(n_adapted, width, in_bytes) if n_adapted and not lora_dropout else []

    if arch.family == "llama" and frozen:
        # pow and the rsqrt product save the fp32 input (or its fp32 upcast), nothing else
        saved += [E * h * 4] + adapter_in(adapted("q_proj", "k_proj", "v_proj"))
        saved.append(E * hq * e)
        if not (k != a and (padded or attn == "eager" or d > 256
                            or (not cuda and arch.attn_dropout and training))):
            saved += [E * hk * e, E * hk * e]
        if arch.qk_norm:  # per-head RMSNorm: its fp32 input (or upcast) only, as above
            saved.append((E * hq + E * hk) * 4)
        saved += attn_saved
        saved += [E * h * 4] + adapter_in(adapted("gate_proj", "up_proj"), width=h)
        saved += [E * h * 4] * max(0, arch.block_norms - 2)
        # gate, up, act(gate) (the product's operands); the product only for an adapted down_proj
        saved += [E * f * e] * (3 if arch.gated else 1) + adapter_in(adapted("down_proj"), f, e)
    elif arch.family == "gpt2" and frozen:
        saved += [E * h * r] + adapter_in(adapted("c_attn"))  # ln_1 input (LayerNorm saves it)
        saved.append(E * 3 * h * e)
        saved += attn_saved
        if drop:
            saved.append(E * h * mask_b)
        saved += [E * h * r] + adapter_in(adapted("mlp.c_fc"))
        fc2_in = adapter_in(adapted("mlp.c_proj"), f, e)
        if arch.gated:
            saved += [E * f * e] * 3 + fc2_in
        elif arch.act == "gelu_new":  # its five intermediates, the last one being fc2's input
            per = {4: 20, 2: 10}[e] if not amp else 18
            saved.append(E * f * (per - e))
            saved += fc2_in
        elif arch.act == "relu":  # ReLU's output is fc2's input and ReLU saves it
            saved.append(E * f * e)
        else:
            saved += [E * f * e] + fc2_in
        if drop:
            saved.append(E * h * mask_b)
    elif arch.family == "llama":
        def rms() -> list[int]:
            # fp32 (and autocast's fp32 residual): pow and mul save the input, the weight's mul
            # the normalised fp32. Pure half weights: the fp32 upcast (pow and mul's input) and
            # the cast back (the weight's mul); the half input and the normalised fp32 are not
            # saved (LlamaRMSNorm: traced and H200 rows, smollm-360m-like bf16 8x512 +13.6%).
            # Gemma's norm (the sandwich-norm family) scales in fp32 and casts back after: the
            # upcast and the normalised fp32 (Gemma-3-like bf16 8x512: -3.6% with the cast back)
            return [E * h * 4, E * h * (4 if arch.block_norms > 2 else r)]
        saved += rms() + lin_in(3)
        saved.append(E * hq * e)  # q (RoPE)
        if not (k != a and (padded or attn == "eager" or d > 256
                            or (not cuda and arch.attn_dropout and training))):
            saved += [E * hk * e, E * hk * e]  # k (RoPE), v; repeat_kv's copies are saved instead
        if arch.qk_norm:
            # per-head RMSNorm of q and k: its fp32 input and normalized output (fp32), or under
            # autocast the fp32 upcast and the cast back (modeling_qwen3.py: Qwen3RMSNorm)
            saved.append((E * hq + E * hk) * (6 if e == 2 else 8))
        saved += attn_saved
        saved += rms() + lin_in(2)
        for _ in range(max(0, arch.block_norms - 2)):  # Gemma: norms after attention and MLP
            saved += rms()
        n_mlp = 4 if arch.gated else 2
        saved += [E * f * e] * n_mlp  # gate, up, act(gate), product
    elif arch.family == "phi":
        # one LayerNorm feeds q, k, v and fc1 (parallel block); partial RoPE's cat makes new q, k
        saved += [E * h * r] + lin_in(4)  # LN input, the q/k/v/fc1 input
        saved += [E * hq * e, E * hk * e, E * hk * e]  # q, k (rotated, concatenated), v
        saved += attn_saved  # the output is the dense layer's input
        if arch.act == "gelu_new":
            saved.append(E * f * ({4: 20, 2: 10}[e] if not amp else 18))  # fc1 out, gelu_new, fc2 in
        else:
            saved += [E * f * e, E * f * e]
        if drop:
            saved += [E * h * mask_b] * 2
    elif arch.family == "gpt2":
        saved += [E * h * r] + lin_in(1)  # ln_1 input, c_attn input
        saved.append(E * 3 * h * e)  # c_attn output (q, k, v views)
        saved += attn_saved
        if drop:
            saved.append(E * h * mask_b)
        saved += [E * h * r] + lin_in(1)  # ln_2 input, c_fc input
        if arch.gated:
            saved += [E * f * e] * 4
        elif arch.act == "gelu_new":
            per = {4: 20, 2: 10}[e] if not amp else 18  # pow/tanh/0.5x/(1+tanh)/product
            saved.append(E * f * per)
        elif arch.act == "relu":  # ReLU saves its output, which is fc2's input (OPT)
            saved.append(E * f * e)
        else:
            saved += [E * f * e, E * f * e]
        if drop:
            saved.append(E * h * mask_b)
    elif arch.family == "modernbert":
        # attn_norm (LayerNorm) input and output (Wqkv's input); Wqkv's output stays alive whole
        # (v is a view of it); RoPE makes new q and k; Wo's input is the attention output
        saved += [E * h * r] + lin_in(1)
        saved.append(E * (hq + 2 * hk) * e)
        saved += [E * hq * e, E * hk * e]
        saved += attn_saved
        saved += [E * h * r] + lin_in(1)  # mlp_norm input, Wi's input
        saved += [E * 2 * f * e, E * f * e, E * f * e]  # Wi out (input, gate), act(input), Wo in
        if drop:
            saved += [E * h * mask_b] * 2
    else:  # bert: post-LN encoder
        saved += lin_in(3)  # q, k, v inputs
        saved += [E * h * e] * 3  # q, k, v
        saved += attn_saved
        if drop:
            saved.append(E * h * mask_b)
        saved += [E * h * r] + lin_in(1)  # LN1 input, intermediate input
        if arch.gated:
            saved += [E * f * e] * 4
        else:
            saved += [E * f * e, E * f * e]  # intermediate out, GELU out
        if drop:
            saved.append(E * h * mask_b)
        saved.append(E * h * r)  # LN2 input
    saved = [_r(x, cuda) for x in saved if x > 0]
    fwd_transient = _r(attn_fwd, cuda) + _r(E * f * e, cuda) + _r(E * h * 4, cuda)
    bwd_transient = _r(attn_bwd, cuda) + 2 * _r(E * f * e, cuda) + _r(E * h * 4, cuda)
    return LayerCost(saved=saved, fwd_transient=fwd_transient, bwd_transient=bwd_transient)


def _encoder_infer_live(arch: Arch, b: int, t: int, precision: str, cuda: bool,
                        padded: bool) -> int:
    """Bytes alive at the peak of a post-LN encoder block's no-grad forward (nothing is saved for
    backward, so one layer's saved tensors overcount it: +20% on bert-base classification).
    The peak is in the MLP: the block's input, the attention block's output and one more
    residual-width tensor, the intermediate and its GELU (an autocast copy of an fp32 input
    beside them), and the boolean (B, 1, T, T) mask SDPA is given for a padded batch. Counted
    from the traced forward of bert-base (fp32 8x512, bf16-amp 16x512)."""
    amp = precision in ("bf16-amp", "fp16-amp")
    e = 2 if precision != "fp32" else 4
    r = 2 if precision in ("bf16", "fp16") else 4
    E = b * t
    live = [E * arch.hidden * r] * 3 + [E * arch.ffn * e] * 2
    if amp and r == 4:
        live.append(E * arch.hidden * 2)
    if padded:
        live.append(b * t * t)
    return sum(_r(x, cuda) for x in live)


@dataclass
class AnalyticOutcome:
    peak_allocated: int
    peak_reserved: int
    breakdown: dict[str, int]
    peak_phase: str
    layer_activations: dict[str, int]
    params: int
    notes: list[str]
    extra_layers: int = 0  # blocks of the techniques' extra models (a distillation teacher)
    extra_rows: tuple = ()  # their per-layer table rows: (name, params, weight bytes)
    trainable_params: int = 0  # parameters with gradients and optimizer state
    optimizer_state_bytes: int = 0  # the optimizer's state after its first step


def _embedding_saved(arch: Arch, E: int, r: int, cuda: bool, training: bool) -> list[int]:
    """Bytes the embeddings save for backward (unrounded): the sum of token/position embeddings,
    the dropout mask, (bert) the LayerNorm input. ``E`` tokens, ``r`` bytes per hidden element."""
    h = arch.hidden
    saved = []
    if arch.family == "gpt2" and arch.resid_dropout and training:
        saved.append(E * h * (1 if cuda else r))
    if arch.proj_dim:  # OPT: project_in's input
        saved.append(E * arch.proj_dim * r)
    if arch.family in ("bert", "modernbert"):
        saved.append(E * h * r)
        if arch.resid_dropout and training:
            saved.append(E * h * (1 if cuda else r))
    return saved


def _head_costs(arch: Arch, b: int, t: int, precision: str, cuda: bool, training: bool):
    """(saved for backward, forward transient at the loss, backward transient at the loss), the
    two transients as lists of tensor bytes (the reserved stream allocates them one by one)."""
    amp = precision in ("bf16-amp", "fp16-amp")
    half = precision != "fp32"
    e = 2 if half else 4
    r = 2 if precision in ("bf16", "fp16") else 4
    E = b * t
    h, V = arch.hidden, arch.vocab
    saved = _embedding_saved(arch, E, r, cuda, training)
    # final norm + lm_head input
    if arch.proj_dim:  # OPT-350m: no final norm; project_out's input, the LM head's input
        saved += [E * h * (2 if amp else r), E * arch.proj_dim * (2 if amp else r)]
    elif arch.family in ("llama", "gpt2", "phi"):
        saved += [E * h * r, E * h * 4] if arch.family == "llama" else [E * h * r]
        saved.append(E * h * (2 if amp else r))
    if arch.task == "masked-lm" and arch.family in ("bert", "modernbert"):
        saved += [E * h * (2 if amp else r), E * h * e, E * h * e, E * h * 4, E * h * (2 if amp else r)]
    if arch.task == "classification":
        logits = _r(b * V * 4, cuda)
        return [_r(x, cuda) for x in saved], [logits] * 3, [logits] * 3
    logits_e = e if (amp or half) else 4
    x1 = _r(E * V * logits_e, cuda)
    x32 = _r(E * V * 4, cuda)
    if not training:
        return [_r(x, cuda) for x in saved], [x1], []
    if arch.family == "bert" and not amp:
        # BertForMaskedLM calls CrossEntropyLoss on the logits directly: no upcast outside
        # autocast (ModernBERT's loss_function, ForMaskedLMLoss, upcasts: the branch below)
        fwd = [x1, x1]
        bwd = [x1] * 3  # saved log-softmax, nll grad, log-softmax grad
    elif arch.family == "bert" and cuda:
        # BertForMaskedLM's CrossEntropyLoss on half logits under CUDA autocast: a half
        # log-softmax and nll_loss's fp32 copy of it, kept for backward; at the backward's peak
        # those and the fp32 nll gradient (cuda_emulation._cross_entropy, measured on an H200)
        fwd = [x1, x1, x32]
        bwd = [x1, x32, x32]
    else:
        fwd = [x1] + ([x32] if logits_e != 4 else []) + [x32]  # logits, fp32 upcast, log-softmax
        bwd = [x32] * 3  # saved log-softmax, nll grad, log-softmax grad
    saved = [_r(x, cuda) for x in saved]
    return saved, fwd, bwd


def _streamed_reserved(arch: Arch, training: bool, alloc_opts: dict, c, weights_list, grads_list,
                       state_list, *, inputs, cost, checkpointed, layer_in, head_saved, embed_saved,
                       loss_fwd, loss_bwd, amp, opt_temp, hidden, final_fp32) -> int:
    """Reserved bytes from the analytic sizes replayed in the protocol's order (analytic_stream)."""
    from engine.estimate import allocator, analytic_stream

    cuda = True
    copies = [_r(n * 2, cuda) for n, s in arch.matmul_tensors if s == 4] if amp else []
    per_layer = len(copies) // arch.layers if arch.layers else 0
    head_saved = list(head_saved[len(embed_saved):])
    co = analytic_stream.coalesce
    z = analytic_stream.StreamSizes(
        weights=co(list(weights_list) + ([_r(arch.buffer_bytes, cuda)] if arch.buffer_bytes else [])),
        build_dropped=[_r(arch.tied_head_bytes, cuda)] if arch.tied_head_bytes else [],
        inputs=inputs, workspace=c.cublas_workspace_bytes,
        workspaces=c.workspace_handles_train if training else c.workspace_handles_infer,
        layers=arch.layers, saved=co(cost.saved), layer_in=layer_in,
        checkpointed=checkpointed, fwd_transient=[cost.fwd_transient],
        bwd_transient=[cost.bwd_transient], embed_saved=embed_saved, head_saved=head_saved,
        loss_fwd=list(loss_fwd), loss_bwd=list(loss_bwd),
        layer_copies=co(copies[:per_layer]), head_copies=co(copies[per_layer * arch.layers:]))
    if not training:
        z.head_saved = [final_fp32] * 2  # the final norm's fp32 input and output
    else:
        layer_grads, embed_grads, head_grads = _grads_by_block(arch, grads_list)
        z.layer_grads = [co(g) for g in layer_grads]
        z.embed_grads, z.head_grads = co(embed_grads), co(head_grads)
        z.states = co([_r(x, cuda) for x in state_list])
        if opt_temp and opt_temp == sum(grads_list):
            z.opt_temp = co(grads_list)  # foreach: one temporary per parameter
        elif opt_temp:
            z.opt_temp = [opt_temp // 2, opt_temp - opt_temp // 2]
    key = (training, hidden, tuple(sorted(alloc_opts.items())), analytic_stream.key_of(z))
    hit = _STREAMED.get(key)
    if hit is None:
        events = analytic_stream.training_events(z) if training else \
            analytic_stream.inference_events(z, hidden)
        hit = _STREAMED[key] = allocator.simulate(events, **alloc_opts).peak_reserved
        if len(_STREAMED) > 256:
            _STREAMED.pop(next(iter(_STREAMED)))
    return hit


#: replayed reserved by stream (the replay costs 5-15 ms; the app re-estimates an unchanged
#: profile for its views, the planner its candidates)
_STREAMED: dict[tuple, int] = {}


def _grads_by_block(arch: Arch, grads_list: list[int]):
    """(per-block gradient lists, those before the blocks, those after) from the trainable
    tensors in module order and the blocks' trainable bytes."""
    raw = [math.prod(s) * e for s, e in arch.trainable_tensors]
    want = list(arch.layer_trainable_bytes)
    if not want or not any(want):
        return [[] for _ in range(arch.layers)], [], list(grads_list)
    for start in range(len(raw)):
        k, blocks, ok = start, [], True
        for w in want:
            j, acc = k, 0
            while j < len(raw) and acc < w:
                acc += raw[j]
                j += 1
            if acc != w:
                ok = False
                break
            blocks.append(list(grads_list[k:j]))
            k = j
        if ok:
            return blocks, list(grads_list[:start]), list(grads_list[k:])
    return [[] for _ in range(arch.layers)], [], list(grads_list)


def estimate_shape(profile: Profile, batch_shape: tuple[int, int], padded: bool = True,
                   reserved_model: str = "stream") -> AnalyticOutcome:
    """Peak memory of the measured protocol for one (B, T) batch shape. ``reserved_model``:
    "stream" replays the sizes in the protocol's order (``analytic_stream``), "sizes" is the
    closed form (every tensor in its own reused block, no order: fast, for searches)."""
    cuda = profile.target == "cuda"
    arch = arch_of(profile)
    training = profile.mode == "train"
    precision = profile.precision
    amp = precision in ("bf16-amp", "fp16-amp")
    B, T = batch_shape
    from engine import techniques

    # How the techniques run the batch: rows and tokens per pass (micro-batches, input windows),
    # passes per step, the attention kernel, checkpointed blocks, the allocator.
    setup = techniques.analytic_setup(profile, B, T)
    notes: list[str] = list(setup.notes)
    m, b, t = setup.passes, setup.rows, setup.tokens
    window, attn = setup.window, setup.attention
    every = setup.checkpoint_every  # 0: no checkpointing

    # ----- persistent state --------------------------------------------------------------
    weights_list = [_r(n * s, cuda) for n, s in arch.param_tensors]
    weights = sum(weights_list) + _r(arch.buffer_bytes, cuda)
    # What the techniques switched on add (a distillation teacher's weights, loss and forward).
    terms = [tech.analytic_terms(profile, arch, b, t, padded, cuda)
             for tech in techniques.active(profile) if tech.analytic_terms is not None]
    extra_weights = sum(x.weights for x in terms)
    # Gradients and optimizer state exist for trainable parameters only (frozen base weights under
    # LoRA have neither); engine.optimizers knows each optimizer's state.
    from engine import optimizers

    trainable = list(arch.trainable_tensors)
    grads_list = [_r(math.prod(s) * e, cuda) for s, e in trainable]
    grads = sum(grads_list) if training else 0
    states = 0
    opt_temp = 0
    state_list: list[int] = []
    if training and trainable:
        state_list = [x for s, e in trainable
                      for x in optimizers.tensor_states(profile.optimizer, s, e, cuda)]
        states = optimizers.state_bytes(profile.optimizer, trainable, cuda)
        opt_temp = optimizers.step_temporary_bytes(profile.optimizer, trainable, cuda)
        managed = optimizers.managed_bytes(profile.optimizer, trainable, cuda)
        if managed:
            notes.append(f"paged optimizer: {managed / 2**20:,.0f} MiB of 8-bit state in CUDA managed "
                         f"memory, outside torch's allocator (not in the peak; paged out when full)")
    inputs = 3 * _r(B * T * 8, cuda) if training else 2 * _r(B * t * 8, cuda)
    workspace = dev.workspace_bytes(profile.target, training, dev.kind_of(profile))
    autocast_copies = 0
    if amp:
        # bf16/fp16 copies of the linear layers' weights and biases, cached for the forward.
        autocast_copies = sum(_r(n * 2, cuda) for n, s in arch.matmul_tensors if s == 4)

    # ----- per layer ---------------------------------------------------------------------
    cost = layer_cost(arch, b, t, precision, cuda, attn, padded, training, window,
                      profile.lora_dropout if arch.lora_names else 0.0)
    # what the techniques add inside every block (LoRA's adapter tensors, a dequantized weight)
    cost.saved += [x.layer_saved for x in terms if x.layer_saved and training]
    cost.fwd_transient += sum(x.layer_transient for x in terms)
    cost.bwd_transient += sum(x.layer_transient for x in terms)
    full_layer = sum(cost.saved)
    ckpt = training and every > 0
    r_bytes = 2 if precision in ("bf16", "fp16") else 4
    layer_in = _r(b * t * arch.hidden * r_bytes, cuda)
    per_layer_saved = []
    for i in range(arch.layers):
        if ckpt and i % every == 0:
            per_layer_saved.append(layer_in)
        else:
            per_layer_saved.append(full_layer)
    head_saved, loss_fwd_parts, loss_bwd_parts = _head_costs(arch, b, t, precision, cuda, training)
    loss_fwd, loss_bwd = sum(loss_fwd_parts), sum(loss_bwd_parts)
    head_saved_b = sum(head_saved)
    acts = sum(per_layer_saved) + head_saved_b
    layer_acts = {name: per_layer_saved[i] for i, name in enumerate(arch.layer_names)} \
        if training else {}
    # the parts outside the blocks, so that the per-layer table adds up (LayerBytes rows)
    emb_saved = sum(_r(x, cuda) for x in _embedding_saved(arch, b * t, r_bytes, cuda, training))
    if training:
        layer_acts[EMBEDDINGS_ROW] = emb_saved
        layer_acts[HEAD_ROW] = head_saved_b - emb_saved

    # ----- phases ------------------------------------------------------------------------
    candidates: list[tuple[int, str, dict]] = []
    rank = None
    if training and profile.shard != "none":  # one data-parallel rank (engine.estimate.sharding)
        from engine.estimate import sharding

        rank = sharding.rank_model(profile)

    def add(phase: str, w, g, o, a, tmp, where=""):
        if rank is not None:
            w, g, o, a, tmp = sharding.adjust(rank, profile, phase, w, g, o, a, tmp, weights,
                                              grads, states, where)
        total = w + g + o + a + tmp
        candidates.append((total, phase, {C.WEIGHTS.value: w, C.GRADIENTS.value: g,
                                          C.OPTIMIZER.value: o, C.ACTIVATIONS.value: a,
                                          C.TEMPORARIES.value: tmp}))

    if training:
        saved_logits = 0
        for x in terms:
            if x.loss is not None:
                saved_logits, loss_fwd, loss_bwd = x.loss
        # kept model outputs: alive from the loss through backward, the optimizer and the next forward
        held = sum(x.held for x in terms)
        tmp_common = inputs + workspace + autocast_copies + held
        w_all = weights + extra_weights
        # Step 1 optimizer step: weights + grads + new states + foreach temporary.
        add("optimizer", w_all, grads, states, 0, inputs + workspace + opt_temp + held)
        # Gradients already present during the forward/backward of micro-batches >= 2.
        g_prev = grads if m > 1 else 0
        # Step 2 forward at the loss.
        add("forward", w_all, g_prev, states, acts,
            tmp_common + loss_fwd + saved_logits)
        for x in terms:
            for extra in x.forward_phases:  # e.g. a frozen teacher's forward before the student's
                add("forward", w_all, g_prev, states, 0, tmp_common + extra)
        # Step 2 backward: start (at the loss), then layer by layer.
        layer_g = [_r(n, cuda) for n in arch.layer_trainable_bytes]
        head_g = grads - sum(layer_g)
        accum_tmp = _r(arch.largest_param * 4, cuda) if m > 1 else 0
        add("backward", w_all, g_prev, states, acts,
            tmp_common + loss_bwd, where="loss")
        g_so_far = head_g if m == 1 else grads
        remaining = acts - head_saved_b
        for i in reversed(range(arch.layers)):
            recompute = full_layer if (ckpt and i % every == 0) else 0
            g_now = g_so_far + (layer_g[i] if m == 1 else 0)
            add("backward", w_all, min(g_now, grads), states, remaining + recompute + head_saved_b,
                tmp_common + cost.bwd_transient + accum_tmp, where=str(arch.layers - 1 - i))
            remaining -= per_layer_saved[i]
            g_so_far = g_now
        add("backward", w_all, grads, states, head_saved_b, tmp_common + accum_tmp, where="end")
    else:
        # Inference: weights + one layer's live tensors, or the logits at the end.
        e = 2 if precision != "fp32" else 4
        E = b * t
        live_layer = sum(cost.saved) + cost.fwd_transient
        if arch.family == "bert":
            live_layer = _encoder_infer_live(arch, b, t, precision, cuda, padded)
        add("forward", weights, 0, 0, 0, inputs + workspace + autocast_copies + live_layer)
        add("forward", weights, 0, 0, 0, inputs + workspace + autocast_copies +
            _r(E * arch.hidden * 4, cuda) * 2 + loss_fwd)
        del e
    # logits and the loss's tensors alive at the loss (temporaries in the breakdown)
    layer_acts[LOGITS_ROW] = loss_fwd + (saved_logits if training else 0)  # a teacher's logits too
    peak, phase, breakdown = max(candidates, key=lambda c: c[0])

    # ----- reserved ----------------------------------------------------------------------
    c = dev.constants(profile.target, dev.kind_of(profile))
    if cuda:
        persistent = list(weights_list)
        if training:
            persistent += list(grads_list)
            persistent += state_list
        if rank is not None:  # one data-parallel rank: its shards (or DDP's copies and buckets)
            persistent = [x for x in (rank.weights, rank.grads, rank.states, rank.buckets) if x]
        if training:
            transient = []
            for i in range(arch.layers):
                if ckpt and i % every == 0:
                    transient.append(layer_in)
                else:
                    transient += cost.saved
            transient += head_saved + [loss_bwd // 3] * 3 + [cost.bwd_transient]
        else:
            transient = list(cost.saved) + [cost.fwd_transient, loss_fwd]
        alloc_opts = dict(expandable=setup.expandable, pool_bytes=setup.pool_bytes,
                          max_split=setup.max_split, small_page=c.expandable_small_page,
                          large_page=c.expandable_large_page)
        # the replay where the H200 rows check it: the default allocator, one pass, no sharding
        plain = not (setup.expandable or setup.pool_bytes or setup.max_split)
        if reserved_model == "stream" and plain and rank is None and m == 1 and not terms:
            reserved_fb = _streamed_reserved(
                arch, training, alloc_opts, c, weights_list, grads_list, state_list,
                inputs=[_r(B * T * 8, cuda)] * (3 if training else 2), cost=cost,
                checkpointed=[ckpt and i % every == 0 for i in range(arch.layers)],
                layer_in=layer_in, head_saved=head_saved,
                embed_saved=[_r(x, cuda) for x in _embedding_saved(arch, b * t, r_bytes, cuda, training)],
                loss_fwd=loss_fwd_parts, loss_bwd=loss_bwd_parts, amp=amp, opt_temp=opt_temp,
                hidden=_r(b * t * arch.hidden * r_bytes, cuda),
                final_fp32=_r(b * t * arch.hidden * 4, cuda))
        else:
            reserved_fb = reserved_from_sizes(persistent, transient, **alloc_opts)
        reserved = max(peak, reserved_fb)
        if setup.pool_bytes:
            reserved = max(reserved, -(-setup.pool_bytes // (2 << 20)) * (2 << 20))
    else:
        reserved = peak
    return AnalyticOutcome(peak_allocated=int(peak), peak_reserved=int(reserved),
                           breakdown={k: int(v) for k, v in breakdown.items()},
                           peak_phase=phase, layer_activations=layer_acts, params=arch.params,
                           notes=notes, extra_layers=sum(x.layers for x in terms),
                           extra_rows=tuple(row for x in terms for row in x.rows),
                           trainable_params=arch.trainable_params if training else 0,
                           optimizer_state_bytes=int(states))


__all__ = ["EMBEDDINGS_ROW", "HEAD_ROW", "LOGITS_ROW", "Arch", "arch_of", "estimate_shape", "layer_cost"]
