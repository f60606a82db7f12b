"""Assemble a standalone training/inference script from a profile (torch + transformers only).

The script follows DESIGN.md's measured protocol: model built (fp32, or cast for pure bf16/fp16)
on the device, the optimizer with its defaults, N steps of forward + loss + backward + step +
zero_grad(set_to_none=True), peak = max_memory_allocated minus what was allocated before the model,
timings without the first step and with synchronize. It prints one JSON line with the keys of
``headroom measure --json``. Only the code of the techniques the profile selects is written, and
only non-default settings (plus what every run needs) appear as constants.
"""

from __future__ import annotations

import ast
import base64
import datetime
import functools
import inspect
import lzma
import textwrap
from dataclasses import dataclass, field
from typing import Any

import engine
from engine import remote_code, techniques
from engine.errors import BadInput
from engine.export import snippets
from engine.export.facts import DataFacts, ModelFacts, data_facts, model_facts
from engine.export.literals import dict_block, docstring_safe, literal, noqa_long_lines
from engine.measure import probes
from engine.profile import Profile
from engine.techniques.memory_pool import alloc_conf

_AUTOCAST = {"bf16-amp": "torch.bfloat16", "fp16-amp": "torch.float16"}
_PURE = {"bf16": "torch.bfloat16", "fp16": "torch.float16"}
_AUTO_CLASS = {"causal-lm": "AutoModelForCausalLM", "masked-lm": "AutoModelForMaskedLM",
               "classification": "AutoModelForSequenceClassification"}

#: Comments for constants (nanoGPT style: one line saying what the value means).
_COMMENTS = {
    "BATCH": "sequences per optimizer step",
    "SEQ": "longest sequence in tokens (longer texts are truncated)",
    "STEPS": "steps to run; the first is warm-up and left out of the timings",
    "SEED": "data order and initialisation",
    "TEXT_LIMIT": "texts read from the dataset",
    "PAD_MULTIPLE": "pad batch lengths up to a multiple of this",
    "MAX_TOKENS": "token-budget batching: tokens per batch, padding included",
    "BUCKET_MEGABATCHES": "batches per sorted mega-batch (Hugging Face uses 50)",
    "MICRO_BATCHES": "each batch runs as this many micro-batches, gradients accumulated",
    "CHUNK_INPUT": "inference: long inputs run in windows of this many tokens",
    "CHECKPOINT_EVERY": "gradient checkpointing on every k-th transformer block",
    "MLM_PROBABILITY": "fraction of real tokens the masked-LM loss predicts",
}


def _section(title: str) -> str:
    return f"# ----- {title} " + "-" * max(3, 96 - len(title))


@dataclass
class _Script:
    """The pieces of one script, gathered while walking the profile."""

    imports: set[str] = field(default_factory=set)  # "import x" / "from x import y"
    constants: list[str] = field(default_factory=list)  # lines of the settings block
    blocks: list[tuple[str, str]] = field(default_factory=list)  # (section title, code)

    def const(self, name: str, value: Any, comment: str | None = None, *, raw: str | None = None) -> None:
        comment = _COMMENTS.get(name) if comment is None else comment
        line = f"{name} = {raw if raw is not None else literal(value)}"
        if comment:
            line += f"  # {comment}"
        self.constants.append(line)

    def add(self, title: str, code: str) -> None:
        self.blocks.append((title, textwrap.dedent(code).strip("\n")))


@dataclass
class Port:
    """What the techniques add to a script: sections, constants, imports and build_model's calls."""

    sections: list[tuple[str, str]] = field(default_factory=list)  # (title, code), in script order
    constants: list[tuple[str, Any, str, str | None]] = field(default_factory=list)  # name, value, why, raw
    imports: set[str] = field(default_factory=set)
    calls: list[str] = field(default_factory=list)  # lines of build_model after the model exists

    def const(self, name: str, value: Any, comment: str, raw: str | None = None) -> None:
        self.constants.append((name, value, comment, raw))


