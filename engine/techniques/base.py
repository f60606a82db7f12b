"""The Technique interface and the ordered registry every consumer iterates.

A technique lives in one module of this package, which defines ``TECHNIQUE = Technique(...)``
(or ``TECHNIQUES = (...)`` for several). Everything about it is declared there:

* ``fields``: the Profile fields it owns (type, default, one-line help, choices, minimum, grammar
  check, CLI flag). ``engine.profile`` builds the frozen Profile dataclass from its core fields
  plus these; ``engine.cli`` makes the flags from them; ``engine.profile.validate`` checks them.
* ``controls``: the GUI's controls, declarative (kind, range, labels, how a profile is shown
  and how the control's value becomes profile changes, when it is enabled); the technique panel
  builds its widgets from them.
* ``explanations``: what it saves and costs, as measured (the panel's note and tooltip).
* ``validate(profile)``: rules between fields that need no model; ``check(prepared)``: rules
  that need the model's config (``engine.prepare``), returning notes. One-line BadInput each.
* ``apply_model(model, profile)``: how it changes the built model (measure, both estimators and
  model facts share it through ``engine.models.build_model``), in ``apply_rank`` order.
* ``analytic_terms``: what the analytic estimator adds for it (``AnalyticTerms``);
  ``analytic_setup``: how it changes the way the formulas run a batch (``AnalyticSetup``: rows and
  tokens per pass, passes per step, attention kernel and window, checkpointed blocks, allocator);
  ``loop``: what the traced step and the measured loop add.
* ``resize(profile, changes)``: its own field changes when a planner changes batch or seq.
* ``export_source`` / ``export_calls`` / ``export_constants``: the functions the exported script
  embeds (their source, ``inspect.getsource``), the lines that call them and the settings those
  lines name.

Discovery: every module on this package's ``__path__`` is imported once (``pkgutil``), so a new
technique is one new module; the registry is ordered by ``Technique.order`` (the panel's order),
model changes by ``apply_rank``. Nothing here imports torch: the app reads texts and controls at
start-up.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from engine.errors import BadInput

if TYPE_CHECKING:
    import torch

    from engine.prepare import Prepared
    from engine.profile import Profile


#: Largest whole number a field takes unless it says otherwise: beyond any real count or size, low
#: enough that every size computed from it stays exact and fast (a 4000-digit batch would not).
DEFAULT_INT_MAXIMUM = 1 << 40
#: Longest text field (a name, a path, a column, a technique's setting): a profile is a form.
MAX_TEXT_FIELD = 4096


def cli_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type`` whose errors say what is wrong in one short line: a parse function's
    BadInput as it is (argparse would print "invalid _memory_cap value"), a number of thousands of
    digits without echoing it."""
    import argparse

    def convert(text: str) -> Any:
        if parse is int and len(text.strip().lstrip("+-")) > 30:
            raise argparse.ArgumentTypeError(f"{text[:20]}... is not a whole number anyone needs "
                                             f"({len(text):,} characters)")
        try:
            return parse(text)
        except BadInput as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = getattr(parse, "__name__", "value")  # argparse: "invalid int value: 'x'"
    return convert


#: How a refusal names a mode ("applies to training only").
_MODE_WORDS = {"train": "training", "infer": "inference", "generate": "generation"}


def _always(profile: "Profile") -> bool:
    return True


