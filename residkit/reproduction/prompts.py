"""The texts the reproduction runs on.

**Figure 4's prompts** are text residkit did not write, shipped inside the package
(``residkit/reproduction/texts/``) so that a run never depends on what else is installed: 20
texts of five kinds (code, licence, documentation, data, non-English), each with its source,
licence and sha256 in ``MANIFEST.json``. A text is checked against its sha256 every time it is
read. Each prompt is the first ``n`` tokens of its text under the model's own tokenizer (every
text holds at least 2,200 tokens under SmolLM2's, Gemma 3's and Qwen2.5's tokenizers), so every
model sees the same text. :func:`prompt_set` takes the texts kind by kind (one of each kind,
then a second of each, ...), so any number of prompts spreads over the kinds evenly.

**The abstract's task families** (prose, code, arithmetic, dialogue, a non-English language,
structured data) are short passages, one per family, for cross-task residual patching.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

__all__ = ["TASK_FAMILIES", "TEXT_DIR", "Text", "prompt_set", "text", "texts"]

TEXT_DIR = Path(__file__).parent / "texts"
KINDS = ("code", "licence", "documentation", "data", "non-English")


@dataclass(frozen=True)
class Text:
    """One shipped text: ``name``, ``kind``, ``source`` (where it was taken from and how),
    ``licence``, ``sha256`` of its UTF-8 bytes, and its length in ``characters``."""

    name: str
    kind: str
    source: str
    licence: str
    sha256: str
    characters: int


@cache
def texts() -> tuple[Text, ...]:
    """Every shipped text, in :func:`prompt_set`'s order (kind by kind, round robin)."""
    entries = [Text(**e) for e in json.loads((TEXT_DIR / "MANIFEST.json").read_text())]
    by_kind = [[t for t in entries if t.kind == kind] for kind in KINDS]
    rounds = max(len(group) for group in by_kind)
    return tuple(group[i] for i in range(rounds) for group in by_kind if i < len(group))


def text(name: str) -> str:
    """The text called ``name``, checked against the sha256 its manifest pins.

    Raises:
        ValueError: an unknown name (the message lists the known ones), or bytes that are not
            the ones shipped.
    """
    known = {t.name: t for t in texts()}
    if name not in known:
        raise ValueError(f"no shipped text {name!r}; known: {sorted(known)}")
    data = (TEXT_DIR / f"{name}.txt").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != known[name].sha256:
        raise ValueError(
            f"{TEXT_DIR / (name + '.txt')} has sha256 {digest}, not the pinned "
            f"{known[name].sha256}: the shipped text was changed; reinstall residkit"
        )
    return data.decode()


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


def prompt_set(model: TransformerBridge, n: int = 8, tokens: int = 400) -> list[tuple[str, Tensor]]:
    """The first ``n`` shipped texts (kind by kind), each cut to its first ``tokens`` tokens.

    Returns:
        ``(name, ids [1, tokens])`` per text.

    Raises:
        ValueError: ``n`` is not in 1..20, or a text is shorter than ``tokens`` tokens under this
            model's tokenizer.
    """
    chosen = texts()
    if not 1 <= n <= len(chosen):
        raise ValueError(f"n={n}: residkit ships {len(chosen)} texts")
    out = []
    for entry in chosen[:n]:
        ids = model.to_tokens(text(entry.name), truncate=False)
        if ids.shape[1] < tokens:
            raise ValueError(f"{entry.name} has {ids.shape[1]} tokens, fewer than {tokens}")
        out.append((entry.name, ids[:, :tokens].to(torch.long)))
    return out