class ScriptTools:
    """What a technique's ``ScriptHooks`` may use: facts of another model it loads, constants, and
    the lines that build a model the way ``build_model`` does."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.script: _Script | None = None
        self._facts: dict[str, ModelFacts] = {}

    def model_facts(self, name: str) -> ModelFacts:
        if name not in self._facts:
            self._facts[name] = model_facts(self.profile, name)
        return self._facts[name]

    def const(self, name: str, value: Any, comment: str | None = None, *, raw: str | None = None) -> None:
        self.script.const(name, value, comment, raw=raw)

    def model_constants(self, facts: ModelFacts, prefix: str, what: str = "") -> None:
        _model_constants(self.script, facts, prefix, what)

    def build_lines(self, facts: ModelFacts, prefix: str, var: str) -> list[str]:
        return _build_lines(self.profile, facts, prefix, var)


def export_script(profile: Profile, estimate: Any = None, measured: Any = None) -> str:
    """The text of a runnable Python script reproducing ``profile`` (see the module docstring).

    ``estimate`` (EstimateResult or dict) and ``measured`` (MeasureResult or dict) only add their
    peaks to the header.
    """
    from engine.prepare import prepare

    notes = list(prepare(profile).notes)  # the same one-line BadInput as estimate and measure
    if profile.nodes > 1:
        raise BadInput(f"HSDP over {profile.nodes} nodes is planned on paper: the exported script "
                       f"runs one node (set nodes = 1)")
    model = model_facts(profile)
    data = data_facts(profile)
    port = Port()
    hooks = techniques.script_hooks(profile)  # a distillation teacher and its loss
    tools = ScriptTools(profile)
    _embed_technique_sources(port, profile)
    s = _Script()
    s.imports |= {"import argparse", "import gc", "import json", "import os", "import statistics",
                  "import sys", "import time", "import torch", "import transformers",
                  "import weakref", "from torch.utils._python_dispatch import TorchDispatchMode"}
    s.imports |= port.imports
    _constants(s, profile, model, data, port, hooks, tools)
    _data_section(s, profile, model, data)
    _model_section(s, profile, model, port, hooks, tools)
    pool = ""
    if profile.alloc_pool_bytes:
        pool = ("            # A warm pool: allocate POOL_BYTES once and free it; the caching allocator\n"
                "            # keeps the segment reserved and carves later large blocks out of it.\n"
                "            torch.empty(POOL_BYTES, dtype=torch.uint8, device=device)")
    peak = snippets.PEAK_MEMORY.replace("            #POOL#\n", pool + "\n" if pool else "")
    s.imports |= {"import threading", "from typing import NamedTuple"}  # the engine's probes
    probe_code = "\n\n\n".join(_source(obj) for obj in probes.PROBES)
    s.add("memory", probes.portable_source() + "\n\n\n" + probe_code + "\n\n" + peak)
    if profile.mode == "generate":
        from engine.export import generation

        generation.sections(s, profile)
    else:
        _step_section(s, profile, model, hooks, tools)
        _main_section(s, profile, model, hooks)
    if not model.has_tokenizer:  # last: a long blob would bury the code above
        s.add("the fallback tokenizer: its JSON, xz-compressed, base64", _embedded_fallback_tokenizer())
    text = _header(profile, model, estimate, measured, notes) + _imports(s, profile) + "\n"
    text += _section("settings from the Headroom profile (non-defaults, and what every run needs)")
    text += "\n" + "\n".join(s.constants) + "\n"
    for title, code in s.blocks:
        text += "\n\n" + _section(title) + "\n" + code + "\n"
    text += '\n\nif __name__ == "__main__":\n    main()\n'
    return noqa_long_lines(text)


@functools.lru_cache(maxsize=1)
def _embedded_fallback_tokenizer() -> str:
    """``FALLBACK_TOKENIZER_XZ``: the script carries the tokenizer itself, so it runs without Headroom
    (233 KB of JSON become 84 KB of base64; ``b64decode`` skips the line breaks)."""
    from engine.data.tokens import fallback_json

    encoded = base64.b64encode(lzma.compress(fallback_json().encode("utf-8"))).decode("ascii")
    lines = textwrap.wrap(encoded, 100)
    return 'FALLBACK_TOKENIZER_XZ = """\n' + "\n".join(lines) + '\n"""'


# ----- header and imports ------------------------------------------------------------------------
def _peak_of(result: Any) -> int | None:
    if result is None:
        return None
    if isinstance(result, dict):
        value = result.get("peak_allocated_bytes")
    else:
        value = getattr(result, "peak_allocated_bytes", None)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _method_of(result: Any) -> str:
    """Which estimator made ``result`` ("traced" | "analytic"; "" when unknown)."""
    method = result.get("method") if isinstance(result, dict) else getattr(result, "method", "")
    return method if method in ("traced", "analytic") else ""


def _header(profile: Profile, model: ModelFacts, estimate: Any, measured: Any, notes: list[str]) -> str:
    from engine.units import format_bytes

    what = "Train" if profile.is_training else "Run inference with"
    if profile.mode == "generate":
        what = "Generate with"
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    lines = [f"{what} {docstring_safe(model.name if model.kind in ('preset', 'hub') else _short(model.name))} "
             f"as planned by Headroom (profile {docstring_safe(profile.name, 40)}).",
             "",
             f"Generated {today} (UTC) by Headroom {engine.__version__}."]
    lines += textwrap.wrap(f"Settings: {_summary_line(profile)}.", 100)
    est, meas = _peak_of(estimate), _peak_of(measured)
    if est is not None:
        method = _method_of(estimate)
        lines.append(f"Estimated peak allocated memory: {format_bytes(est)}"
                     + (f" ({method} estimate)." if method else "."))
    if meas is not None:
        lines.append(f"Measured peak allocated memory: {format_bytes(meas)}.")
    for note in notes:  # engine-made text about the combination (what saves little, and why)
        lines += textwrap.wrap(f"Note: {_docstring_text(note)}.", 100)
    if model.kind == "preset":
        lines += textwrap.wrap(f"The model is the preset {model.name}: its architecture only, with random "
                               "initial weights (nothing pretrained is loaded).", 100)
    needs = "torch and transformers"
    if profile.is_training and profile.lora:
        needs = "torch, transformers and peft"
    if profile.is_training and (profile.optimizer in ("adamw-8bit", "paged-adamw-8bit", "lion")
                                or profile.quant != "none"):
        needs = needs.replace(" and ", ", ") + " and bitsandbytes"
    lines += [f"Needs only {needs}; Headroom itself is not imported.", "",
              "    python train.py [--steps N] [--device cuda|cpu] [--output-dir DIR] [--dry-run]", "",
              "The last line printed is one JSON object with the keys of `headroom measure --json`",
              "(peak_allocated_bytes, peak_reserved_bytes, device_used_bytes, tokens_per_s, ...)."]
    return '#!/usr/bin/env python3\n"""' + "\n".join(lines) + '\n"""\n\n'


def _docstring_text(text: str) -> str:
    """Engine text for the docstring: no backslashes or quotes that could end it."""
    return str(text).replace("\\", "/").replace('"', "'").replace("\n", " ").rstrip(".")


def _short(path: str) -> str:
    return path.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1] or "model"


def _summary_line(profile: Profile) -> str:
    parts = [f"batch {profile.batch}", f"seq {profile.seq}", profile.precision, f"{profile.padding} padding"]
    if profile.mode == "generate":
        parts = [f"{profile.batch} sequences", f"prompt {profile.prompt_len or 'from the texts'}",
                 f"{profile.new_tokens} new tokens", f"{profile.cache} KV cache", profile.precision]
    if profile.checkpointing and profile.is_training:
        parts.append("checkpointing" + (f" every {profile.checkpoint_every}" if profile.checkpoint_every > 1
                                        else ""))
    if profile.micro_batches > 1:
        parts.append(f"{profile.micro_batches} micro-batches")
    if profile.chunk_input:
        parts.append(f"windows of {profile.chunk_input}")
    if profile.attn != "sdpa":
        parts.append(f"{docstring_safe(profile.attn)} attention")
    if profile.mlp != "default":
        parts.append("GeGLU feed-forward")
    if profile.prune:
        parts.append(f"{docstring_safe(profile.prune)} pruning")
    if profile.ffn_chunks > 1:
        parts.append(f"feed-forward in {profile.ffn_chunks} chunks")
    parts += [h.header(profile) for h in techniques.script_hooks(profile) if h.header is not None]
    return ", ".join(parts)


def _imports(s: _Script, profile: Profile) -> str:
    def key(line: str) -> tuple[bool, str]:
        return (line.startswith("from "), line.split()[1])

    std = sorted((i for i in s.imports if i.split()[1].split(".")[0] not in ("tokenizers", "torch", "transformers")),
                 key=key)
    third = sorted((i for i in s.imports if i not in std), key=key)
    out = ""
    if alloc_conf(profile):
        # The allocator reads its configuration once, when CUDA starts: set it before torch loads.
        std = [i for i in std if i != "import os"]
        out += "import os\n\n" + _alloc_lines(profile) + "\n\n"
        noqa = "  # noqa: E402"
        return out + "\n".join(i + noqa for i in std) + "\n\n" + "\n".join(i + noqa for i in third) + "\n"
    return out + "\n".join(std) + "\n\n" + "\n".join(third) + "\n"


def _alloc_lines(profile: Profile) -> str:
    """The allocator setting, before torch is imported (as ``engine.techniques.memory_pool``)."""
    conf = alloc_conf(profile)
    if conf:
        why = []
        if "expandable_segments" in conf:
            why.append("# Expandable segments grow in place instead of new fixed-size ones.")
        if "max_split_size_mb" in conf:
            why.append(f"# Cached blocks of {profile.alloc_max_split_mib} MiB or more are never split "
                       "(nor given to smaller tensors).")
        return ("\n".join(why) + "\n"
                "# The allocator reads this once, when CUDA starts: set it before torch is imported.\n"
                f'os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "{conf}"')
    return "# pool:SIZE needs no allocator setting: the pool is reserved before the model (PeakMemory)."


# ----- settings ----------------------------------------------------------------------------------
def _constants(s: _Script, profile: Profile, model: ModelFacts, data: DataFacts, port: Port,
               hooks, tools: "ScriptTools") -> None:
    nd = profile.non_defaults()
    if "name" in nd:
        s.const("PROFILE_NAME", profile.name, "")
    s.const("BATCH", profile.batch)
    s.const("SEQ", profile.seq)
    s.const("STEPS", profile.steps)
    s.const("SEED", profile.seed)
    # the run's settings, printed with its result: an import into Headroom checks them (non-defaults)
    # (trust_remote_code stays out: the script never runs a model folder's code, and an import
    # does not compare it)
    settings = {k: v for k, v in profile.non_defaults().items()
                if k not in ("name", "trust_remote_code")}
    block = dict_block("HEADROOM_PROFILE", settings) if settings else "HEADROOM_PROFILE = {}"
    s.const("HEADROOM_PROFILE", None, "", raw=block[len("HEADROOM_PROFILE = "):])
    if profile.mode == "generate":
        from engine.export import generation

        generation.constants(s, profile)
    if data.kind == "builtin":
        s.const("TEXT_LIMIT", data.limit, raw=f"{data.limit:_}")
    else:
        s.const("DATASET", data.path, f"{data.kind} file")
        if data.kind in ("csv", "tsv", "jsonl", "parquet"):
            s.const("TEXT_COLUMN", data.column, "the column holding the text" if data.column is not None
                    else "the file holds plain JSON strings")
        if data.kind in ("csv", "tsv"):
            s.const("DELIMITER", "\t" if data.kind == "tsv" else ",", "")
        if data.kind == "txt":
            s.const("TXT_MODE", data.txt_mode, "one text per line, or per blank-line-separated paragraph")
        s.const("TEXT_LIMIT", data.limit, raw=f"{data.limit:_}")
        from engine.data.files import MAX_TEXT_CHARS

        s.const("MAX_TEXT_CHARS", MAX_TEXT_CHARS, "longer texts are cut here (memory needs at most SEQ "
                "tokens of each)", raw=f"{MAX_TEXT_CHARS:_}")
    if profile.padding != "fixed" and profile.pad_multiple > 1:
        s.const("PAD_MULTIPLE", profile.pad_multiple)
    if profile.padding == "bucketed":
        from engine.batching import BUCKET_MEGABATCHES

        s.const("BUCKET_MEGABATCHES", BUCKET_MEGABATCHES)
    if profile.padding == "token-budget":
        budget = profile.max_tokens or profile.batch * profile.seq
        if budget < profile.seq:
            raise BadInput(f"max_tokens ({budget}) is below seq ({profile.seq}): a full-length sequence "
                           "would not fit in any batch")
        if profile.max_tokens:
            s.const("MAX_TOKENS", budget)
        else:
            s.const("MAX_TOKENS", None, "the default budget: BATCH * SEQ", raw="BATCH * SEQ")
    if profile.is_training and profile.micro_batches > 1:
        s.const("MICRO_BATCHES", profile.micro_batches)
    if not profile.is_training and profile.chunk_input:
        s.const("CHUNK_INPUT", profile.chunk_input)
    if profile.is_training and profile.checkpointing and profile.checkpoint_every > 1:
        s.const("CHECKPOINT_EVERY", profile.checkpoint_every)
    if profile.precision in _AUTOCAST:
        s.const("AUTOCAST_DTYPE", None, f"{profile.precision}: matmuls in reduced precision, fp32 weights",
                raw=_AUTOCAST[profile.precision])
    if profile.precision in _PURE:
        s.const("WEIGHT_DTYPE", None, f"pure {profile.precision}: weights, gradients and optimizer state",
                raw=_PURE[profile.precision])
    if profile.attn == "eager":
        s.const("ATTENTION", profile.attn, "attention implementation")
    if profile.alloc_pool_bytes:
        s.const("POOL_BYTES", profile.alloc_pool_bytes,
                f"alloc {docstring_safe(profile.alloc)}: reserved before the run")
    if profile.is_training and profile.optimizer != "adamw":
        s.const("OPTIMIZER", profile.optimizer, "the settings Headroom measures (make_optimizer)")
    if profile.is_training and model.task == "masked-lm":
        s.const("MLM_PROBABILITY", 0.15)
    for name, value, comment, raw in port.constants:
        s.const(name, value, comment, raw=raw)
    tools.script = s
    for h in hooks:
        if h.constants is not None:
            h.constants(profile, tools)
    _model_constants(s, model, "MODEL")
    for h in hooks:
        if h.model_constants is not None:
            h.model_constants(profile, tools)


def _model_constants(s: _Script, model: ModelFacts, prefix: str, what: str = "") -> None:
    if model.kind == "preset":
        s.const(f"{prefix}_TYPE", model.model_type, "")
        s.constants.append(dict_block(f"{prefix}_CONFIG", model.config,
                                      f"{what}{docstring_safe(model.name)}'s config.json: architecture "
                                      "only, the weights start random"))
    elif model.kind == "hub":
        s.const(f"{prefix}_ID", model.hub_id, what + "a Hugging Face Hub model (HF_TOKEN for a gated one)" + (
            ", with its safetensors weights" if model.has_weights else ": config and tokenizer, random weights"))
        s.const(f"{prefix}_REVISION", model.hub_commit, "the commit Headroom planned with")
    else:
        s.const(f"{prefix}_DIR", model.folder, what + "a local model folder" + (
            " with safetensors weights" if model.has_weights else " (config only: random weights)"))


# ----- data --------------------------------------------------------------------------------------
def _data_section(s: _Script, profile: Profile, model: ModelFacts, data: DataFacts) -> None:
    if data.kind == "builtin":
        from engine.data import corpus

        s.imports |= {"import ast", "import sysconfig", "from pathlib import Path"}
        s.const("MIN_WORDS", corpus.MIN_WORDS, "shorter docstrings are labels (\"Return self.\"), not text")
        skip = ",\n    ".join(literal(name) for name in sorted(corpus.STDLIB_SKIP_DIRS))
        s.const("STDLIB_SKIP_DIRS", None, "stdlib folders of tests, vendored code or data, not documentation",
                raw="(\n    " + skip + ",\n)")
        code = "\n\n\n".join(textwrap.dedent(inspect.getsource(fn)).strip("\n")
                              for fn in (corpus.stdlib_files, corpus.docstrings, corpus.build_corpus))
        s.add("data: the built-in sample corpus", code + "\n\n" + snippets.BUILTIN_TEXTS)
    else:  # a file: the engine's own streams (engine.data.files), around the script's open()
        from engine.data import files

        if data.kind == "txt":
            reader = snippets.TXT
        elif data.kind in ("csv", "tsv"):
            s.imports.add("import csv")
            reader = snippets.CSV
        elif data.kind == "jsonl":
            named = bool(profile.text_column.strip())  # plain JSON strings are texts unless named
            reader = snippets.JSONL.replace("#STRINGS#", str(not named))
        else:
            reader = snippets.PARQUET
        s.add("data", _reached_source(files.PORTABLE, reader) + "\n\n" + reader)
    s.add("tokenizer", _tokenizer_code(s, model))
    if profile.mode == "generate":  # one batch of B prompts, no batching strategy
        from engine.export import generation

        s.add("prompts", generation.prompts_section())
        return
    from engine.batching import plan_padded_batches

    args = ["lengths", f'"{profile.padding}"', "BATCH", "SEQ", "SEED"]
    if profile.padding != "fixed" and profile.pad_multiple > 1:
        args.append("pad_multiple=PAD_MULTIPLE")
    if profile.padding == "token-budget":
        args.append("max_tokens=MAX_TOKENS")
    if profile.padding == "bucketed":
        args.append("megabatches=BUCKET_MEGABATCHES")
    plan = "plan_padded_batches(" + ", ".join(args) + ")"
    from engine.batching import pad_batch

    code = (_source(plan_padded_batches) + "\n\n\n" + _source(pad_batch) + "\n\n"
            + snippets.MAKE_BATCHES.replace("#PLAN#", plan))
    s.add(f"batching: {profile.padding} padding", code)


def _tokenizer_code(s: _Script, model: ModelFacts) -> str:
    """``load_tokenizer()``: the engine's own loaders (engine.data.tokens), called on the model's
    folder or Hub id when it has a tokenizer (its code never runs), else on the embedded fallback."""
    from engine.data import tokens

    def source(*fns) -> str:
        return "\n\n\n".join(textwrap.dedent(inspect.getsource(fn)).strip("\n") for fn in fns)

    if model.has_tokenizer:
        if model.kind == "hub":
            where, call = "Hub model's", "load_model_tokenizer(MODEL_ID, MODEL_REVISION, local_files_only=False)"
        else:
            where, call = "model folder's", "load_model_tokenizer(MODEL_DIR)"
        glue = (f'def load_tokenizer():\n    """The {where} own tokenizer, with a pad token."""\n'
                f"    return with_pad_token({call})")
        return source(tokens.load_model_tokenizer, tokens.with_pad_token) + "\n\n\n" + glue
    s.imports |= {"import base64", "import lzma"}
    s.constants.append(dict_block("FALLBACK_SPECIAL_TOKENS", tokens.FALLBACK_SPECIAL_TOKENS,
                                  "the fallback tokenizer's special tokens"))
    glue = ('def load_tokenizer():\n    """Headroom\'s byte-level BPE, embedded at the end of this script (the '
            'model has no tokenizer\n    of its own; memory depends on token counts, not on which tokens '
            'they are)."""\n'
            "    text = lzma.decompress(base64.b64decode(FALLBACK_TOKENIZER_XZ)).decode()\n"
            "    return tokenizer_from_json(text, FALLBACK_SPECIAL_TOKENS)")
    return source(tokens.tokenizer_from_json) + "\n\n\n" + glue