@dataclass(frozen=True)
class Field:
    """One Profile field: its record, its validation and its command-line flag."""

    name: str  # the profile field (and JSON key)
    type: type  # int | str | bool | float
    default: Any  # value when not set (a technique is off at its defaults)
    help: str  # one line: what the field holds (field comment, CLI help)
    choices: tuple[Any, ...] | None = None  # allowed values (CLI choices too)
    minimum: int | None = None  # ints: smallest allowed value
    maximum: int | None = None  # ints: largest allowed value (None: DEFAULT_INT_MAXIMUM)
    check: Callable[[Any], None] | None = None  # grammar of compound values: BadInput when wrong
    flag: str | None = None  # CLI flag; None: "--" + name with dashes
    metavar: str | None = None  # CLI metavar
    parse: Callable[[str], Any] | None = None  # CLI text -> value (default: the type)
    after: str | None = None  # field it follows in the record (None: after the previous one)
    modes: tuple[str, ...] | None = None  # modes where a non-default value means something;
    #   elsewhere engine.profile.validate refuses it (check_mode), the panel's mode switch resets it
    mode_hint: str = ""  # what the field is, in the refusal: "micro_batches (gradient accumulation)"
    mode_advice: str = ""  # what to use instead, after the refusal ("for training use micro_batches")
    cli: bool = True  # has a command-line flag
    label: str = ""  # name in summaries ("" = the field name)
    path: bool = False  # names a model or a file: the same run elsewhere has another folder

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def argparse_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"dest": self.name, "default": None, "help": self.help}
        if self.type is bool:
            kwargs["action"] = "store_true"
            return kwargs
        if self.choices is not None and self.parse is None:
            kwargs["choices"] = self.choices
        else:
            kwargs["type"] = cli_type(self.parse or self.type)
        if self.metavar:
            kwargs["metavar"] = self.metavar
        return kwargs

    def validate(self, value: Any) -> None:
        """BadInput (one line) unless ``value`` is of the type, among the choices, within the
        bounds (texts: length, no NUL) and of the grammar."""
        from engine.safe_json import short_repr

        ok = isinstance(value, self.type) and not (self.type is int and isinstance(value, bool))
        if not ok:
            raise BadInput(f"profile field {self.name!r} must be {self.type.__name__}, "
                           f"got {short_repr(value)}")
        if self.type is str:
            if len(value) > MAX_TEXT_FIELD:
                raise BadInput(f"profile field {self.name!r} is {len(value):,} characters long "
                               f"(at most {MAX_TEXT_FIELD:,})")
            if "\x00" in value:
                raise BadInput(f"profile field {self.name!r} holds a NUL character")
        if self.choices is not None and value not in self.choices:
            raise BadInput(f"{self.name} must be one of {', '.join(map(str, self.choices))}; "
                           f"got {short_repr(value)}")
        if self.minimum is not None and value < self.minimum:
            raise BadInput(f"{self.name} must be >= {self.minimum}; got {short_repr(value)}")
        maximum = self.maximum if self.maximum is not None else DEFAULT_INT_MAXIMUM
        if self.type is int and value > maximum:
            raise BadInput(f"{self.name} must be at most {maximum:,}; got {short_repr(value)}")
        if self.check is not None:
            self.check(value)

    def check_mode(self, profile: "Profile") -> None:
        """BadInput (one line) when the field is set in a mode outside ``modes``."""
        if self.modes is None or profile.mode in self.modes:
            return
        if getattr(profile, self.name) == self.default:
            return
        what = f"{self.name} ({self.mode_hint})" if self.mode_hint else self.name
        where = " or ".join(_MODE_WORDS.get(m, m) for m in self.modes)
        advice = f"; {self.mode_advice}" if self.mode_advice else ""
        raise BadInput(f"{what} applies to {where} only{advice}")


@dataclass(frozen=True)
class Control:
    """One GUI control, declared: the technique panel builds the widget and wires it."""

    name: str  # widget attribute on the panel (stable: tests and styles use it)
    kind: str  # check | combo | spin | float | text (an editable combo: a name or a path)
    label: str = ""  # form row label ("" for a check box: its text is the label)
    field: str = ""  # the profile field shown and set (when read/write are not given)
    text: str = ""  # check box text
    choices: dict[Any, str] | Callable[[], dict[Any, str]] | None = None  # combo: value -> label
    low: float = 0  # spin/float range
    high: float = 1 << 20
    step: float = 1
    decimals: int = 2  # float
    special: str = ""  # spin: text shown at the minimum ("off")
    suffix: str = ""  # spin/float unit
    placeholder: str = ""  # text: shown when empty
    tooltip: str = ""
    initial: Any = None  # value before any profile sets it
    read: Callable[["Profile"], Any] | None = None  # value shown for a profile; None: leave as is
    write: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # control values -> changes
    enabled_when: Callable[["Profile"], bool] = _always

    def value_for(self, profile: "Profile") -> Any:
        return self.read(profile) if self.read is not None else getattr(profile, self.field)

    def changes(self, values: dict[str, Any]) -> dict[str, Any]:
        """Profile changes for the current values of the group's controls (by control name)."""
        if self.write is not None:
            return self.write(values)
        return {self.field: values[self.name]}


