"""Headless front end: `headroom estimate|measure|plan|export|compare|inspect` (DESIGN.md's contract).

Every subcommand builds a Profile (from an optional PROFILE.json, then flags), calls the same engine
functions the app calls, and prints either a readable summary or one JSON object (`--json`).
User mistakes print one line on stderr and exit 2; an out-of-memory measured run exits 3.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
import warnings
from typing import Any, Callable, Sequence

import engine
from engine import profile as profile_mod
from engine.errors import BadInput, Cancelled
from engine.prepare import prepare
from engine.profile import Profile
from engine.techniques.base import cli_type

EXIT_BAD_INPUT = 2
EXIT_OOM = 3
EXPORT_FORMATS = ("py", "md", "json")  # headroom export --format: script, summary, profile

#: flag -> profile field: the core fields and every technique's (``engine.techniques``), one table
#: so the CLI, the docs and tests agree.
PROFILE_FLAGS: dict[str, profile_mod.Field] = {f.cli_flag: f for f in profile_mod.FIELDS if f.cli}


#: argparse type for sizes: parse_bytes' own message, not argparse's "invalid ... value".
size_arg = cli_type(profile_mod.parse_bytes)


#: A hook the desktop launcher installs to render comparison PNGs (the engine has no Qt).
png_renderer: Callable[[list[dict[str, Any]], str], None] | None = None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's default prints usage)
        raise BadInput(message)


def _add_profile_flags(p: argparse.ArgumentParser, with_file: bool = True) -> None:
    if with_file:
        p.add_argument("profile", nargs="?", metavar="PROFILE.json", help="start from this profile")
    for flag, field in PROFILE_FLAGS.items():
        p.add_argument(flag, **field.argparse_kwargs())
    p.add_argument("--save", metavar="PROFILE.json", help="write the resulting profile")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--verbose", action="store_true", help="let libraries' warnings through to stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="headroom", description="Memory planner for transformer training and inference.")
    parser.add_argument("--version", action="version", version=f"headroom {engine.__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("estimate", help="predict peak GPU memory (no GPU needed)")
    _add_profile_flags(p)
    p.add_argument("--method", choices=("analytic", "traced", "auto"), default="auto")

    p = sub.add_parser("measure", help="run real steps and measure memory and speed")
    _add_profile_flags(p)
    p.add_argument("--snapshot", metavar="PATH", help="CUDA: write a memory snapshot (memory_viz)")
    p.add_argument("--progress", action="store_true", help="print progress as JSON lines before the result")

    p = sub.add_parser("plan", help="largest batch or sequence that fits a budget; the fastest "
                                    "settings that fit; which GPU")
    _add_profile_flags(p)
    p.add_argument("--budget", type=size_arg, metavar="SIZE",
                   help="device memory to fit (--goal fastest: the --gpu's memory if not given)")
    p.add_argument("--gpus-max", type=int, metavar="N", default=None,
                   help="instead: the fewest GPUs (1, 2, 4, ... up to N) for which one GPU, DDP, "
                        "FSDP2 or FSDP2 + CPU offload fits --budget per GPU (training)")
    p.add_argument("--vary", choices=("batch", "seq", "context"), default="batch",
                   help="batch | seq; generate mode: batch | context (prompt + new tokens)")
    p.add_argument("--method", choices=("analytic", "traced", "auto"), default="analytic",
                   help="estimator of the search (traced/auto re-check the boundary)")
    p.add_argument("--goal", choices=("fit", "fastest"), default="fit",
                   help="fit: the largest --vary that fits; fastest: the settings with the highest "
                        "estimated tokens/s that fit")
    p.add_argument("--which-gpu", action="store_true",
                   help="every catalog GPU: fits or not, estimated tokens/s")
    p.add_argument("--top", type=int, default=5, help="--goal fastest: settings to return")

    p = sub.add_parser("export", help="write a runnable training script for a profile")
    _add_profile_flags(p)
    p.add_argument("-o", "--output", required=True, metavar="train.py")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="py",
                   help="py: standalone script (default); md: README-style summary; json: the profile")

    p = sub.add_parser("compare", help="compare profiles side by side")
    p.add_argument("profiles", nargs="+", metavar="PROFILE.json")
    p.add_argument("--measure", action="store_true", help="also run each profile for real")
    p.add_argument("--png", metavar="out.png")
    p.add_argument("--csv", metavar="out.csv")
    p.add_argument("--json", action="store_true")
    p.add_argument("--verbose", action="store_true", help="let libraries' warnings through to stderr")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the profiles' model folders' own code to run")

    p = sub.add_parser("inspect", help="model facts and dataset length statistics")
    _add_profile_flags(p)

    p = sub.add_parser("calibrate", help="measure this machine's GPU (CUDA context, cuBLAS workspaces) "
                                         "and write a device entry the estimators use for it")
    p.add_argument("--name", default="", help="the entry's name (default: the GPU's catalog key, e.g. "
                                              "h200); --gpu NAME selects it")
    p.add_argument("-o", "--output", metavar="PATH", help="write the entry here (default: the devices folder)")
    p.add_argument("--json", action="store_true", help="print the entry as one JSON object")
    p.add_argument("--verbose", action="store_true", help="let libraries' warnings through to stderr")
    return parser


def profile_from_args(args: argparse.Namespace) -> Profile:
    base = profile_mod.load(args.profile) if getattr(args, "profile", None) else Profile()
    changes = {f.name: getattr(args, f.name) for f in PROFILE_FLAGS.values()
               if getattr(args, f.name, None) is not None}
    return profile_mod.validate(dataclasses.replace(base, **changes))


#: Folders this invocation granted (revoked when ``main`` returns, for in-process callers).
_granted_here: list[Any] = []


def grant_remote_code(profile: Profile) -> Profile:
    """``--trust-remote-code`` given by the user's hand: grant the profile's model folders for this
    invocation (a profile file's own ``trust_remote_code`` only remembers the wish; engine.remote_code)."""
    from engine import remote_code

    for folder in remote_code.model_folders(profile):
        if not remote_code.is_granted(folder):
            remote_code.grant(folder)
            _granted_here.append(folder)
    return profile


def _revoke_granted_here() -> None:
    from engine import remote_code

    while _granted_here:
        remote_code.revoke(_granted_here.pop())


def _emit(obj: dict[str, Any], as_json: bool, human: Callable[[dict[str, Any]], str]) -> None:
    if as_json:
        print(json.dumps(obj, default=str))
    else:
        print(human(obj))


def _stderr_progress(enabled: bool) -> Callable[[float, str], None] | None:
    if not enabled:
        return None

    def progress(fraction: float, message: str) -> None:
        print(f"\r[{fraction * 100:5.1f}%] {message[:70]:<70}", end="", file=sys.stderr, flush=True)

    return progress


def _human_memory(d: dict[str, Any]) -> str:
    from engine.units import format_bytes

    lines = [f"peak allocated  {format_bytes(d['peak_allocated_bytes'])}",
             f"peak reserved   {format_bytes(d['peak_reserved_bytes'])}",
             f"device used     {format_bytes(d['device_used_bytes'])}"]
    for cat, n in d.get("breakdown", {}).items():
        lines.append(f"  {cat:<13} {format_bytes(n)}")
    if d.get("tokens_per_s"):
        lines.append(f"tokens/s        {d['tokens_per_s']:,.0f}")
    if d.get("trainable_params") and d.get("params") and d["trainable_params"] != d["params"]:
        # LoRA: only the adapters have gradients and optimizer state
        lines.append(f"trainable       {d['trainable_params']:,} of {d['params']:,} parameters "
                     f"({100 * d['trainable_params'] / d['params']:.2f}%)")
    if d.get("oom"):
        lines.insert(0, f"OUT OF MEMORY at step {d.get('oom_step')} ({d.get('oom_phase')})")
    for note in d.get("notes", ()):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _with_version(d: dict[str, Any], started: float) -> dict[str, Any]:
    d = dict(d)
    d.setdefault("elapsed_s", time.perf_counter() - started)
    d["elapsed_s"] = max(d["elapsed_s"], 0.0)
    d["headroom_version"] = engine.__version__
    return d


def cmd_estimate(args: argparse.Namespace, profile: Profile, started: float) -> int:
    from engine.estimate import estimate
    result = estimate(profile, method=args.method)
    d = _with_version(result.to_dict(), started)
    d["elapsed_s"] = time.perf_counter() - started
    _emit(d, args.json, _human_memory)
    return 0


def cmd_measure(args: argparse.Namespace, profile: Profile, started: float) -> int:
    from engine.measure import run_measure

    def progress(fraction: float, message: str) -> None:
        if args.progress:
            print(json.dumps({"progress": fraction, "message": message}), flush=True)

    if profile.distributed:
        return _measure_ranks(args, profile, started, progress)
    result = run_measure(profile, progress=progress, snapshot=args.snapshot)
    d = _with_version(result.to_dict(), started)
    d["profile"] = profile.to_dict()  # what the app checks when this file is imported elsewhere
    _emit(d, args.json, _human_memory)
    return EXIT_OOM if result.oom else 0


def _measure_ranks(args: argparse.Namespace, profile: Profile, started: float, progress) -> int:
    """A data-parallel profile: outside torchrun, launch the ranks (``torch.distributed.run``, one
    engine ``measure`` per rank) and print their combined result; inside, run this rank, gather
    every rank's result and let rank 0 print the worst rank's numbers with all ranks'."""
    from engine import distributed

    if not distributed.in_rank_process():
        from engine.measure.process import measure_in_child

        result = measure_in_child(profile, progress=progress if args.progress else None,
                                  snapshot=args.snapshot)
        _emit(_with_version(result.to_dict(), started), args.json, _human_memory)
        return EXIT_OOM if result.oom else 0
    from engine.measure import run_measure

    rank = int(os.environ["RANK"])
    result = run_measure(profile, progress=progress if rank == 0 else None, snapshot=args.snapshot)
    ranks = distributed.gather_objects(result.to_dict())
    distributed.finish_rank()
    if rank == 0:
        _emit(_with_version(distributed.combine(ranks), started), args.json, _human_memory)
    return 0  # torchrun reports any non-zero rank as a crash; an OOM is in the result


def _human_fastest(d: dict[str, Any]) -> str:
    from engine.units import format_bytes

    lines = [f"fastest settings within {format_bytes(d['budget_bytes'])} on {d['gpu']} "
             f"({d['searched']} estimates, {d['elapsed_s']:.2f} s):"]
    for i, c in enumerate(d["candidates"], 1):
        changes = ", ".join(f"{k}={v}" for k, v in c["changes"].items())
        useful = f" ({c['useful_tokens_per_s']:,.0f} real)" if c.get("useful_tokens_per_s") else ""
        lines.append(f"{i}. {c['tokens_per_s']:>12,.0f} tokens/s{useful}  {c['step_s'] * 1000:8.1f} ms/step  "
                     f"{format_bytes(c['device_used_bytes']):>10} used, "
                     f"{format_bytes(c['margin_bytes'])} margin  [{changes}]")
    lines += [f"note: {n}" for n in d["notes"]]
    return "\n".join(lines)


def _human_which_gpu(d: dict[str, Any]) -> str:
    from engine.units import format_bytes

    lines = []
    for r in d["gpus"]:
        lines.append(f"{r['name']:<28} {format_bytes(r['memory_bytes']):>10}  "
                     f"{'fits        ' if r['fits'] else 'does not fit'}  "
                     f"{format_bytes(r['device_used_bytes']):>10} used  "
                     f"{r['tokens_per_s']:>12,.0f} tokens/s" + (f"  ({r['note']})" if r["note"] else ""))
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace, profile: Profile, started: float) -> int:
    from engine.plan import plan

    if args.which_gpu:
        from engine.plan_search import which_gpu

        rows = which_gpu(profile)
        d = _with_version({"which_gpu": True, "gpus": [r.to_dict() for r in rows]}, started)
        _emit(d, args.json, _human_which_gpu)
        return 0
    if args.goal == "fastest":
        from engine.plan_search import fastest

        if args.top < 1:
            raise BadInput("--top must be at least 1")
        result = fastest(profile, args.budget, top=args.top)
        d = _with_version(result.to_dict(), started)
        _emit(d, args.json, _human_fastest)
        return 0
    if args.budget is None:
        raise BadInput("plan needs --budget SIZE (e.g. --budget 24GiB), or --goal fastest / --which-gpu")
    if args.gpus_max is not None:
        from engine.plan_gpus import plan_gpus

        result = plan_gpus(profile, budget_bytes=args.budget, max_gpus=args.gpus_max,
                           method=args.method)
        _emit(_with_version(result.to_dict(), started), args.json,
              lambda x: json.dumps(x, indent=2, default=str))
        return 0
    result = plan(profile, budget_bytes=args.budget, vary=args.vary, method=args.method)
    d = _with_version(result.to_dict(), started)
    _emit(d, args.json, lambda x: json.dumps(x, indent=2, default=str))
    return 0


