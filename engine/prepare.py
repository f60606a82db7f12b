"""prepare(profile) -> Prepared: the single gate every entry point goes through.

Estimate, measure, plan, export, compare and the app call ``prepare`` first, so they refuse the
same profiles with the same one-line BadInput: the profile's own rules (``engine.profile.validate``:
types, ranges, grammar, rules between fields), then the model's (its config loads without running
code, the per-forward length fits its positions), then every active technique's ``check``
(``engine.techniques``: rules that need the config, such as a teacher sharing the vocabulary, and
notes on combinations that work but save little).

Prepared results are cached per profile (profiles are frozen and hashable; configs are read
from a cache keyed by the file's mtime), so calling ``prepare`` again is cheap. The config in a
Prepared is shared: read it, never change it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine import techniques
from engine.errors import BadInput
from engine.profile import Profile, validate

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class Prepared:
    profile: Profile  # the validated profile
    config: "PretrainedConfig"  # the model's transformers config (shared: do not modify)
    task: str  # resolved head: causal-lm | masked-lm | classification
    family: str  # encoder | decoder
    max_positions: int  # the position limit, a distillation teacher's included (0 = none)
    per_forward: int  # tokens one forward sees (the input window when chunking inputs)
    active: tuple[str, ...]  # names of the techniques the profile switches on, registry order
    notes: tuple[str, ...]  # combinations that work but save little, in registry order


def prepare(profile: Profile) -> Prepared:
    """Validate ``profile`` against itself, its model and every technique; BadInput (one line)."""
    return _prepare(validate(profile))


def _window_hint(profile: Profile) -> str:
    """How to go beyond the position limit in this mode: the techniques that shorten a forward."""
    flags = [f"{f.cli_flag} {f.metavar or 'N'}" for t in techniques.registry() if t.forward_tokens
             for f in t.fields[:1] if f.modes is None or profile.mode in f.modes]
    return f"; use {' or '.join(flags)} for long inputs at inference" if flags else ""


@functools.lru_cache(maxsize=256)
def _prepare(profile: Profile) -> Prepared:
    from engine import gpus, models

    gpus.check_precision(profile)  # bf16 on a T4/V100: one line, fp16 offered
    config = models.load_config(profile.model, profile.trust_remote_code)
    on = techniques.active(profile)
    per_forward = min([profile.seq] + [t.forward_tokens(profile) for t in on if t.forward_tokens])
    limits = [(profile.model, models.max_positions(config) or 0)]
    limits += [t.position_limit(profile) for t in on if t.position_limit is not None]
    for what, limit in limits:
        if limit and per_forward > limit:
            raise BadInput(f"sequence length {per_forward} exceeds {what}'s limit of {limit} "
                           f"positions{_window_hint(profile)}")
    limit = min((x for _, x in limits if x), default=0)
    prepared = Prepared(profile=profile, config=config, task=models.resolve_task(profile, config),
                        family=models.family(config), max_positions=limit, per_forward=per_forward,
                        active=tuple(t.name for t in on), notes=())
    notes: list[str] = []
    for technique in techniques.registry():
        if technique.check is not None and technique.active(profile):
            notes.extend(technique.check(prepared))
    return Prepared(**{**prepared.__dict__, "notes": tuple(notes)})


__all__ = ["Prepared", "prepare"]