@dataclass(frozen=True)
class AnalyticTerms:
    """What a technique adds to the analytic estimate of one (B, T) batch (bytes)."""

    weights: int = 0  # persistent bytes counted as weights (e.g. a frozen teacher)
    loss: tuple[int, int, int] | None = None  # (saved logits, forward, backward) at the loss,
    #                                           replacing the plain loss's
    forward_phases: tuple[int, ...] = ()  # extra forward-phase temporaries (a teacher forward)
    layers: int = 0  # transformer blocks its extra models run (the traced estimate's cost)
    rows: tuple[tuple[str, int, int], ...] = ()  # per-layer table rows: (name, params, weight bytes)
    held: int = 0  # bytes kept from the loss through backward, the optimizer step and the next
    #                forward (a loop that keeps the model outputs)
    layer_saved: int = 0  # bytes each transformer block saves for backward beyond the layer model's
    layer_transient: int = 0  # bytes alive inside each block's forward and backward (a dequantized weight)


@dataclass(frozen=True)
class AnalyticSetup:
    """How the analytic estimator's formulas run one (rows, tokens) batch. It starts as the plain
    run and every technique's ``analytic_setup(profile, setup)`` may change it (registry order,
    each deciding from the profile, on or off), so the formulas name no technique's field."""

    rows: int  # rows one forward/backward pass sees (a micro-batch)
    tokens: int  # tokens one forward sees per row (an input window)
    passes: int = 1  # forward/backward passes per optimizer step (gradients accumulate)
    attention: str = "sdpa"  # sdpa | eager
    window: int = 0  # local attention window (0: dense)
    checkpoint_every: int = 0  # 0: no checkpointing; k: every k-th block keeps only its input
    expandable: bool = False  # CUDA allocator: expandable segments
    pool_bytes: int = 0  # CUDA allocator: a pool reserved before the run
    max_split: int = 0  # CUDA allocator: blocks this large are never split (0: no limit)
    notes: tuple[str, ...] = ()  # what the estimate should say about the setting


@dataclass(frozen=True)
class PlanAxis:
    """A quantity of a technique's that the planner searches instead of seq in some modes
    (generation's context: prompt + new tokens, the search running over the prompt)."""

    name: str  # the ``vary`` value ("context")
    modes: tuple[str, ...]  # the modes where it replaces seq
    field: str  # the field the search sets ("prompt_len")
    offset_field: str = ""  # the field added to the searched value when it is reported ("new_tokens")

    def offset(self, profile: "Profile") -> int:
        return int(getattr(profile, self.offset_field)) if self.offset_field else 0


@dataclass(frozen=True)
class LoopHooks:
    """How a technique changes the training step; the measured loop and the traced step share it.

    ``extra_models(profile, device, target)``: frozen models built once beside the student, on
    ``device`` ("meta" for the traced estimate) for a run on ``target``; their weights count as
    weights. ``loss(model, extras, ids, mask, labels, profile)``: the loss, replacing
    ``model(..., labels=labels).loss``; it runs under the step's autocast and keeps only the loss.
    ``keep_outputs``: the loop keeps the forward's output object (``outputs = model(...)``) until
    the next forward has returned, as a hand-written loop that names it does.
    """

    extra_models: Callable[..., list] | None = None
    loss: Callable[..., Any] | None = None
    keep_outputs: bool = False


@dataclass(frozen=True)
class ProcessHooks:
    """How a technique sets up the process a measurement runs in, whatever the profile selects
    (so it can also report settings found in the environment).

    ``environment(profile, env) -> env``: the measure child's environment (variables read when CUDA
    starts); ``configure(profile, notes)``: the same in the measuring process, before anything
    touches CUDA (BadInput when it is too late); ``before_steps(profile, device) -> note``: on the
    clean CUDA device, before the peak counters are reset ("" for nothing done).
    """

    environment: Callable[..., dict] | None = None
    configure: Callable[..., None] | None = None
    before_steps: Callable[..., str] | None = None