# ----- model -------------------------------------------------------------------------------------
def _source(obj: Any) -> str:
    return textwrap.dedent(inspect.getsource(obj)).strip("\n")


def _reached_source(definitions, code: str) -> str:
    """The source of the ``definitions`` that ``code`` reaches (in their order)."""
    sources = {d.__name__: _source(d) for d in definitions}
    return "\n\n\n".join(sources[name] for name in _reached(sources, [code]))


def _names(code: str) -> set[str]:
    """The names a piece of code reads (calls, bases, annotations, default values)."""
    return {node.id for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Name)}


def _reached(sources: dict[str, str], calls: list[str]) -> list[str]:
    """The definitions (name -> source, in order) that ``calls`` reach, directly or through
    each other: a technique lists its portable functions, the script keeps what its call runs."""
    wanted, todo = set(), set().union(*(_names(c) for c in calls)) if calls else set(sources)
    while todo:
        name = todo.pop()
        if name in sources and name not in wanted:
            wanted.add(name)
            todo |= _names(sources[name])
    return [name for name in sources if name in wanted]


def _embed_technique_sources(port: Port, profile: Profile) -> None:
    """Techniques that declare their script code as functions (``Technique.export_source``): the
    functions' own source goes into the script (the code measure runs, not a copy), those its
    ``export_calls`` reach; the calls are the lines build_model runs once the model exists."""
    active = techniques.active(profile)
    embedded: dict[str, str] = {}  # name -> source, across techniques (one definition per name)
    for technique in active:
        if technique.export_source is None:
            continue
        calls = technique.export_calls(profile) if technique.export_calls is not None else []
        sources = {fn.__name__: textwrap.dedent(inspect.getsource(fn)).strip("\n")
                   for fn in technique.export_source()}
        kept = _reached(sources, calls)
        for name in kept:
            if embedded.setdefault(name, sources[name]) != sources[name]:
                raise RuntimeError(f"two techniques export different definitions of {name}")
        port.sections.append((technique.title, "\n\n\n".join(sources[name] for name in kept)))
        if technique.export_constants is not None:
            for name, value, comment in technique.export_constants(profile):
                port.const(name, value, comment)
    # build_model's calls in the order build_model applies the techniques (apply_rank)
    for technique in sorted(active, key=lambda t: t.apply_rank):
        if technique.export_source is not None and technique.export_calls is not None:
            port.calls.extend(technique.export_calls(profile))


