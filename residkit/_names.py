"""Model names that can be refused before torch, transformers or TransformerLens load.

The command line checks ``--model`` here first, so a misspelt name costs a fraction of a second
rather than the seconds those imports take. Anything this module cannot decide (zoo names,
folders, hub ids with network) goes on to :func:`residkit.load`, which has the final word.

Examples:
    >>> offline_miss("smollm2-135m-instruct") is None  # residkit's registry knows it
    True
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ZOO_FAMILIES", "hint", "offline", "offline_miss"]

ZOO_FAMILIES: tuple[str, ...] = (
    "gemma2", "gemma3", "gpt2", "gpt_neox", "llama", "mistral", "mistral-swa", "olmo2", "phi3",
    "qwen2", "qwen3",
)  # fmt: skip
"""The zoo's families and variants (``zoo.ARCHITECTURES`` and ``zoo.VARIANTS``; a test keeps
them equal), known here without importing torch."""


def hint(name: str) -> str:
    """How to get a model residkit could not find."""
    return (
        f"How to fix: pass a local checkpoint folder (residkit.load('/path/to/{name.split('/')[-1]}')), "
        f"download it once where there is network (huggingface-cli download {name}) so the HF "
        "cache has it, or build an offline stand-in with residkit.zoo.build(...). "
        "Set HF_HUB_OFFLINE=1 to never touch the network."
    )


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids the network."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def offline_miss(name: str) -> str | None:
    """The message :func:`residkit.load` would end with for ``name``, when that is sure without
    loading anything: a name that is not residkit's, not ``zoo:``, not a path, with the network
    off and no snapshot in the HF cache. None when the name may load."""
    from residkit._catalogue import REAL_MODELS

    if name in REAL_MODELS or name.startswith("zoo:") or not name.strip() or not offline():
        return None
    if Path(name).expanduser().exists():
        return None
    if name in ZOO_FAMILIES:
        return f"{name!r} is a zoo family: pass --model zoo:{name}"
    from huggingface_hub.constants import HF_HUB_CACHE

    snapshots = Path(HF_HUB_CACHE) / f"models--{name.replace('/', '--')}" / "snapshots"
    if snapshots.is_dir() and any(snapshots.iterdir()):
        return None
    return f"model {name!r} is not in the local HF cache and HF_HUB_OFFLINE is set. {hint(name)}"
