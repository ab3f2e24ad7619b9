"""Finished cells of a long sweep, kept on disk so that an interrupted sweep resumes.

A :class:`CellStore` is a JSON-lines file. Each line holds one finished cell under a key: the
sha256 of everything that changes the cell's numbers (the model's weights and config, the
inputs, the arguments) and of residkit's own source. A changed argument, weight or line of
residkit gives another key, so a stale cell is never read back; it is only ignored.

Examples:
    >>> import tempfile, pathlib
    >>> store = CellStore(pathlib.Path(tempfile.mkdtemp()) / "cells.jsonl")
    >>> key = store.key({"policy": "window", "budget": 16})
    >>> store.get(key) is None
    True
    >>> store.put(key, {"token_match": 12.5})
    >>> CellStore(store.path).get(key)
    {'token_match': 12.5}
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["CellStore", "model_fingerprint", "source_fingerprint"]


@functools.cache
def source_fingerprint() -> str:
    """sha256 of every ``.py`` file of the installed residkit, in path order."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of a model's parameters and buffers (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        if tensor.device.type != "meta":
            flat = tensor.detach().reshape(-1).cpu().contiguous()
            digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    """numpy scalars (pandas' cells) as Python numbers."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous()
        return {
            "dtype": str(flat.dtype),
            "shape": list(flat.shape),
            "sha256": hashlib.sha256(
                flat.reshape(-1).view(torch.uint8).numpy().tobytes()
            ).hexdigest(),
        }
    return repr(value)


class CellStore:
    """Finished cells under their keys, in one append-only JSON-lines file.

    Args:
        path: The file (created with its folder on the first :meth:`put`).
        name: The argument ``path`` came from, for error messages.
    """

    def __init__(self, path: str | os.PathLike[str], name: str = "path") -> None:
        if not isinstance(path, str | os.PathLike) or not os.fspath(path):
            raise TypeError(f"{name} must be a path to a file, got {path!r:.80}")
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(f"{name}={str(self.path)!r} is a folder; pass a file for the cells")
        self._cells: dict[str, Any] = {}
        self._seconds: dict[str, float] = {}
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            try:
                record = json.loads(line)
                self._cells[record["key"]] = record["value"]
                if record.get("source") == source_fingerprint():
                    self._seconds[record["key"]] = float(record.get("seconds", 0.0))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a killed process: that cell runs again

    def __len__(self) -> int:
        return len(self._cells)

    def __repr__(self) -> str:
        return f"CellStore({str(self.path)!r}, {len(self)} cells)"

    @staticmethod
    def key(parts: dict[str, Any]) -> str:
        """sha256 of ``parts`` (tensors by dtype, shape and bytes; other objects by repr) and
        of residkit's source."""
        text = json.dumps(parts, sort_keys=True, default=_default)
        return hashlib.sha256((source_fingerprint() + text).encode()).hexdigest()

    def get(self, key: str) -> Any:
        """The value stored under ``key``, or None."""
        return self._cells.get(key)

    def seconds(self) -> float:
        """The seconds it took to compute every cell stored by this residkit source."""
        return sum(self._seconds.values())

    def put(self, key: str, value: Any, seconds: float = 0.0) -> None:
        """Store ``value`` (JSON-serialisable) under ``key``, with the ``seconds`` it took to
        compute, flushed to disk before returning."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"key": key, "value": value, "seconds": seconds, "source": source_fingerprint()}
        line = json.dumps(record, default=_plain)
        with self.path.open("a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._cells[key] = value
        self._seconds[key] = seconds