def _model_section(s: _Script, profile: Profile, model: ModelFacts, port: Port, hooks,
                   tools: "ScriptTools") -> None:
    if any("transformer_blocks(" in code for _, code in port.sections):
        s.add("transformer blocks", _blocks_source())
    for title, code in port.sections:
        s.add(f"technique: {title}", code)
    lines = ["def build_model(device):",
             '    """The model with its task head, built directly on the device'
             + (', then the profile\'s techniques."""' if port.calls else '."""')]
    lines += _build_lines(profile, model, "MODEL", "model")
    lines += [f"    {call}" for call in port.calls]
    if profile.mode == "generate":
        lines.append("    model.config.use_cache = True  # generation keeps every layer's keys and values")
    else:
        lines.append("    model.config.use_cache = False  # a scoring forward: no key/value cache is kept")
    lines.append("    model.train()" if profile.is_training else "    model.eval()")
    lines.append("    return model")
    code = "\n".join(lines)
    for h in hooks:
        if h.model_code is not None:
            code += "\n\n\n" + h.model_code(profile, tools)
    s.add("model", code)


def _blocks_source() -> str:
    """The engine's own block finder, for techniques whose code walks the blocks."""
    import inspect

    from engine.models import transformer_blocks

    return textwrap.dedent(inspect.getsource(transformer_blocks)).strip("\n")


