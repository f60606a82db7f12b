"""What a CUDA run does differently from a CPU one, replayed on CPU fake tensors (for ``traced``).

A CPU-only PyTorch cannot create fake CUDA tensors (autograd aborts in ``getDeviceGuardImpl``), so
the traced estimator runs on fake *CPU* tensors and this torch-function mode substitutes the few
behaviours whose memory differs on CUDA:

* **Autocast** (``torch.autocast("cuda")``): CUDA's op lists, not CPU's. ``lower`` ops (linear,
  matmul, addmm, bmm, baddbmm, SDPA, ...) cast floating inputs to the autocast dtype; ``fp32`` ops
  (layer_norm, pow, rsqrt, exp, nll_loss, mse_loss, kl_div, ...) cast to float32;
  ``fp32_set_opt_dtype`` ops (softmax, log_softmax, sum, cumsum, prod) run with ``dtype=float32``
  when given a low-precision input. Casts of fp32 leaf tensors that require grad (the weights) are
  cached until the autocast region ends, like ``at::autocast::cached_cast``.
  Source: ``aten/src/ATen/autocast_mode.cpp`` (the CUDA lists) and the AMP op reference
  (https://pytorch.org/docs/stable/amp.html#cuda-ops-that-can-autocast-to-float16).
* **Dropout**: CUDA uses the fused ``native_dropout`` (a bool mask is saved, 1 byte/element); CPU's
  composite path saves a mask in the input dtype.
* **SDPA backend**: on CUDA, ``scaled_dot_product_attention`` picks flash (fp16/bf16, no mask,
  head dim <= 256, grouped-query heads allowed), else memory-efficient (any float dtype, masks
  allowed, but query heads must equal key/value heads), else math; see
  ``aten/src/ATen/native/transformers/cuda/sdp_utils.cpp`` (``select_sdp_backend``). The fused
  kernels keep no T x T matrix: they save their output and a float32 logsumexp, and their backward
  allocates fp32 accumulators (flash: ``dq_accum`` (B, T_128, H, D_32) and ``softmax_d``
  (B, H, T_128); see ``flash_api.cpp: mha_bwd``). Boolean masks are converted to an additive mask
  in the query dtype and padded to a multiple of 16 columns (``convert_boolean_attn_mask``,
  ``preprocess_mask`` in ``attention.cpp``) and saved for backward by the efficient kernel.
  Math falls back to the real composite ops (the T x T probabilities are materialised).
* **Local attention** (``--attn local:W``): on CUDA the technique runs compiled FlexAttention
  (``FlexAttentionEmu``: output + fp32 logsumexp, no T x W scores), not the blocked fallback that
  CPU/meta tensors select (``cuda_local_attention``).

Known limitations: ops reached only through C++ composites are not re-cast (CUDA autocast acts on
every aten op, this mode on the Python-level functions HF models call); cuDNN attention (preferred
on some Hopper/Blackwell builds) is treated like flash; the efficient kernel's backward workspace
is approximated by one fp32 (B, T, H, D) accumulator for half inputs.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

LOWER = 1
FP32 = 2
OPT32 = 3
PROMOTE = 4


def _cpu_policies() -> dict:
    """CPU autocast lists (``autocast_mode.cpp``, AutocastCPU): no softmax/layer_norm upcast."""
    T = torch.Tensor
    lower = [F.linear, torch.matmul, T.matmul, T.__matmul__, T.__rmatmul__, torch.mm, T.mm,
             torch.bmm, T.bmm, torch.addmm, T.addmm, torch.baddbmm, T.baddbmm, torch.addbmm,
             F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, torch.prelu,
             F.prelu, F.scaled_dot_product_attention]
    fp32 = [F.nll_loss, F.kl_div, F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss,
            F.binary_cross_entropy_with_logits, F.cross_entropy, F.poisson_nll_loss,
            F.cosine_embedding_loss, F.margin_ranking_loss, F.soft_margin_loss, torch.cdist]
    out = {}
    for group, pol in ((lower, LOWER), (fp32, FP32), ([torch.cat, torch.stack], PROMOTE)):
        for f in group:
            out[f] = pol
    return out


def _policies() -> dict:
    T = torch.Tensor
    lower = [F.linear, torch.matmul, T.matmul, T.__matmul__, T.__rmatmul__, torch.mm, T.mm,
             torch.bmm, T.bmm, torch.addmm, T.addmm, torch.baddbmm, T.baddbmm, torch.addbmm,
             T.addbmm, torch.einsum, torch.mv, T.mv, torch.addmv, torch.chain_matmul,
             F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, torch.prelu,
             F.prelu, F.scaled_dot_product_attention]
    fp32 = [F.layer_norm, torch.layer_norm, F.group_norm, torch.exp, T.exp, torch.log, T.log,
            torch.log1p, torch.expm1, torch.pow, T.pow, T.__pow__, torch.rsqrt, T.rsqrt,
            torch.reciprocal, T.reciprocal, F.softplus, F.nll_loss, F.kl_div, F.mse_loss,
            # F.cross_entropy is not listed: see _cross_entropy (its parts are)
            F.l1_loss, F.smooth_l1_loss, F.huber_loss, F.binary_cross_entropy_with_logits,
            F.cosine_similarity, torch.cdist, torch.logsumexp, T.logsumexp, F.poisson_nll_loss,
            F.cosine_embedding_loss, F.margin_ranking_loss, F.soft_margin_loss]
    opt32 = [F.softmax, torch.softmax, T.softmax, F.log_softmax, torch.log_softmax,
             T.log_softmax, torch.sum, T.sum, torch.cumsum, T.cumsum, torch.prod, T.prod]
    promote = [torch.cat, torch.stack, torch.addcmul, torch.addcdiv]
    out = {}
    for group, pol in ((lower, LOWER), (fp32, FP32), (opt32, OPT32), (promote, PROMOTE)):
        for f in group:
            out[f] = pol
    return out


_POLICY: dict | None = None
_CPU_POLICY: dict | None = None
_LOW = (torch.float16, torch.bfloat16)


def _cache_key(t: torch.Tensor) -> int:
    return id(t)


class CudaEmulation(TorchFunctionMode):
    """Torch-function mode replaying CUDA's autocast, dropout and SDPA memory behaviour.

    ``autocast_dtype`` is None (no autocast) or the autocast dtype; ``autocast_enabled`` is
    toggled by the caller around the forward pass (the weight-cast cache is cleared on disable).
    ``backend_log`` collects the SDPA backend chosen per call.
    """

    def __init__(self, autocast_dtype: torch.dtype | None = None, target: str = "cuda",
                 flash: bool = True):
        super().__init__()
        self.flash = flash  # the GPU runs PyTorch's flash kernel (sm80+; engine.gpus)
        global _POLICY, _CPU_POLICY
        if _POLICY is None:
            _POLICY = _policies()
            _CPU_POLICY = _cpu_policies()
        self.target = target
        self.policy = _POLICY if target == "cuda" else _CPU_POLICY
        self.autocast_dtype = autocast_dtype
        self.autocast_enabled = False
        self.cache_enabled = True
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.backend_log: list[str] = []

    # ----- autocast ------------------------------------------------------------------------
    def set_autocast(self, enabled: bool) -> None:
        self.autocast_enabled = enabled and self.autocast_dtype is not None
        if not enabled:
            self.cache.clear()

    def _cast(self, x, dtype):
        if not (isinstance(x, torch.Tensor) and x.is_floating_point()) or x.dtype == dtype \
                or x.dtype == torch.float64:
            return x
        cacheable = (self.cache_enabled and dtype != torch.float32 and x.dtype == torch.float32
                     and x.requires_grad and x.is_leaf)
        if cacheable:
            hit = self.cache.get(_cache_key(x))
            if hit is not None and hit[0] is x:
                return hit[1]
            y = x.to(dtype)
            self.cache[_cache_key(x)] = (x, y)
            return y
        return x.to(dtype)

    def _cast_all(self, args, kwargs, dtype):
        def conv(a):
            if isinstance(a, torch.Tensor):
                return self._cast(a, dtype)
            if isinstance(a, (list, tuple)) and a and all(isinstance(x, torch.Tensor) for x in a):
                return type(a)(self._cast(x, dtype) for x in a)
            return a
        return tuple(conv(a) for a in args), {k: conv(v) for k, v in kwargs.items()}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if self.autocast_enabled:
            pol = self.policy.get(func)
            if pol == LOWER:
                args, kwargs = self._cast_all(args, kwargs, self.autocast_dtype)
            elif pol == FP32:
                args, kwargs = self._cast_all(args, kwargs, torch.float32)
            elif pol == OPT32:
                first = args[0] if args else kwargs.get("input")
                if (isinstance(first, torch.Tensor) and first.dtype in _LOW
                        and kwargs.get("dtype") is None and not _dtype_positional(func, args)):
                    kwargs["dtype"] = torch.float32
            elif pol == PROMOTE:
                tensors = [a for a in (args[0] if func in (torch.cat, torch.stack) else args)
                           if isinstance(a, torch.Tensor) and a.is_floating_point()]
                if tensors and len({t.dtype for t in tensors}) > 1:
                    widest = torch.float32 if any(t.dtype == torch.float32 for t in tensors) \
                        else tensors[0].dtype
                    args, kwargs = self._cast_all(args, kwargs, widest)
        if func is F.cross_entropy and self.autocast_enabled and self.target == "cuda":
            return _cross_entropy(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            return self._sdpa(*args, **kwargs)
        if func is F.dropout and self.target == "cuda":
            return _dropout(*args, **kwargs)
        return func(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` with this mode active (``Tensor.backward`` itself is a torch function,
        which would switch the mode off): checkpointed layers recompute their forward in backward,
        under the forward's autocast state as ``torch.utils.checkpoint`` restores it; the
        weight-cast cache is off (a recompute's casts live as long as its layer's graph)."""
        saved = (self.autocast_enabled, self.cache_enabled)
        self.autocast_enabled = self.autocast_dtype is not None
        self.cache_enabled = False
        try:
            torch.autograd.Variable._execution_engine.run_backward(
                (loss,), (torch.ones_like(loss),), False, False, (), True, True)
        finally:
            self.autocast_enabled, self.cache_enabled = saved

    # ----- SDPA ----------------------------------------------------------------------------
    def _sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
              scale=None, enable_gqa=False):
        if self.target != "cuda":
            return self._sdpa_cpu(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                  enable_gqa)
        backend = choose_backend(query, key, value, attn_mask, enable_gqa, self.flash)
        self.backend_log.append(backend)
        if backend == "flash":
            return FlashAttentionEmu.apply(query, key, value, float(dropout_p))
        if backend == "efficient":
            bias = None
            if attn_mask is not None:
                bias = _prepare_bias(attn_mask, query)
            return EfficientAttentionEmu.apply(query, key, value, bias, float(dropout_p))
        return _math(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)

    def _sdpa_cpu(self, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        backend = _cpu_choice(query.dtype, attn_mask is not None, float(dropout_p) > 0.0,
                              bool(is_causal), query.shape[1] != key.shape[1] and enable_gqa)
        self.backend_log.append(backend)
        if backend == "math":
            return _math(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        if enable_gqa and key.shape[1] != query.shape[1]:
            rep = query.shape[1] // key.shape[1]
            key = key.repeat_interleave(rep, dim=1)  # (B, H, S, D)
            value = value.repeat_interleave(rep, dim=1)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype,
                                    device=attn_mask.device).masked_fill(attn_mask.logical_not(),
                                                                         float("-inf"))
        out, _lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, float(dropout_p), bool(is_causal), attn_mask=attn_mask, scale=scale)
        return out


