"""Greedy generation over the model's own KV cache objects: the loop the measured run, the traced
estimate (on meta tensors) and the exported script share.

``greedy_generate`` does what ``model.generate(do_sample=False)`` does for a decoder with a cache
(``transformers/generation/utils.py``: ``_sample``): a prefill forward on the prompt asking for the
last position's logits only (``logits_to_keep=1``, as generate sets when the model takes it),
the fp32 copy of those logits (``outputs.logits[:, -1].to(copy=True, dtype=torch.float32)``), the
argmax, the token appended to the sequences and one column to the attention mask; then one
forward per new token on the cache. Position ids follow the attention mask (left padding), as
generate's do. It does not stop at an end-of-sequence token: the run is sized for N tokens.
``tests/test_generate.py`` checks that its tokens equal ``model.generate``'s.

``make_cache`` builds the cache class from the model's config, so sliding-window and hybrid
configs get their sliding layers (``DynamicSlidingWindowLayer``, ``StaticSlidingWindowLayer``).
Torch and transformers only: the exported script embeds these functions' source.
"""

from __future__ import annotations

import inspect

import torch


def make_cache(model, kind, max_len):
    """transformers' DynamicCache or StaticCache (``max_len`` tokens) for the model's config."""
    from transformers import DynamicCache, StaticCache

    if kind == "static":
        return StaticCache(config=model.config, max_cache_len=max_len)
    return DynamicCache(config=model.config)


def cache_layers(cache):
    """The cache's per-layer (keys, values) tensors that exist so far."""
    out = []
    for layer in getattr(cache, "layers", ()):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor):
            out.append((keys, values))
    return out


def cache_bytes(cache):
    """Sum of the cache tensors' nbytes (what the cache holds; a sliding layer's tensors may be
    views of a slightly larger storage, see ``cache_storage_bytes``)."""
    return sum(k.nbytes + v.nbytes for k, v in cache_layers(cache))


def cache_storage_bytes(cache):
    """Bytes of the distinct storages behind the cache tensors (what the allocator holds)."""
    seen = {}
    for pair in cache_layers(cache):
        for t in pair:
            st = t.untyped_storage()
            seen[st.data_ptr() if t.device.type != "meta" else id(st)] = st.nbytes()
    return sum(seen.values())


def _cache_kwarg(model):
    """transformers 5.2x names the forward's cache ``cache`` (``past_key_values`` before)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def forward_kwargs(model, cache):
    """The forward's cache arguments: the cache, use_cache, and the last position's logits only
    where the model takes ``logits_to_keep`` (as generate asks)."""
    kwargs = {_cache_kwarg(model): cache, "use_cache": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    return kwargs


def next_tokens(model, step_ids, mask, position_ids, kwargs):
    """One forward over the cache and the greedy choice: (B,) token ids."""
    out = model(input_ids=step_ids, attention_mask=mask, position_ids=position_ids, **kwargs)
    logits = out.logits[:, -1].to(copy=True, dtype=torch.float32)  # (B, V), as generate copies it
    del out
    return torch.argmax(logits, dim=-1)  # (B,)


def greedy_generate(model, input_ids, attention_mask, cache, new_tokens, on_token=None):
    """Greedy decoding of ``new_tokens`` tokens per sequence over ``cache``; returns the
    (B, P + new_tokens) sequences. ``on_token(i)`` runs after new token ``i`` (0: the prefill's)
    is chosen; it may raise to stop."""
    kwargs = forward_kwargs(model, cache)
    sequences = input_ids
    mask = attention_mask
    position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)  # (B, P)
    step_ids = input_ids
    with torch.no_grad():
        for i in range(new_tokens):
            chosen = next_tokens(model, step_ids, mask, position_ids, kwargs)
            sequences = torch.cat([sequences, chosen[:, None]], dim=-1)
            if on_token is not None:
                on_token(i)
            if i + 1 == new_tokens:
                break
            step_ids = chosen[:, None]  # (B, 1)
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
            position_ids = position_ids[:, -1:] + 1
    return sequences


#: What a standalone script needs, in order (besides ``import inspect`` and ``import torch``).
PORTABLE = (make_cache, cache_layers, cache_bytes, cache_storage_bytes, _cache_kwarg, forward_kwargs,
            next_tokens, greedy_generate)


def portable_source():
    """The source of ``PORTABLE``, ready to embed in a script."""
    return "\n\n\n".join(inspect.getsource(obj) for obj in PORTABLE)
