"""Local (sliding-window) attention of width W for any model that uses transformers' AttentionInterface.

Window: a decoder's query i sees keys j with i - W < j <= i (the W most recent tokens, itself
included); an encoder's query sees keys with |i - j| < W (W - 1 on each side).

Implementations (all take q (B, H, Tq, D), k/v (B, Hkv, Tk, D) and return (B, H, Tq, D)):

* ``flex_local_attention``: CUDA. ``torch.nn.attention.flex_attention`` compiled once, with a block
  mask cached per (T, W, causal, device): tiles outside the band are skipped, so time and memory
  grow with T·W.
* ``blocked_local_attention``: anywhere (CPU, or when flex is unavailable). Queries in blocks of
  ``bs = max(W, 16)``; each block attends to the keys of its own block plus W - 1 before (and
  after, for encoders), masked to the exact window, softmax per block. Plain tensor ops (autograd
  works); scores are (B, H, T/bs, bs, bs + 2W) - memory O(T·W), not O(T²).
* ``dense_masked_attention``: a full (Tq, Tk) boolean band mask given to SDPA. Same result,
  O(T²) memory and time: the honest "local attention that saves nothing", for the benchmark.

``apply`` registers ``headroom_local`` with ``AttentionInterface`` and a pass-through mask function
with ``AttentionMaskInterface`` (so the model hands us its 2-D padding mask instead of building an
n x n one), and switches the model to it. The padding mask is combined with the window.
Needs transformers >= 4.53 (masking_utils); older versions raise BadInput.
"""

from __future__ import annotations

import functools
from dataclasses import replace
import re
from typing import TYPE_CHECKING

from engine.errors import BadInput
from engine.techniques.base import AnalyticSetup, Control, Field, Technique

if TYPE_CHECKING:
    import torch

    from engine.profile import Profile

EXPLANATION = (
    "Local (sliding-window) attention lets each token attend only to the W tokens before it "
    "(decoders) or within W tokens on either side (encoders) instead of the whole sequence. "
    "Dense attention's score matrix grows with the square of the sequence length; a windowed "
    "kernel computes only the band, so attention memory and time grow linearly with length at a "
    "fixed W. On CUDA Headroom uses PyTorch FlexAttention with a block mask (tiles outside the "
    "window are skipped); elsewhere a blocked implementation with O(n·W) memory. It pays off for "
    "long sequences (several times W); at short lengths it is no faster than dense SDPA. A "
    "'local' attention done with a dense n x n mask saves nothing - Headroom measures both. The "
    "cost is quality: tokens farther than W apart no longer see each other directly (stacked "
    "layers widen the receptive field), so a model trained with full attention changes its outputs."
)


def applies(profile: "Profile") -> bool:
    return profile.local_window > 0


# ----- masks ----------------------------------------------------------------------------------
def band_mask(q_len: int, k_len: int, window: int, causal: bool, device=None):
    """(Tq, Tk) bool, True = attend. Queries are the last Tq positions of the Tk keys."""
    import torch

    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    diff = q_pos - k_pos
    if causal:
        return (diff >= 0) & (diff < window)
    return diff.abs() < window


def _keep_mask(attention_mask, q_len: int, k_len: int):
    """Normalise a model's attention mask: None, (B, Tk) bool keys, or (B, 1|H, Tq, Tk) bool."""
    import torch

    if attention_mask is None:
        return None
    m = attention_mask
    if m.dim() == 2:
        m = m[:, -k_len:]
        return m if m.dtype == torch.bool else m != 0
    if m.dim() == 4:
        m = m[..., -q_len:, -k_len:]
        if m.dtype == torch.bool:
            return m
        return m > torch.finfo(m.dtype).min / 2  # additive float mask: 0 keep, very negative drop
    raise ValueError(f"local attention: unexpected attention mask of shape {tuple(m.shape)}")


def _repeat_kv(x, groups: int):
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


# ----- implementations ------------------------------------------------------------------------
def dense_masked_attention(q, k, v, window: int, causal: bool = True, scale=None,
                           attention_mask=None, dropout: float = 0.0):
    """Local attention done densely: an (Tq, Tk) band mask passed to SDPA. O(T²) memory."""
    import torch

    tq, tk = q.shape[2], k.shape[2]
    groups = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    mask = band_mask(tq, tk, window, causal, q.device)[None, None]  # (1, 1, Tq, Tk)
    keep = _keep_mask(attention_mask, tq, tk)
    if keep is not None:
        mask = mask & (keep[:, None, None, :] if keep.dim() == 2 else keep)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                            dropout_p=dropout, scale=scale)