def _math(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """The composite math path (T x T probabilities materialised and saved)."""
    kw = {"scale": scale}
    if enable_gqa:
        kw["enable_gqa"] = True
    out, _attn = torch.ops.aten._scaled_dot_product_attention_math(
        query, key, value, attn_mask, float(dropout_p), bool(is_causal), None, **kw)
    return out


_CPU_CHOICES: dict = {}


def _cpu_choice(dtype, has_mask: bool, dropout: bool, causal: bool, gqa: bool) -> str:
    """Ask this machine's CPU SDPA dispatcher (tiny real tensors) which backend it would use."""
    key = (dtype, has_mask, dropout, causal, gqa)
    if key not in _CPU_CHOICES:
        q = torch.zeros((1, 2, 4, 8), dtype=dtype)
        k = torch.zeros((1, 1 if gqa else 2, 4, 8), dtype=dtype)
        mask = torch.ones((1, 1, 4, 4), dtype=torch.bool) if has_mask else None
        kwargs = {"attn_mask": mask, "dropout_p": 0.1 if dropout else 0.0,
                  "is_causal": causal and not has_mask}
        if gqa:
            kwargs["enable_gqa"] = True
        try:
            choice = int(torch._fused_sdp_choice(q, k, k, **kwargs))
        except (RuntimeError, TypeError, ValueError):  # an older torch without this query
            choice = 0
        _CPU_CHOICES[key] = "flash" if choice == 1 else "math"
    return _CPU_CHOICES[key]


def _dtype_positional(func, args) -> bool:
    # softmax(x, dim, dtype) / sum(x, dim, keepdim, dtype=...): dtype rarely positional in HF code
    return func in (F.softmax, F.log_softmax) and len(args) >= 4 and args[3] is not None


def _cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                   reduction="mean", label_smoothing=0.0):
    """``F.cross_entropy`` under CUDA autocast. ``cross_entropy_loss`` is not on an autocast list;
    its composite (``Loss.cpp``) calls ``log_softmax(input, dim, input.scalar_type())``, whose
    explicit dtype keeps half logits half, and ``nll_loss``, which autocast runs in fp32 on a float
    copy that its backward keeps. Measured on an H200 for half (N, V) logits, in fp32 (N, V) units:
    1.5 kept after the forward, 2.5 at the backward's peak, where a whole-fp32 cross-entropy would
    keep 1 and peak at 3 (bench/diag_cross_entropy.py; results/verify_h200_2026-12-02/call12)."""
    if target.is_floating_point() or label_smoothing:  # probabilities / smoothing: other composites
        x = input.float() if input.dtype in _LOW else input
        return F.cross_entropy(x, target, weight, size_average, ignore_index, reduce, reduction,
                               label_smoothing)
    logp = F.log_softmax(input, 1 if input.dim() > 1 else 0, dtype=input.dtype)
    if logp.dtype in _LOW:
        logp = logp.float()
    return F.nll_loss(logp, target, None if weight is None else weight.float(), size_average,
                      ignore_index, reduce, reduction)