def _stored_in_half(facts: ModelFacts) -> bool:
    """Whether transformers may build or load the model in half precision (the config's
    torch_dtype; for weights without one, the checkpoint's), while the planned run keeps fp32."""
    declared = facts.config.get("torch_dtype", facts.config.get("dtype"))
    if isinstance(declared, str):
        return declared not in ("float32", "fp32", "auto")
    return facts.has_weights


def _build_lines(profile: Profile, facts: ModelFacts, prefix: str, var: str) -> list[str]:
    """Body lines building one model (as ``engine.models.build_model`` does, techniques aside)."""
    cls = _AUTO_CLASS[facts.task]
    attn = "ATTENTION" if profile.attn == "eager" else '"sdpa"'
    trust = ", trust_remote_code=True" if remote_code.profile_granted(profile) else ""
    lines = []
    if facts.kind == "preset":
        lines.append(f"    config = transformers.CONFIG_MAPPING[{prefix}_TYPE].from_dict({prefix}_CONFIG)")
    elif facts.kind == "hub":  # a Hub repository's code never runs (no trust_remote_code)
        lines.append(f"    config = transformers.AutoConfig.from_pretrained({prefix}_ID, revision={prefix}_REVISION)")
        trust = ""
    else:
        lines.append(f"    config = transformers.AutoConfig.from_pretrained({prefix}_DIR, "
                     f"local_files_only=True{trust})")
    if facts.task == "classification":
        lines.append("    config.num_labels = 2")
        lines.append("    if config.pad_token_id is None:")
        lines.append("        config.pad_token_id = config.eos_token_id or 0")
    if facts.has_weights and facts.kind == "hub":
        lines += [f"    {var} = transformers.{cls}.from_pretrained(",
                  f"        {prefix}_ID, revision={prefix}_REVISION, config=config, use_safetensors=True,",
                  f"        attn_implementation={attn}).to(device)"]
    elif facts.has_weights:
        lines += [f"    {var} = transformers.{cls}.from_pretrained(",
                  f"        {prefix}_DIR, config=config, local_files_only=True, use_safetensors=True,",
                  f"        attn_implementation={attn}{trust}).to(device)"]
    else:
        lines += ["    with torch.device(device):",
                  (f"        {var} = transformers.{cls}.from_config(config, "
                   f"attn_implementation={attn}{trust})")]
    if profile.precision in _PURE:
        lines.append(f"    {var}.to(WEIGHT_DTYPE)")
    elif _stored_in_half(facts):
        lines.append(f"    {var}.to(torch.float32)  # transformers follows the config\'s half-precision "
                     "torch_dtype; the plan keeps fp32 weights")
    return lines


