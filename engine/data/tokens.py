"""Tokenizers and tokenization: the model's own tokenizer when it has one, else Headroom's fallback.

A local folder, a Hub snapshot and the packaged MiniLM carry their own tokenizer
(``load_model_tokenizer``: transformers' fast tokenizer, never the folder's code, never a pickle).
The fallback (``engine/resources/tokenizer/fallback.json``, built by
``scripts/build_fallback_tokenizer.py``) is a byte-level BPE with 8192 tokens trained on the
built-in corpus, used only for models without one (the presets are architecture-only): token
counts, not token identities, are what memory depends on. ``tokenizer_info`` says which one a
profile gets (the ``tokenizer`` field of estimate and measure results). ``load_model_tokenizer``,
``tokenizer_from_json`` and ``with_pad_token`` are what the exported script embeds.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from pathlib import Path

from engine.errors import BadInput, Cancelled, exception_line
from engine.resources import RESOURCES

FALLBACK_PATH = RESOURCES / "tokenizer" / "fallback.json"
FALLBACK_VOCAB_SIZE = 8192
#: Special tokens of the fallback tokenizer (ids 0..6 in this order).
FALLBACK_SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "mask_token": "<mask>",
    "cls_token": "<cls>",
    "sep_token": "<sep>",
}

# Texts per tokenizer call: large enough for the Rust side to parallelise, small enough to report
# progress and honour cancel between calls.
_CHUNK = 1024


@functools.lru_cache(maxsize=1)
def fallback_json() -> str:
    """The fallback tokenizer's serialized JSON (``tokenizers.Tokenizer.from_str`` reads it)."""
    try:
        return FALLBACK_PATH.read_text(encoding="utf-8")
    except OSError:
        raise BadInput(f"Headroom's fallback tokenizer is missing ({FALLBACK_PATH}); "
                       "reinstall Headroom or run scripts/build_fallback_tokenizer.py") from None


def fallback_tokenizer():
    """A new ``PreTrainedTokenizerFast`` of the bundled byte-level BPE (no network needed).

    Each call returns a fresh object (built from the cached JSON in a few milliseconds), so callers
    may set attributes on it without affecting anyone else.
    """
    return tokenizer_from_json(fallback_json(), FALLBACK_SPECIAL_TOKENS)


def tokenizer_from_json(text, special_tokens):
    """A fast tokenizer from a serialized ``tokenizers`` JSON (Headroom's fallback BPE) and its special
    tokens. Tokenizers and transformers only: the exported script embeds it."""
    import tokenizers
    import transformers

    backend = tokenizers.Tokenizer.from_str(text)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **special_tokens)
    # No model limit of its own: the profile's seq decides truncation (and silences length warnings).
    tokenizer.model_max_length = 1 << 30
    return tokenizer


def load_model_tokenizer(source, revision=None, local_files_only=True):
    """A model's own tokenizer: ``source`` is its folder, or a Hub id fetched at ``revision``.

    trust_remote_code=False always: a tokenizer_config.json's auto_map never runs the repository's
    code (transformers builds its own fast tokenizer from tokenizer.json, vocab or sentencepiece
    files; nothing is unpickled). Transformers only: the exported script embeds it."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(source, revision=revision,
                                                      local_files_only=local_files_only,
                                                      trust_remote_code=False)


def with_pad_token(tokenizer):
    """``tokenizer`` with a pad token (GPT-2-style tokenizers have none): pad = eos, or a new
    ``<pad>`` when there is no eos either. Changes and returns it. The exported script embeds it."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


#: What the fallback is called in results and the app.
FALLBACK_NAME = "Headroom's fallback byte-level BPE (8192 tokens)"


def tokenizer_info(profile) -> dict[str, str]:
    """Which tokenizer ``tokenizer_for(profile)`` uses, without loading it: ``{"source": "model" |
    "fallback", "model_kind": preset|folder|minilm|hub, "name": ...}`` (results' ``tokenizer``)."""
    from engine import models

    source = models.resolve(profile.model)
    if source.has_tokenizer:
        return {"source": "model", "model_kind": source.kind,
                "name": f"{profile.model}'s own tokenizer"}
    return {"source": "fallback", "model_kind": source.kind, "name": FALLBACK_NAME}


def _model_tokenizer(profile):
    """``engine.models.load_tokenizer(profile)``, or None when that is unavailable or fails softly."""
    try:
        from engine import models
        load = models.load_tokenizer
    except (ImportError, AttributeError):
        return None
    return load(profile)


def tokenizer_for(profile):
    """The model's own tokenizer if it has one, else the fallback; always with a pad token.

    A tokenizer without a pad token (GPT-2's) gets pad = eos on a copy, or a new ``<pad>`` token
    when it has no eos either; the object returned by ``engine.models`` (possibly cached and shared)
    is never modified.
    """
    tok = _model_tokenizer(profile)
    if tok is None:
        return fallback_tokenizer()
    if tok.pad_token is None:
        tok = with_pad_token(copy.deepcopy(tok))
    return tok


def tokenize(texts: Sequence[str], tokenizer, max_length: int | None = None,
             progress: Callable[[float, str], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> list[list[int]]:
    """Token ids of each text, without padding (the batching strategy pads).

    The tokenizer's own special tokens are added (BERT's [CLS]/[SEP]; none for GPT-2), as the model
    would see them. With ``max_length`` each list is truncated to it.
    """
    if max_length is not None and max_length < 1:
        raise BadInput(f"max_length must be >= 1; got {max_length}")
    texts = list(texts)
    out: list[list[int]] = []
    for start in range(0, len(texts), _CHUNK):
        if should_stop is not None and should_stop():
            raise Cancelled("tokenization cancelled")
        try:
            enc = tokenizer(texts[start:start + _CHUNK], add_special_tokens=True,
                            truncation=max_length is not None, max_length=max_length,
                            padding=False, return_attention_mask=False,
                            return_token_type_ids=False, verbose=False)
        except Exception as exc:  # noqa: BLE001 - the tokenizers library raises bare Exception
            msg = exception_line(exc, 160)
            raise BadInput(f"the tokenizer failed on the dataset's texts: {msg}") from None
        out.extend(list(ids) for ids in enc["input_ids"])
        if progress is not None:
            progress(min(1.0, (start + _CHUNK) / max(1, len(texts))), "tokenizing")
    return out