def _dropout(input, p=0.5, training=True, inplace=False):
    if not training or p == 0.0:
        return input
    out, _mask = torch.native_dropout(input, p, True)  # saves a bool mask, as CUDA's fused kernel
    return out


def choose_backend(query, key, value, attn_mask, enable_gqa, flash: bool = True) -> str:
    """CUDA SDPA backend for these inputs (flash > efficient > math); ``flash``: the GPU has the
    flash kernel (sm80+; below it, T4/V100, the memory-efficient kernel or math runs)."""
    d_q, d_v = query.shape[-1], value.shape[-1]
    half = query.dtype in _LOW
    if flash and half and attn_mask is None and d_q == key.shape[-1] == d_v and d_q <= 256:
        return "flash"
    align = 8 if half else 4
    # The efficient kernel rejects grouped-query inputs (``check_batch_size_and_num_heads_dense
    # <false /*supports_grouped_query_attention*/>`` in its constraints): q heads != k heads with
    # ``enable_gqa`` goes to math. transformers passes ``enable_gqa`` when there is no mask
    # (``use_gqa_in_sdpa``), expecting flash, so fp32 GQA models without padding hit this.
    gqa = query.shape[-3] != key.shape[-3]
    if query.dtype in (torch.float32, torch.float16, torch.bfloat16) and d_q % align == 0 \
            and d_v % align == 0 and d_q == key.shape[-1] and not gqa:
        return "efficient"
    return "math"