def _export_estimate(profile: Profile) -> Any:
    """The estimate for the script's header and the summary, traced where it can be made (the
    closer one; the header names the estimator), else analytic; None where neither can be made
    here (a dataset that exists only on the target machine, say): the export does not need it."""
    from engine.estimate import estimate

    for method in ("auto", "analytic"):
        try:
            return estimate(profile, method=method)
        except (BadInput, NotImplementedError):
            return None
        except Exception:  # noqa: BLE001 - a trace that fails falls back to the formulas
            continue
    return None


def cmd_export(args: argparse.Namespace, profile: Profile, started: float) -> int:
    from engine.export import export_profile_json, export_script, export_summary_markdown
    if args.format == "json":
        text = export_profile_json(profile)
    elif args.format == "md":
        text = export_summary_markdown(profile, estimate=_export_estimate(profile))
    else:
        text = export_script(profile, estimate=_export_estimate(profile))
    try:
        profile_mod.atomic_write_text(args.output, text)
    except OSError as exc:
        raise BadInput(f"cannot write {args.output}: {exc.strerror or exc}") from None
    d = _with_version({"output": args.output, "format": args.format, "bytes": len(text.encode())}, started)
    _emit(d, args.json, lambda x: f"wrote {x['output']}")
    return 0


def cmd_calibrate(args: argparse.Namespace, started: float) -> int:
    from engine.calibrate import calibrate, write_entry

    entry = calibrate(args.name, progress=_stderr_progress(not args.json))
    path = write_entry(entry, args.output)
    d = _with_version({**entry, "output": str(path)}, started)
    _emit(d, args.json, lambda x: (f"\n{x['device_name']}: context {x['context_bytes'] / 2**20:.0f} MiB "
                                   f"(+{x['context_train_extra_bytes'] / 2**20:.0f} MiB training, "
                                   f"+{x['context_half_bytes'] / 2**20:.0f} MiB per handle in half "
                                   f"precision), cuBLAS workspace {x['cublas_workspace_bytes'] / 2**20:.0f} "
                                   f"MiB x {x['workspace_handles_train']} in training\nwrote {x['output']}; "
                                   f"--gpu {x['name']} uses it"))
    return 0


