"""A converted model folder that is what was written: the files' sizes and sha256, checked.

:func:`record` lists every file of a folder with its size, modification time and sha256; the
registry keeps the list in the folder's provenance record. :func:`check` compares the folder
with it: cheaply (size and modification time of each file; a file whose time moved but whose
bytes did not is hashed once to be sure) or fully (``full=True``: every file's sha256). A
changed, missing or extra file is a :class:`FolderChanged` naming it, so a model whose weights
were altered after the fetch never loads silently (NaN logits, or wrong ones).

:func:`stale_partials` finds the work folders of fetches that were killed (``SIGKILL`` leaves no
chance to clean up): each holds the id of the process that made it, and one whose process is
gone is stale.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

__all__ = ["OWNER", "FolderChanged", "check", "record", "stale_partials"]

OWNER = "residkit-owner.pid"
_CHUNK = 1 << 22


class FolderChanged(Exception):
    """A file of a converted folder is not the one written."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def record(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """``{file name: {"bytes", "mtime_ns", "sha256"}}`` for every file of ``folder``."""
    out = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name not in skip:
            stat = path.stat()
            out[path.name] = {
                "bytes": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
                "sha256": _sha256(path),
            }
    return out


def check(
    folder: Path,
    files: dict[str, dict[str, Any]],
    *,
    full: bool = False,
    skip: tuple[str, ...] = (),
) -> bool:
    """Raise :class:`FolderChanged` unless ``folder`` holds exactly ``files``.

    Returns:
        True if a file's modification time moved while its bytes did not (the caller may
        record the new times so the next check is cheap again).
    """
    present = {p.name for p in folder.iterdir() if p.is_file() and p.name not in skip}
    missing, extra = sorted(set(files) - present), sorted(present - set(files))
    if missing or extra:
        raise FolderChanged(
            ", ".join([*(f"{n} is missing" for n in missing), *(f"{n} was added" for n in extra)])
        )
    touched = False
    for name, want in files.items():
        stat = (folder / name).stat()
        if stat.st_size != want["bytes"]:
            raise FolderChanged(f"{name} has {stat.st_size} bytes, {want['bytes']} were written")
        if full or stat.st_mtime_ns != want["mtime_ns"]:
            got = _sha256(folder / name)
            if got != want["sha256"]:
                raise FolderChanged(f"{name} has sha256 {got}, {want['sha256']} was written")
            if stat.st_mtime_ns != want["mtime_ns"]:
                want["mtime_ns"], touched = stat.st_mtime_ns, True
    return touched


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def stale_partials(parent: Path, prefix: str) -> list[Path]:
    """Work folders ``parent/prefix*`` whose fetch process is gone (or that name none)."""
    out = []
    for path in parent.glob(f"{prefix}*"):
        try:
            pid = int((path / OWNER).read_text())
        except (OSError, ValueError):
            pid = -1
        if pid < 0 or not _alive(pid):
            out.append(path)
    return out