def blocked_local_attention(q, k, v, window: int, causal: bool = True, scale=None,
                            attention_mask=None, dropout: float = 0.0, training: bool = False,
                            block=None):
    """Sliding-window attention with O(T·W) memory, plain tensor ops (autograd, any device)."""
    import math

    import torch
    import torch.nn.functional as F

    b, h, t, d = q.shape
    tk = k.shape[2]
    if tk != t:  # decoding with a cache: few queries, a dense band is cheap
        return dense_masked_attention(q, k, v, window, causal, scale, attention_mask,
                                      dropout if training else 0.0)
    keep = _keep_mask(attention_mask, t, tk)
    if keep is not None and keep.dim() == 4:  # the model already built an n x n mask
        return dense_masked_attention(q, k, v, window, causal, scale, keep,
                                      dropout if training else 0.0)
    scale = d ** -0.5 if scale is None else scale
    groups = h // k.shape[1]
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    bs = block or max(window, 16)
    nb = math.ceil(t / bs)
    tp = nb * bs
    left = window - 1
    right = 0 if causal else window - 1
    span = bs + left + right  # keys seen by one query block
    qb = F.pad(q, (0, 0, 0, tp - t)).reshape(b, h, nb, bs, d)  # (B, H, nb, bs, D)
    kb = F.pad(k, (0, 0, left, right + tp - t)).unfold(2, span, bs)  # (B, H, nb, D, span)
    vb = F.pad(v, (0, 0, left, right + tp - t)).unfold(2, span, bs)  # (B, H, nb, D, span)
    scores = torch.matmul(qb, kb) * scale  # (B, H, nb, bs, span)
    r = torch.arange(bs, device=q.device)[:, None]
    c = torch.arange(span, device=q.device)[None, :]
    diff = r - c + left  # query pos - key pos, same for every block
    band = (diff >= 0) & (diff < window) if causal else diff.abs() < window  # (bs, span)
    k_pos = (torch.arange(nb, device=q.device)[:, None] * bs - left
             + torch.arange(span, device=q.device)[None, :])  # (nb, span)
    allowed = band[None] & ((k_pos >= 0) & (k_pos < t))[:, None, :]  # (nb, bs, span)
    if keep is not None:
        kp = F.pad(keep, (left, right + tp - t), value=False).unfold(1, span, bs)  # (B, nb, span)
        allowed = allowed[None] & kp[:, :, None, :]  # (B, nb, bs, span)
        allowed = allowed[:, None]  # (B, 1, nb, bs, span)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    if dropout and training:
        probs = F.dropout(probs, p=dropout)
    out = torch.matmul(probs, vb.transpose(-1, -2))  # (B, H, nb, bs, D)
    return out.reshape(b, h, tp, d)[:, :, :t]


def flex_state():
    """FlexAttention's state in this process, kept on this function: ``compiled`` (flex_attention
    compiled once), ``masks`` (block masks per (T, W, causal, device)) and ``error`` (why it is
    unavailable; None while it works)."""
    if not hasattr(flex_state, "cache"):
        flex_state.cache = {"error": None, "compiled": None, "masks": {}}
    return flex_state.cache


_FLEX_STATE = flex_state()  # the same dict (benchmarks read its error)


def flex_available(device) -> bool:
    """FlexAttention usable here: CUDA device, torch with flex_attention, no earlier failure."""
    import torch

    if getattr(device, "type", str(device)) != "cuda" or flex_state()["error"] is not None:
        return False
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError as exc:
        flex_state()["error"] = f"flex_attention unavailable ({exc})"
        return False
    return torch.cuda.is_available()


def _compiled_flex():
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    if flex_state()["compiled"] is None:
        flex_state()["compiled"] = torch.compile(flex_attention, dynamic=False)
    return flex_state()["compiled"]


def _block_mask(q_len: int, window: int, causal: bool, device, keep=None):
    """FlexAttention BlockMask for the window (cached per (T, W, causal, device) without padding)."""
    import inspect

    from torch.nn.attention.flex_attention import create_block_mask

    key = (q_len, window, causal, str(device))
    if keep is None and key in flex_state()["masks"]:
        return flex_state()["masks"][key]

    if causal:
        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < window)
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx - kv_idx < window) & (kv_idx - q_idx < window)
    batch = None
    if keep is not None:
        base = mask_mod

        def mask_mod(b, h, q_idx, kv_idx):  # noqa: F811 - window AND key not padding
            return base(b, h, q_idx, kv_idx) & keep[b, kv_idx]
        batch = keep.shape[0]
    kwargs = {}
    if "_compile" in inspect.signature(create_block_mask).parameters:
        kwargs["_compile"] = True  # never materialise the T x T mask
    mask = create_block_mask(mask_mod, B=batch, H=None, Q_LEN=q_len, KV_LEN=q_len,
                             device=device, **kwargs)
    if keep is None:
        flex_state()["masks"][key] = mask
    return mask