def cmd_inspect(args: argparse.Namespace, profile: Profile, started: float) -> int:
    from engine import data, models

    facts = models.model_facts(profile)
    d: dict[str, Any] = {"model": facts.to_dict(), "profile": profile.to_dict()}
    d["model"]["summary"] = [dataclasses.asdict(m) for m in models.module_summary(
        models.build_model(profile, "meta"))]
    if args.dataset is not None:
        d["dataset"] = data.dataset_stats(profile).to_dict()
    d = _with_version(d, started)

    def human(x: dict[str, Any]) -> str:
        m = x["model"]
        lines = [f"{m['name']} ({m['model_type']}, {m['family']}, head {m['task']})",
                 f"parameters      {m['params']:,}", f"layers          {m['layers']}",
                 f"hidden size     {m['hidden_size']}", f"max positions   {m['max_positions']}",
                 f"tokenizer       {'its own' if m['has_tokenizer'] else 'the fallback BPE (it has none)'}"]
        if m.get("hub_commit"):
            lines.append(f"hub commit      {m['hub_commit']}")
        if m.get("checkpoint"):
            ck = m["checkpoint"]
            lines.append(f"checkpoint      {ck['params']:,} ({', '.join(ck['dtypes'])}; safetensors header)")
        if "dataset" in x:
            s = x["dataset"]
            lines += [f"dataset texts   {s['count']:,}",
                      f"tokens/text     mean {s['mean']:.1f}, median {s['median']:.0f}, "
                      f"p90 {s['p90']:.0f}, p99 {s['p99']:.0f}, max {s['max']}"]
        return "\n".join(lines)

    _emit(d, args.json, human)
    return 0


