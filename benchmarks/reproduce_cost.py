"""What each claim of ``residkit reproduce`` costs on a model, measured or estimated.

Reads the per-claim results ``residkit reproduce`` cached (their wall time) for ``--model`` at
quick and full sizes, and for the two small real models at quick sizes, plus the full-size claim
times of the two small models recorded in ``docs/reproduction.md`` ("Measured in N s"). A claim
run at full size reports its time. One not run is estimated by the rule

    estimate = model's quick time x (small models' full time / small models' quick time)

i.e. the full sizes are assumed to cost the model what they cost the small models, relative to
the quick sizes (a rough rule: for ``nocache`` on Qwen it gave 4.4x the time then measured).
Claims estimated at over an hour are marked "not run".

Run: ``python benchmarks/reproduce_cost.py [--model qwen2.5-coder-1.5b-instruct]`` after
``residkit reproduce --model NAME --quick`` and ``residkit reproduce --quick``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from residkit._paths import home
from residkit.reproduction import CLAIMS

SMALL = "smollm2-135m-instruct+gemma3-270m"
DOC = Path(__file__).resolve().parents[1] / "docs" / "reproduction.md"


def seconds(size: str, claim: str, key: str) -> float | None:
    path = home() / "reproduce" / size / f"{claim}--{key}.json"
    if not path.exists():
        return None
    return float(json.loads(path.read_text())["seconds"])


def small_full_times() -> dict[str, float]:
    """Full-size claim times of the two small models, as docs/reproduction.md records them."""
    text = DOC.read_text()
    out = {}
    for claim in CLAIMS:
        section = re.search(rf"^## {claim}:.*?Measured in ([\d.]+) s", text, re.M | re.S)
        if section:
            out[claim] = float(section.group(1))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    args = parser.parse_args()
    small_full = small_full_times()
    print("| claim | quick (s) | full (s) | small models quick / full (s) | full at this size |")
    print("|---|---|---|---|---|")
    for claim in CLAIMS:
        quick, full = seconds("quick", claim, args.model), seconds("full", claim, args.model)
        sq, sf = seconds("quick", claim, SMALL), small_full.get(claim)
        if full is not None:
            verdict = f"measured: {full:.0f} s"
        elif quick is not None and sq and sf:
            estimate = quick * sf / sq
            label = "not run" if estimate > 3600 else "fits (not run yet)"
            verdict = f"{label}: about {estimate / 60:.0f} minutes on 2 cores (estimate)"
        else:
            verdict = "unknown: run the quick sizes first"
        q = f"{quick:.0f}" if quick is not None else "-"
        f = f"{full:.0f}" if full is not None else "-"
        s = f"{sq:.1f} / {sf:.0f}" if sq and sf else "-"
        print(f"| {claim} | {q} | {f} | {s} | {verdict} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