def flex_local_attention(q, k, v, window: int, causal: bool = True, scale=None,
                         attention_mask=None):
    """Sliding-window attention with compiled FlexAttention (CUDA)."""
    import inspect

    from torch.nn.attention.flex_attention import flex_attention

    t = q.shape[2]
    keep = _keep_mask(attention_mask, t, k.shape[2])
    if keep is not None and keep.dim() == 4:
        return dense_masked_attention(q, k, v, window, causal, scale, keep)
    mask = _block_mask(t, window, causal, q.device, keep)
    groups = q.shape[1] // k.shape[1]
    kwargs = {"block_mask": mask, "scale": scale}
    if groups > 1:
        if "enable_gqa" in inspect.signature(flex_attention).parameters:
            kwargs["enable_gqa"] = True
        else:
            k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    return _compiled_flex()(q, k, v, **kwargs)


def _is_fake(t) -> bool:
    """FakeTensor (traced estimates): no kernels to compile; the blocked path traces the same way."""
    return type(t).__name__ == "FakeTensor"


def local_attention(q, k, v, window: int, causal: bool = True, scale=None,
                    attention_mask=None, dropout: float = 0.0, training: bool = False):
    """Flex on CUDA (when it works), else the blocked implementation. Returns (B, H, Tq, D)."""
    if q.shape[2] == k.shape[2] and flex_available(q.device) and not _is_fake(q):
        try:
            return flex_local_attention(q, k, v, window, causal, scale, attention_mask)
        except Exception as exc:  # compile/kernel failure: fall back, and say so in later notes
            flex_state()["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return blocked_local_attention(q, k, v, window, causal, scale, attention_mask, dropout, training)


# ----- transformers integration ---------------------------------------------------------------
def _window_of(module) -> int:
    w = getattr(module, "headroom_local_window", None)
    if not w:
        w = getattr(getattr(module, "config", None), "headroom_local_window", None)
    if not w:
        raise ValueError("local attention: the model was switched to headroom_local without a window")
    return int(w)


def headroom_local_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                           attend=None, **kwargs):
    """AttentionInterface function: (B, H, T, D) inputs -> ((B, T, H, D) output, None).
    ``attend``: the attention itself (default ``local_attention``; the traced estimate's CUDA
    emulation passes its own)."""
    causal = kwargs.get("is_causal")
    if causal is None:
        causal = getattr(module, "is_causal", True)
    out = (attend or local_attention)(query, key, value, _window_of(module), bool(causal), scaling,
                                      attention_mask, dropout, getattr(module, "training", False))
    return out.transpose(1, 2).contiguous(), None


def _pass_through_mask(*args, attention_mask=None, **kwargs):
    """AttentionMaskInterface function: keep the 2-D padding mask (None when nothing is padded)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2 and attention_mask.device.type != "meta" and not _is_fake(attention_mask):
        try:
            if bool(attention_mask.all()):
                return None
        except RuntimeError:  # data-dependent under tracing: keep the mask
            pass
    return attention_mask


def register_local_attention():
    """Register ``headroom_local`` with transformers' AttentionInterface (the attention function)
    and AttentionMaskInterface (hand it the 2-D padding mask, not an n x n one); transformers >= 4.53."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register("headroom_local", headroom_local_forward)
    AttentionMaskInterface.register("headroom_local", _pass_through_mask)
    return "headroom_local"


@functools.lru_cache(maxsize=1)
def register() -> str:
    """Register ``headroom_local`` with transformers; BadInput when this transformers is too old."""
    try:
        from transformers import AttentionInterface  # noqa: F401
        from transformers.masking_utils import AttentionMaskInterface  # noqa: F401
    except ImportError:
        import transformers

        raise BadInput(f"local attention needs transformers >= 4.53 (AttentionInterface); "
                       f"this is {transformers.__version__}") from None
    return register_local_attention()


def _set_implementation(model, name):
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        try:
            setter(name)
        except (ValueError, KeyError, TypeError):
            pass
    configs = {id(model.config): model.config} if hasattr(model, "config") else {}
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            configs[id(cfg)] = cfg
    for cfg in configs.values():
        if getattr(cfg, "_attn_implementation", None) != name:
            try:
                cfg._attn_implementation_internal = name
            except AttributeError:
                pass
            if getattr(cfg, "_attn_implementation", None) != name:
                cfg._attn_implementation = name
    if getattr(model.config, "_attn_implementation", None) != name:
        raise ValueError(f"local attention: cannot switch {type(model).__name__} to a custom attention "
                         f"function (it does not use transformers' AttentionInterface)")


def use_local_attention(model, window):
    """Switch every attention layer of the model to sliding-window attention of ``window`` tokens
    (``headroom_local_forward``; the window is kept on the configs). Torch and transformers only:
    the exported script embeds it."""
    name = register_local_attention()
    model.config.headroom_local_window = window
    for mod in model.modules():
        if getattr(mod, "config", None) is not None and mod.config is not model.config:
            mod.config.headroom_local_window = window
    _set_implementation(model, name)