# ----- one step ----------------------------------------------------------------------------------
def _targets_code(profile: Profile, model: ModelFacts) -> str:
    if not profile.is_training:
        return ""
    if model.task == "causal-lm":
        return textwrap.dedent('''
            def add_targets(input_ids, attention_mask, index):
                """Next-token targets (the model shifts them); padding ignored (-100)."""
                return input_ids, attention_mask, input_ids.masked_fill(attention_mask == 0, -100)  # (B, T)
        ''').strip("\n")
    if model.task == "masked-lm":
        return textwrap.dedent('''
            def add_targets(input_ids, attention_mask, index, mask_token_id):
                """Masked-LM: a seeded MLM_PROBABILITY of the real tokens become the mask token and are
                predicted; everything else is ignored (-100)."""
                generator = torch.Generator().manual_seed(SEED * 1_000_003 + index)
                draw = torch.rand(input_ids.shape, generator=generator)  # (B, T)
                chosen = (draw < MLM_PROBABILITY) & (attention_mask == 1)
                if not chosen.any():
                    chosen[0, 0] = True  # at least one target, or the loss is undefined
                labels = input_ids.masked_fill(~chosen, -100)  # (B, T)
                return input_ids.masked_fill(chosen, mask_token_id), attention_mask, labels
        ''').strip("\n")
    return textwrap.dedent('''
        def add_targets(input_ids, attention_mask, index):
            """Sequence classification: a seeded random class (of 2) per sequence."""
            generator = torch.Generator().manual_seed(SEED * 1_000_003 + index)
            return input_ids, attention_mask, torch.randint(0, 2, (input_ids.shape[0],), generator=generator)
    ''').strip("\n")


