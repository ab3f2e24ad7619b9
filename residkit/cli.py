"""Command line: ``residkit verify [--model ARCH|PATH|HUB_ID] [--json]``.

``--model`` is resolved in this order: a zoo architecture name (built as the zoo's *small*
size into the residkit cache on first use), an existing folder, then a hub id. Use the full
hub id for hub models whose short name collides with a zoo family
(``openai-community/gpt2``, not ``gpt2``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_MODEL = "llama"


def _resolve(model: str) -> str:
    from residkit import zoo

    if model in zoo.ARCHITECTURES or model in zoo.VARIANTS:
        return str(zoo.build(model, size="small"))
    return model


def _verify(args: argparse.Namespace) -> int:
    import pandas as pd

    import residkit
    from residkit.verify import verify

    t0 = time.perf_counter()
    target = _resolve(args.model)
    try:
        model = residkit.load(target)
    except (OSError, ValueError) as err:
        print(f"residkit verify: {err}", file=sys.stderr)
        return 2
    load_s = time.perf_counter() - t0

    def progress(section: str) -> None:
        if not args.json:
            print(f"  running {section} ...", file=sys.stderr, flush=True)

    report = verify(
        model,
        name=args.model,
        out_dir=args.out,
        sections=args.section or None,
        figures=not args.no_figures,
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
        table = report.table.copy()
        table["passed"] = table["passed"].map({True: "PASS", False: "FAIL", None: "info"})
        with pd.option_context("display.max_colwidth", 70, "display.width", 200):
            print(table.to_string(index=False))
        verdict = "all exactness claims hold" if report.passed else "SOME CLAIMS FAILED"
        print(f"\n{args.model}: {verdict} (load {load_s:.1f}s, checks {report.seconds:.1f}s)")
    return 0 if report.passed else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``residkit`` command."""
    parser = argparse.ArgumentParser(prog="residkit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="run every residkit check on one model")
    v.add_argument(
        "--model", default=DEFAULT_MODEL, help="zoo architecture, checkpoint folder or hub id"
    )
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.add_argument(
        "--out", type=Path, default=Path("residkit-verify"), help="folder for HTML figures"
    )
    v.add_argument("--section", action="append", help="run only this section (repeatable)")
    v.add_argument("--no-figures", action="store_true", help="do not write HTML figures")
    args = parser.parse_args(argv)
    if args.command == "verify":
        return _verify(args)
    return 2  # pragma: no cover - argparse enforces the sub-command


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