def apply(model: "torch.nn.Module", profile: "Profile") -> str | None:
    window = profile.local_window
    register()  # BadInput when this transformers is too old
    try:
        use_local_attention(model, window)
    except ValueError as exc:  # the model does not use transformers' AttentionInterface
        raise BadInput(str(exc)) from None
    device = next((p.device for p in model.parameters()), None)
    if device is not None and device.type == "cuda":
        if flex_available(device):
            how = "FlexAttention (compiled) with a cached block mask"
        else:
            how = f"blocked O(n·W) implementation (FlexAttention unavailable: {flex_state()['error']})"
    elif device is not None and device.type == "meta":
        how = ("FlexAttention on CUDA, blocked O(n·W) elsewhere" if profile.target == "cuda"
               else "blocked O(n·W) implementation")
    else:
        how = "blocked O(n·W) implementation (FlexAttention needs CUDA)"
    return f"local attention, window {window}: {how}"


#: The functions the exported script embeds, in order (torch and transformers only).
PORTABLE = (band_mask, _keep_mask, _repeat_kv, dense_masked_attention, blocked_local_attention,
            flex_state, flex_available, _compiled_flex, _block_mask, flex_local_attention, _is_fake,
            local_attention, _window_of, headroom_local_forward, _pass_through_mask,
            register_local_attention, _set_implementation, use_local_attention)


_ATTN_RE = re.compile(r"(sdpa|eager|local:([0-9]{1,9}))", re.ASCII)  # used with fullmatch


def _check_attn(value: str) -> None:
    m = _ATTN_RE.fullmatch(value)
    if not m:
        raise BadInput(f"attn must be sdpa, eager or local:W (W a positive integer); got {value!r}")
    if m.group(2) is not None and int(m.group(2)) < 1:
        raise BadInput("local attention window W must be >= 1")


def _window(p) -> int:
    """Window W of ``attn == 'local:W'``, else 0."""
    return int(p.attn.split(":", 1)[1]) if p.attn.startswith("local:") else 0


def check(prepared) -> list[str]:
    p = prepared.profile
    window = p.local_window
    if not window:
        return []
    try:
        from transformers import AttentionInterface  # noqa: F401
        from transformers.masking_utils import AttentionMaskInterface  # noqa: F401
    except ImportError:
        import transformers

        raise BadInput(f"local attention needs transformers >= 4.53 (AttentionInterface); "
                       f"this is {transformers.__version__}") from None
    per_forward = p.chunk_input or p.seq
    if window >= per_forward:
        return [f"local window {window} covers the whole sequence ({per_forward} tokens): "
                f"same result as dense attention, no saving"]
    return []


def analytic_setup(p: "Profile", setup: AnalyticSetup) -> AnalyticSetup:
    """The attention kernel the formulas model (eager, or SDPA: dense or windowed)."""
    window = p.local_window
    notes = setup.notes
    if window and p.target != "cuda":
        notes += ("local attention on CPU: blocked implementation, O(T*2W) per layer",)
    return replace(setup, attention="eager" if p.attn == "eager" else "sdpa", window=window,
                   notes=notes)


def _attn_changes(values: dict) -> dict:
    kind = values["attn"]
    return {"attn": f"local:{values['window']}" if kind == "local" else kind}


TECHNIQUE = Technique(
    name="local_attention",
    title="Sparse / local attention",
    group="attention",
    order=60,
    fields=(Field("attn", str, "sdpa", "sdpa | eager | local:W (sliding window of W tokens)",
                  check=_check_attn, metavar="sdpa|eager|local:W", after="checkpoint_every",
                  label="attention"),),
    controls=(
        Control("attn", "combo", "Attention", choices={
            "sdpa": "Dense SDPA", "eager": "Dense eager", "local": "Sliding window (local)"},
            read=lambda p: "local" if p.local_window else p.attn, write=_attn_changes),
        Control("window", "spin", "Window W", low=1, high=1 << 20, step=64, initial=256,
                read=lambda p: p.local_window or None, write=_attn_changes,
                enabled_when=lambda p: bool(p.local_window)),
    ),
    explanations={"local_attention": EXPLANATION},
    summary_title=lambda p: f"Local attention (window {p.local_window})",
    properties={"local_window": _window},
    active=applies,
    check=check,
    apply_model=apply,
    apply_rank=40,
    analytic_setup=analytic_setup,
    export_source=lambda: list(PORTABLE),
    export_calls=lambda p: ["use_local_attention(model, LOCAL_WINDOW)"],
    export_constants=lambda p: [("LOCAL_WINDOW", p.local_window, "local attention: tokens each query sees")],
)