def _step_section(s: _Script, profile: Profile, model: ModelFacts, hooks, tools: "ScriptTools") -> None:
    amp = profile.precision in _AUTOCAST
    scaler = profile.precision == "fp16-amp" and profile.is_training
    autocast = "torch.autocast(device.type, dtype=AUTOCAST_DTYPE)"
    if profile.is_training:
        code = _targets_code(profile, model) + "\n\n\n"
        for h in hooks:
            if h.step_code is not None:
                code += h.step_code(profile, tools) + "\n\n\n"
        args = _step_args(hooks, scaler)
        if profile.micro_batches > 1:
            doc = ("One optimizer step over MICRO_BATCHES micro-batches (row slices of the batch),\n"
                   "    gradients accumulated. Inputs are copied to the device inside the step.")
            body = ["    parts = list(zip(*(t.tensor_split(min(MICRO_BATCHES, len(t))) for t in batch)))",
                    "    total = 0.0",
                    "    for input_ids, attention_mask, labels in parts:"]
            indent = "        "
            divide = " / len(parts)"
        else:
            doc = ("One training step: forward, loss, backward, optimizer step, gradients freed.\n"
                   "    Inputs are copied to the device inside the step, as in a real loop.")
            body = ["    input_ids, attention_mask, labels = batch"]
            indent = "    "
            divide = ""
        for h in hooks:
            if h.step_doc:
                doc += "\n    " + h.step_doc.replace("\n", "\n    ")
        body.append(f"{indent}input_ids, attention_mask, labels = (t.to(device) for t in "
                    "(input_ids, attention_mask, labels))")
        inner = indent + "    " if amp else indent
        if amp:
            body.append(f"{indent}with {autocast}:")
        loss_hook = next((h.loss_lines for h in hooks if h.loss_lines is not None), None)
        if loss_hook is not None:
            body += loss_hook(inner, "input_ids=input_ids, attention_mask=attention_mask", divide)
        else:
            call = "model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)"
            body += [f"{inner}# Only the loss is kept: the logits are freed before backward.",
                     f"{inner}loss = {call}.loss{divide}"]
        body.append(f"{indent}{'scaler.scale(loss)' if scaler else 'loss'}.backward()")
        if profile.micro_batches > 1:
            body.append(f"{indent}total += loss.item()")
        if scaler:
            body += ["    scaler.step(optimizer)", "    scaler.update()"]
        else:
            body.append("    optimizer.step()")
        body.append("    optimizer.zero_grad(set_to_none=True)")
        body.append("    return total" if profile.micro_batches > 1 else "    return loss.item()")
        code += f"def train_step({', '.join(args)}):\n    \"\"\"{doc}\"\"\"\n" + "\n".join(body)
        s.add("one training step", code)
        return
    lines = ["@torch.no_grad()", "def infer_step(model, batch, device):"]
    if profile.chunk_input:
        lines += ['    """Forward only; long inputs run as consecutive windows of CHUNK_INPUT tokens,',
                  '    one at a time, so only one window\'s activations are alive."""',
                  "    input_ids, attention_mask = batch",
                  "    for start in range(0, input_ids.shape[1], CHUNK_INPUT):",
                  "        window = slice(start, start + CHUNK_INPUT)",
                  "        ids = input_ids[:, window].to(device)  # (B, W)",
                  "        mask = attention_mask[:, window].to(device)  # (B, W)"]
        call = "model(input_ids=ids, attention_mask=mask)"
        indent = "        "
    else:
        lines += ['    """Forward only: no gradients, no activations kept for backward."""',
                  "    input_ids, attention_mask = (t.to(device) for t in batch)"]
        call = "model(input_ids=input_ids, attention_mask=attention_mask)"
        indent = "    "
    if amp:
        lines += [f"{indent}with {autocast}:", f"{indent}    outputs = {call}"]
    else:
        lines.append(f"{indent}outputs = {call}")
    lines.append(f"{indent}del outputs")
    s.add("one inference step", "\n".join(lines))


# ----- main --------------------------------------------------------------------------------------
def _step_args(hooks, scaler: bool) -> list[str]:
    """train_step's parameters: the model, the techniques' extra models, the optimizer, ..."""
    extras = [name for h in hooks for name in h.extra_models]
    return ["model", *extras, "optimizer", *(["scaler"] if scaler else []), "batch", "device"]