def _prepare_bias(attn_mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """The additive bias the efficient kernel keeps: bool -> query dtype, columns padded to 16."""
    if attn_mask.dtype == torch.bool:
        bias = torch.zeros(attn_mask.shape, dtype=query.dtype, device=attn_mask.device)
        bias = bias.masked_fill(attn_mask.logical_not(), float("-inf"))  # (B, 1, T, S)
    else:
        bias = attn_mask
    s = bias.shape[-1]
    if s % 16:
        pad = 16 - s % 16
        bias = F.pad(bias, (0, pad))[..., :s]  # (B, 1, T, S_16) storage, (B, 1, T, S) view
    return bias


def _round(n: int, m: int) -> int:
    return -(-n // m) * m


class FlashAttentionEmu(torch.autograd.Function):
    """Memory behaviour of ``_scaled_dot_product_flash_attention`` (forward and backward)."""

    @staticmethod
    def forward(ctx, q, k, v, dropout_p):  # q: (B, H, T, D), k/v: (B, Hk, S, D)
        b, h, t, _d = q.shape
        out = torch.empty((b, t, h, v.shape[-1]), dtype=q.dtype, device=q.device)  # (B, T, H, Dv)
        lse = torch.empty((b, h, t), dtype=torch.float32, device=q.device)  # (B, H, T)
        rng = torch.empty((2,), dtype=torch.int64, device=q.device)  # philox seed/offset
        out_t = out.transpose(1, 2)  # (B, H, T, Dv)
        ctx.save_for_backward(q, k, v, out_t, lse, rng)
        return out_t

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, _out, _lse, _rng = ctx.saved_tensors
        b, h, t, d = q.shape
        hk, s = k.shape[1], k.shape[2]
        grad_out = grad_out.contiguous() if grad_out.stride(-1) != 1 else grad_out
        t128 = _round(t, 128)
        d_r = _round(d, 32 if d <= 128 else 64)
        softmax_d = torch.empty((b, h, t128), dtype=torch.float32, device=q.device)
        dq_accum = torch.empty((b, t128, h, d_r), dtype=torch.float32, device=q.device)
        dq = torch.empty((b, t, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)
        if hk != h:  # GQA: expanded key/value grads, then summed over the group
            dk_exp = torch.empty((b, s, h, d), dtype=k.dtype, device=k.device)
            dv_exp = torch.empty((b, s, h, v.shape[-1]), dtype=v.dtype, device=v.device)
            dk = dk_exp.view(b, s, hk, h // hk, d).sum(3).transpose(1, 2)
            dv = dv_exp.view(b, s, hk, h // hk, v.shape[-1]).sum(3).transpose(1, 2)
            del dk_exp, dv_exp
        else:
            dk = torch.empty((b, s, hk, d), dtype=k.dtype, device=k.device).transpose(1, 2)
            dv = torch.empty((b, s, hk, v.shape[-1]), dtype=v.dtype, device=v.device).transpose(1, 2)
        del softmax_d, dq_accum
        return dq, dk, dv, None


class EfficientAttentionEmu(torch.autograd.Function):
    """Memory behaviour of ``_efficient_attention_forward/backward`` (cutlass mem-efficient)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, dropout_p):
        b, h, t, _d = q.shape
        out = torch.empty((b, t, h, v.shape[-1]), dtype=q.dtype, device=q.device)  # (B, T, H, Dv)
        lse = torch.empty((b, h, _round(t, 32)), dtype=torch.float32, device=q.device)
        rng = torch.empty((2,), dtype=torch.int64, device=q.device)
        out_t = out.transpose(1, 2)
        if bias is not None:
            ctx.save_for_backward(q, k, v, out_t, lse, rng, bias)
        else:
            ctx.save_for_backward(q, k, v, out_t, lse, rng)
        return out_t

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        q, k, v = saved[:3]
        b, h, t, d = q.shape
        hk, s = k.shape[1], k.shape[2]
        grad_out = grad_out.contiguous() if grad_out.stride(-1) != 1 else grad_out
        delta = torch.empty((b, h, _round(t, 32)), dtype=torch.float32, device=q.device)
        ws = None
        if q.dtype != torch.float32:
            ws = torch.empty((b, t, h, d), dtype=torch.float32, device=q.device)  # grad_q accumulator
        if hk == h and q.shape == k.shape == v.shape:
            packed = torch.empty((b, t, 3, h, d), dtype=q.dtype, device=q.device)
            dq, dk, dv = (packed[:, :, i].transpose(1, 2) for i in range(3))
        else:
            dq = torch.empty((b, t, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)
            if hk != h:
                dk = torch.empty((b, s, h, d), dtype=k.dtype, device=k.device)
                dv = torch.empty((b, s, h, v.shape[-1]), dtype=v.dtype, device=v.device)
                dk = dk.view(b, s, hk, h // hk, d).sum(3).transpose(1, 2)
                dv = dv.view(b, s, hk, h // hk, v.shape[-1]).sum(3).transpose(1, 2)
            else:
                dk = torch.empty((b, s, hk, d), dtype=k.dtype, device=k.device).transpose(1, 2)
                dv = torch.empty((b, s, hk, v.shape[-1]), dtype=v.dtype,
                                 device=v.device).transpose(1, 2)
        del delta, ws
        return dq, dk, dv, None, None


class FlexAttentionEmu(torch.autograd.Function):
    """Memory behaviour of compiled FlexAttention (``torch.nn.attention.flex_attention``).

    Forward: the output (B, H, T, Dv) in the query dtype and a float32 logsumexp (B, H, T); both
    saved with q, k, v (k/v at their own head count: ``enable_gqa`` does not expand them).
    Backward: a float32 ``delta`` (B, H, T) and the gradients dq, dk, dv. The block mask (a few
    int32 tensors of (B, H, T/128[, T/128])) is negligible and not counted.
    """

    @staticmethod
    def forward(ctx, q, k, v):
        b, h, t, _d = q.shape
        out = torch.empty((b, h, t, v.shape[-1]), dtype=q.dtype, device=q.device)  # (B, H, T, Dv)
        lse = torch.empty((b, h, t), dtype=torch.float32, device=q.device)  # (B, H, T)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, _out, lse = ctx.saved_tensors
        delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)  # (B, H, T)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        del delta
        return dq, dk, dv


def _flex_local_attention(q, k, v, window: int, causal: bool = True, scale=None,
                          attention_mask=None, dropout: float = 0.0, training: bool = False):
    """``engine.techniques.local_attention.local_attention`` as it runs on CUDA: FlexAttention
    (emulated) for self-attention, the dense masked path for a 4-D mask, else blocked."""
    from engine.techniques import local_attention as la

    if q.shape[2] == k.shape[2]:
        keep = la._keep_mask(attention_mask, q.shape[2], k.shape[2])
        if keep is not None and keep.dim() == 4:
            return la.dense_masked_attention(q, k, v, window, causal, scale, keep)
        return FlexAttentionEmu.apply(q, k, v)
    return la.blocked_local_attention(q, k, v, window, causal, scale, attention_mask, dropout,
                                      training)


#: The attention implementation a traced model's local attention is switched to on CUDA targets.
EMULATED_LOCAL = "headroom_local_cuda_emulated"


class cuda_local_attention:  # noqa: N801 - used as a context manager
    """While active, the given models' local attention (``--attn local:W``) takes its CUDA path
    (FlexAttention), not the CPU fallback that meta tensors would select (``flex_available``
    needs a CUDA device).

    Only these models change: they are switched to ``EMULATED_LOCAL`` and back. An earlier
    version swapped ``local_attention`` in its module for every thread; an app estimate tracing
    in the background then sent other models' real attention to the emulation (``torch.empty``
    outputs), and two traces at once could leave it swapped for good (CI: NaN logits, losses off).
    """

    def __init__(self, *models):
        self.models = [m for m in models if m is not None]
        self.switched: list = []

    def __enter__(self):
        try:
            from transformers import AttentionInterface
            from transformers.masking_utils import AttentionMaskInterface

            from engine.techniques import local_attention as la
        except ImportError:
            return self
        # the engine's own AttentionInterface function, on the CUDA path
        AttentionInterface.register(EMULATED_LOCAL, functools.partial(la.headroom_local_forward,
                                                                      attend=_flex_local_attention))
        AttentionMaskInterface.register(EMULATED_LOCAL, la._pass_through_mask)
        for model in self.models:
            if getattr(getattr(model, "config", None), "_attn_implementation", None) == "headroom_local":
                la._set_implementation(model, EMULATED_LOCAL)
                self.switched.append(model)
        return self

    def __exit__(self, *exc):
        if self.switched:
            from engine.techniques import local_attention as la

            for model in self.switched:
                la._set_implementation(model, "headroom_local")
        self.switched = []
        return False


def sdpa_saved_bytes_per_layer(b: int, h: int, t: int, d: int, elt: int, backend: str) -> int:
    """Bytes a fused SDPA call adds beyond q/k/v: the output and the fp32 logsumexp."""
    if backend == "flash":
        return b * t * h * d * elt + b * h * t * 4
    return b * t * h * d * elt + b * h * _round(t, 32) * 4


__all__ = [
    "CudaEmulation",
    "EfficientAttentionEmu",
    "FlexAttentionEmu",
    "FlashAttentionEmu",
    "choose_backend",
    "cuda_local_attention",
    "sdpa_saved_bytes_per_layer",
]