@dataclass(frozen=True)
class ScriptHooks:
    """What a technique that changes the training step writes into the exported script (the
    script's side of ``LoopHooks``). Each callable gets the profile and the script's ``tools``
    (``engine.export.script.ScriptTools``: model facts, constants, build lines).

    ``extra_models``: variables ``main`` builds with ``build_<name>(device)`` after the student and
    passes to ``train_step`` and the memory probe; ``constants`` / ``model_constants``: added before
    / after the model's; ``code``: functions for the model section (``build_<name>``) and for the
    step section (the loss); ``loss_lines(indent, inputs, divide)``: the step's lines computing
    ``loss``; ``step_doc``: a sentence for train_step's docstring; ``header``: its phrase in the
    script's first line.
    """

    extra_models: tuple[str, ...] = ()
    constants: Callable[..., None] | None = None
    model_constants: Callable[..., None] | None = None
    model_code: Callable[..., str] | None = None
    step_code: Callable[..., str] | None = None
    loss_lines: Callable[..., list[str]] | None = None
    step_doc: str = ""
    header: Callable[["Profile"], str] | None = None


@dataclass(frozen=True)
class Technique:
    """A memory/speed technique: everything the engine and the app know about it."""

    name: str  # "distillation": its key (explanations, registry lookups)
    title: str  # the panel's group title
    order: float  # registry / panel order (small first)
    fields: tuple[Field, ...] = ()
    controls: tuple[Control, ...] = ()
    explanations: dict[str, str] = field(default_factory=dict)  # key -> paragraph; first: its own
    group: str = ""  # panel group (techniques sharing one box); "" = name
    note_key: Callable[["Profile"], str] | None = None  # which explanation the note shows now
    summary_title: Callable[["Profile"], str] | None = None  # heading in the exported summary
    explain_always: bool = False  # summaries explain it even when off (the batching strategy)
    properties: dict[str, Callable[["Profile"], Any]] = field(default_factory=dict)  # derived views
    active: Callable[["Profile"], bool] = lambda p: False  # the profile switches it on
    validate: Callable[["Profile"], None] | None = None  # cross-field rules (no model)
    check: Callable[["Prepared"], list[str]] | None = None  # rules needing the config; notes
    forward_tokens: Callable[["Profile"], int] | None = None  # tokens one forward sees, when it
    #                                                          changes them (0: unchanged)
    position_limit: Callable[["Profile"], tuple[str, int]] | None = None  # (what, limit) it adds
    model_names: Callable[["Profile"], tuple[str, ...]] | None = None  # other models it loads
    apply_model: Callable[["torch.nn.Module", "Profile"], str | None] | None = None
    apply_rank: int = 0  # order of model changes: structure (GeGLU, pruning) before wrappers
    analytic_terms: Callable[..., AnalyticTerms] | None = None  # (profile, arch, b, t, padded, cuda)
    analytic_setup: Callable[["Profile", AnalyticSetup], AnalyticSetup] | None = None  # on or off
    plan_axes: tuple[PlanAxis, ...] = ()  # what the planner may vary instead of seq
    resize: Callable[["Profile", dict[str, Any]], dict[str, Any]] | None = None  # (profile, new
    #   batch/seq) -> its own field changes that keep the profile valid (the planner's search)
    loop: LoopHooks | None = None  # training-step changes (measure and the traced estimate)
    export_source: Callable[[], list[Callable]] | None = None  # functions the script embeds
    export_calls: Callable[["Profile"], list[str]] | None = None  # lines run after the model build
    export_constants: Callable[["Profile"], list[tuple[str, Any, str]]] | None = None  # (name, value,
    #                                                    comment) of the settings export_calls name
    script: ScriptHooks | None = None  # training-step changes in the exported script
    process: ProcessHooks | None = None  # the measuring process's setup (the CUDA allocator)

    @property
    def group_key(self) -> str:
        return self.group or self.name

    @property
    def explanation(self) -> str:
        return next(iter(self.explanations.values()), "")

    def explanation_key(self, profile: "Profile") -> str:
        """The explanation that fits the profile's setting (the first one by default)."""
        return self.note_key(profile) if self.note_key else next(iter(self.explanations), "")

    def heading(self, profile: "Profile") -> str:
        return self.summary_title(profile) if self.summary_title else self.title


def _technique_module_names() -> list[str]:
    import engine.techniques as pkg

    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)
                  if not m.name.startswith("_") and m.name not in ("base", "explanations"))