def _main_section(s: _Script, profile: Profile, model: ModelFacts, hooks) -> None:
    train = profile.is_training
    dp = profile.shard != "none"  # data parallel (engine.techniques.sharding): runs under torchrun
    scaler = profile.precision == "fp16-amp" and train
    if train and profile.optimizer != "adamw":
        import inspect

        from engine.optimizers import make_optimizer

        s.add("optimizer", textwrap.dedent(inspect.getsource(make_optimizer)).strip("\n"))
    parse = textwrap.dedent('''
        def parse_args():
            parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
            parser.add_argument("--steps", type=int, default=STEPS, help="steps (the first is warm-up)")
            parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
            parser.add_argument("--output-dir", help="save the WHAT model here (safetensors)")
            parser.add_argument("--dry-run", action="store_true", help="build everything and run one step")
            return parser.parse_args()
    ''').strip("\n").replace("WHAT", "trained" if train else "built")
    if train and profile.lora:  # the adapter is small: saved unless told otherwise
        parse = parse.replace('parser.add_argument("--output-dir", help="save the trained model here (safetensors)")',
                              'parser.add_argument("--output-dir", default="headroom-output",\n'
                              '                        help="save the trained LoRA adapter here (peft, safetensors)")')
    lines = [
        "def main():",
        "    args = parse_args()",
        "    started = time.perf_counter()",
        "    device = torch.device(args.device)",
        *(["    device = init_data_parallel(device)  # one rank of torchrun --nproc-per-node GPUS"]
          if dp else []),
        "    steps = 1 if args.dry_run else args.steps",
        "",
        "    tokenizer = load_tokenizer()",
        "    encoded = tokenizer(load_texts(), add_special_tokens=True, verbose=False)[\"input_ids\"]",
        "    batches = make_batches([ids[:SEQ] for ids in encoded], tokenizer.pad_token_id)",
        "    batches = [batches[step % len(batches)] for step in range(steps)]  # cycled if too few",
    ]
    if train:
        extra = ", tokenizer.mask_token_id" if model.task == "masked-lm" else ""
        lines.append(f"    batches = [add_targets(*batch, step % len(batches){extra}) "
                     "for step, batch in enumerate(batches)]")
    lines += [
        "",
        "    memory = PeakMemory(device)  # the baseline: nothing of the model exists yet",
        "    torch.manual_seed(SEED)",
        "    model = build_model(device)",
    ]
    if dp:
        lines.append("    model = wrap_data_parallel(model, SHARD, device, bucket_cap_mb=BUCKET_CAP_MB, "
                     "reshard_after_forward=RESHARD_AFTER_FORWARD, offload=OFFLOAD, "
                     "param_dtype=MP_PARAM_DTYPE, reduce_dtype=MP_REDUCE_DTYPE)")
    extras = [name for h in hooks for name in h.extra_models]
    for name in extras:
        lines.append(f"    {name} = build_{name}(device)  # after the student: the random stream of measure")
    if train:
        if dp and profile.offload == "optimizer":
            lines.append(f"    optimizer = CpuOffloadedOptimizer(model.parameters(), "
                         f"{profile.optimizer!r})  # state and step on the CPU")
        elif profile.optimizer == "adamw":
            lines.append("    optimizer = torch.optim.AdamW(model.parameters())  # torch's defaults "
                         "for the device")
        else:
            lines.append("    optimizer = make_optimizer(OPTIMIZER, [p for p in model.parameters() "
                         "if p.requires_grad])")
        if scaler:
            lines.append("    scaler = torch.amp.GradScaler(device.type)  # fp16 gradients need loss scaling")
    lines += [
        f"    memory.start({', '.join(['model', *extras])})",
        *(["    resizes = FsdpStorageTracking(memory.tracker).__enter__()  # FSDP2's gathers, on CPU"]
          if dp and profile.shard == "fsdp2" else []),
        "    step_times, losses = [], []" if train else "    step_times = []",
        "    for batch in batches:",
        "        memory.sync()",
        "        begin = time.perf_counter()",
    ]
    if train:
        lines.append(f"        losses.append(train_step({', '.join(_step_args(hooks, scaler))}))")
    else:
        lines.append("        infer_step(model, batch, device)")
    lines += [
        "        memory.sync()",
        "        step_times.append(time.perf_counter() - begin)",
        "    memory.stop()",
        *(["    resizes.__exit__(None, None, None)"] if dp and profile.shard == "fsdp2" else []),
        "",
        "    timed = slice(1, None) if steps > 1 else slice(None)  # the first step is warm-up",
        "    seconds = sum(step_times[timed])",
        "    real_tokens = sum(int(batch[1].sum()) for batch in batches[timed])",
        "    padded_tokens = sum(batch[0].numel() for batch in batches[timed])",
        "    result = {",
        '        "device": device.type,',
        '        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",',
        "        **memory.result(),",
        '        "step_time_s": statistics.median(step_times[timed]),',
        '        "tokens_per_s": padded_tokens / seconds,',
        '        "useful_tokens_per_s": real_tokens / seconds,',
        '        "real_tokens": real_tokens,',
        '        "padded_tokens": padded_tokens,',
        '        "steps": steps,',
        '        "params": sum(p.numel() for p in model.parameters()),',
        '        "first_step_s": step_times[0],',
        '        "distinct_shapes": len({tuple(batch[0].shape) for batch in batches}),',
    ]
    if train:
        lines += ['        "losses": losses,', '        "loss": losses[-1],']
    else:
        lines += ['        "losses": [],', '        "loss": None,']
    lines += [
        '        "elapsed_s": time.perf_counter() - started,',
        '        "profile": HEADROOM_PROFILE,  # the settings (non-defaults): Headroom checks them on import',
        "    }",
        "    if args.output_dir:",
        "        model.save_pretrained(args.output_dir, safe_serialization=True)",
        # earlier output first, then the JSON line in one write: torchrun's ranks share one pipe
        # (a line of at most PIPE_BUF bytes written at once is never interleaved with another's);
        # print() writes the text and its newline apart, which unbuffered (write-through) stdout
        # sends as two writes: another rank's line then lands between them
        "    sys.stdout.flush()",
        '    sys.stdout.write(json.dumps(result) + "\\n")',
        "    sys.stdout.flush()",
    ]
    if dp:  # every rank prints its own line; FSDP2's shards are not saved whole here
        at = lines.index('        "profile": HEADROOM_PROFILE,  # the settings (non-defaults): Headroom checks them on import')
        lines[at:at] = ['        "rank": torch.distributed.get_rank(),',
                        '        "world_size": torch.distributed.get_world_size(),']
        at = lines.index("    if args.output_dir:")
        lines[at:at + 2] = [
            "    if args.output_dir and torch.distributed.get_rank() == 0 and SHARD == \"ddp\":",
            "        model.module.save_pretrained(args.output_dir, safe_serialization=True)",
            "    # FSDP2's shards are saved with torch.distributed.checkpoint, not here"]
        lines += ["    torch.distributed.destroy_process_group()"]
    s.add("main", parse + "\n\n\n" + "\n".join(lines))
