"""The texts the reproduction runs on.

**Figure 4's prompts** are text residkit did not write: the opening of four Python standard
library modules (source and docstrings) and of four licence texts shipped inside installed
packages that residkit depends on. Each prompt is the first ``n`` tokens of its text under the
model's own tokenizer, so every model sees the same text.

**The abstract's task families** (prose, code, arithmetic, dialogue, a non-English language,
structured data) are short passages, one per family, for cross-task residual patching.
"""

from __future__ import annotations

import importlib
import inspect
from importlib.metadata import distribution

import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

__all__ = ["SOURCES", "TASK_FAMILIES", "prompt_set", "source_text"]

SOURCES: tuple[tuple[str, str, str], ...] = (
    ("module", "json.decoder", "Python standard library: json/decoder.py"),
    ("module", "textwrap", "Python standard library: textwrap.py"),
    ("module", "heapq", "Python standard library: heapq.py"),
    ("module", "difflib", "Python standard library: difflib.py"),
    ("licence", "transformers:licenses/LICENSE", "transformers: LICENSE (Apache-2.0)"),
    ("licence", "torch:licenses/LICENSE", "torch: LICENSE (BSD-3-Clause and others)"),
    ("licence", "tqdm:LICENCE", "tqdm: LICENCE (MPL-2.0 and MIT)"),
    ("doc", "argparse", "Python standard library: argparse module docstring"),
)
"""``(kind, where, label)`` of each text Figure 4 runs on."""

TASK_FAMILIES: dict[str, str] = {
    "prose": (
        "The lighthouse stood at the end of a long stone pier. Every evening the keeper climbed "
        "its stairs, trimmed the wick and watched the beam sweep across the water."
    ),
    "code": (
        "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
        "    return a\n\nprint([fibonacci(i) for i in range(10)])"
    ),
    "arithmetic": "17 + 25 = 42. 42 - 8 = 34. 34 * 2 = 68. 68 / 4 = 17. 17 + 19 = 36. 36 * 3 =",
    "dialogue": (
        "A: Did you remember to water the plants?\nB: I did, this morning before work.\n"
        "A: Even the ones on the balcony?\nB: Those too. Why do you ask?"
    ),
    "non-English": (
        "Le phare se dressait au bout d'une longue jetée de pierre. Chaque soir, le gardien "
        "montait l'escalier, taillait la mèche et regardait le faisceau balayer la mer."
    ),
    "structured data": (
        '{"id": 1042, "name": "lighthouse", "lat": 48.3904, "lon": -4.4861, '
        '"height_m": 37.5, "lit": true, "keepers": ["Anne", "Yves"], "built": 1869}'
    ),
}
"""Six task families for cross-task residual patching, one short passage each."""


def source_text(kind: str, where: str) -> str:
    """The text of one entry of :data:`SOURCES`."""
    if kind == "module":
        return inspect.getsource(importlib.import_module(where))
    if kind == "doc":
        return importlib.import_module(where).__doc__ or ""
    dist, _, name = where.partition(":")
    for file in distribution(dist).files or []:
        if str(file).replace("\\", "/").endswith(name):
            return file.read_text()
    raise FileNotFoundError(f"{name} is not among the files of the installed {dist}")


def prompt_set(model: TransformerBridge, n: int = 8, tokens: int = 400) -> list[tuple[str, Tensor]]:
    """The first ``n`` texts of :data:`SOURCES`, each cut to its first ``tokens`` tokens.

    Raises:
        ValueError: a text is shorter than ``tokens`` tokens under this model's tokenizer.
    """
    out = []
    for kind, where, label in SOURCES[:n]:
        ids = model.to_tokens(source_text(kind, where), truncate=False)
        if ids.shape[1] < tokens:
            raise ValueError(f"{label} has {ids.shape[1]} tokens, fewer than {tokens}")
        out.append((label, ids[:, :tokens].to(torch.long)))
    return out