@functools.lru_cache(maxsize=1)
def registry() -> tuple[Technique, ...]:
    """Every technique of the modules on ``engine.techniques.__path__``, in ``order``."""
    found: list[Technique] = []
    for name in _technique_module_names():
        mod = importlib.import_module(f"engine.techniques.{name}")
        items = getattr(mod, "TECHNIQUES", None) or (
            (mod.TECHNIQUE,) if hasattr(mod, "TECHNIQUE") else ())
        found.extend(items)
    names = [t.name for t in found]
    if len(set(names)) != len(names):
        raise RuntimeError(f"two techniques share a name: {sorted(names)}")
    return tuple(sorted(found, key=lambda t: (t.order, t.name)))


def get(name: str) -> Technique:
    for t in registry():
        if t.name == name:
            return t
    raise KeyError(name)


def model_techniques() -> tuple[Technique, ...]:
    """Techniques that change the built model, in application order."""
    return tuple(sorted((t for t in registry() if t.apply_model is not None),
                        key=lambda t: (t.apply_rank, t.order)))


def active(profile: "Profile") -> tuple[Technique, ...]:
    return tuple(t for t in registry() if t.active(profile))


def all_fields() -> tuple[Field, ...]:
    return tuple(f for t in registry() for f in t.fields)


def explanations() -> dict[str, str]:
    """Explanation key -> paragraph, every technique's (no torch imported)."""
    out: dict[str, str] = {}
    for t in registry():
        out.update(t.explanations)
    return out


def defaults_changes(profile: "Profile", mode: str) -> dict[str, Any]:
    """Fields that mean nothing in ``mode``, back to their defaults (the panel's mode switch)."""
    out: dict[str, Any] = {}
    for f in all_fields():
        if f.modes is not None and mode not in f.modes and getattr(profile, f.name) != f.default:
            out[f.name] = f.default
    return out


def analytic_setup(profile: "Profile", rows: int, tokens: int) -> AnalyticSetup:
    """The analytic estimator's setting for a (rows, tokens) batch, every technique's changes in."""
    setup = AnalyticSetup(rows=rows, tokens=tokens)
    for t in registry():
        if t.analytic_setup is not None:
            setup = t.analytic_setup(profile, setup)
    return setup


def resized(profile: "Profile", changes: dict[str, Any]) -> dict[str, Any]:
    """``changes`` (batch, seq) plus the techniques' own changes that keep the profile valid."""
    out = dict(changes)
    for t in registry():
        if t.resize is not None:
            out.update(t.resize(profile, changes))
    return out


def plan_axis(name: str) -> PlanAxis | None:
    """The technique's plan axis called ``name`` (None: batch or seq)."""
    return next((a for t in registry() for a in t.plan_axes if a.name == name), None)


def plan_varies(mode: str) -> tuple[str, ...]:
    """What the planner may vary in ``mode``: batch, and seq or the axes that replace it there."""
    axes = tuple(a.name for t in registry() for a in t.plan_axes if mode in a.modes)
    return ("batch", *(axes or ("seq",)))


def loop_hooks(profile: "Profile") -> tuple[LoopHooks, ...]:
    """The loop hooks of the techniques the profile switches on (training only)."""
    if profile.mode != "train":
        return ()
    return tuple(t.loop for t in active(profile) if t.loop is not None)


def process_hooks() -> tuple[ProcessHooks, ...]:
    """Every technique's process setup, in registry order (each decides from the profile)."""
    return tuple(t.process for t in registry() if t.process is not None)


def script_hooks(profile: "Profile") -> tuple[ScriptHooks, ...]:
    """The exported script's hooks of the techniques the profile switches on (training only)."""
    if profile.mode != "train":
        return ()
    return tuple(t.script for t in active(profile) if t.script is not None)


__all__ = ["PlanAxis", "plan_axis", "plan_varies", "AnalyticSetup", "AnalyticTerms", "analytic_setup", "resized", "Control", "Field", "LoopHooks", "ProcessHooks", "process_hooks", "ScriptHooks", "Technique", "script_hooks", "loop_hooks", "active",
           "all_fields",
           "defaults_changes", "explanations", "get", "model_techniques", "registry"]