def cmd_compare(args: argparse.Namespace, started: float) -> int:
    from engine.compare import compare_profiles, write_csv
    profiles = [profile_mod.load(p) for p in args.profiles]
    if args.trust_remote_code:
        profiles = [grant_remote_code(dataclasses.replace(p, trust_remote_code=True)) for p in profiles]
    rows = compare_profiles(profiles, measure=args.measure)
    if args.csv:
        write_csv(rows, args.csv)
    if args.png:
        if png_renderer is None:
            raise BadInput("--png needs the desktop app's packages (PySide6, pyqtgraph); "
                           "run it through `headroom`, or use --csv")
        png_renderer(rows, args.png)
    d = _with_version({"profiles": rows}, started)
    _emit(d, args.json, lambda x: "\n".join(
        f"{r['name']:<24} est {r['estimate_peak_allocated_bytes'] / 2**30:7.2f} GiB" for r in x["profiles"]))
    return 0


COMMANDS = {"estimate": cmd_estimate, "measure": cmd_measure, "plan": cmd_plan,
            "export": cmd_export, "inspect": cmd_inspect}


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse an unwritable --save/-o/--csv/--png/--snapshot before any work (a measure can take
    minutes)."""
    from pathlib import Path

    from engine.atomic_file import check_target

    for attr in ("save", "output", "csv", "png", "snapshot"):
        value = getattr(args, attr, None)
        if value:
            check_target(Path(value))


def one_line(message: object) -> str:
    """The error as exactly one line: a path or value holding a newline must not split it."""
    text = str(message).strip() or "bad input"
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _on_sigterm(signum, frame) -> None:
    # Unwind like Ctrl-C: `with MeasureProcess` ends the child, temp files are removed.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    previous = None
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is not None:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(argv)
    finally:
        _revoke_granted_here()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def quiet_libraries(verbose: bool):
    """Keep library chatter the user cannot act on (transformers' ``loss_type`` notice, Python
    warnings) off stderr, unless ``--verbose``: stderr is for Headroom's own one-line errors."""
    if verbose:
        yield
        return
    saved_env = {k: os.environ.get(k) for k in ("TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS")}
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is imported
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    hf_logging = None
    if "transformers" in sys.modules:  # already imported (an in-process caller): set it directly
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if hf_logging is not None:
            hf_logging.set_verbosity(level)
        elif "transformers" in sys.modules and saved_env["TRANSFORMERS_VERBOSITY"] is None:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_warning()  # imported meanwhile: its default for later callers
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    with quiet_libraries(verbose):
        return _run(argv)


def _run(argv: list[str]) -> int:
    started = time.perf_counter()
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            raise BadInput("no command given; try: headroom estimate --model gpt2 (or run `headroom` for the app)")
        check_outputs(args)
        if args.command == "compare":
            return cmd_compare(args, started)
        if args.command == "calibrate":
            return cmd_calibrate(args, started)
        profile = profile_from_args(args)
        if getattr(args, "trust_remote_code", None):
            grant_remote_code(profile)
        prepare(profile)  # the one gate: every command refuses the same profiles, the same way
        code = COMMANDS[args.command](args, profile, started)
        if args.save:
            profile_mod.save(profile, args.save)
        return code
    except BadInput as exc:
        print(f"headroom: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Cancelled:
        print("headroom: cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("headroom: interrupted", file=sys.stderr)
        return 130
