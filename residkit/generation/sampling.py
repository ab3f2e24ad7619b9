"""How the next token is chosen: greedy, or a sample drawn as transformers' ``generate`` draws it."""

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from residkit._validate import non_negative_int, positive_int, real

__all__ = ["Sampler", "check_sampling", "sample_next"]


def sample_next(
    logits: Float[Tensor, "batch vocab"],
    *,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> Int[Tensor, "batch 1"]:
    """Greedy argmax, or a sample as transformers' ``generate`` draws it.

    Sampling: the logits in float32, transformers' temperature, top-k and top-p warpers in
    that order (each only where it changes something, as ``generate`` adds them), softmax,
    ``torch.multinomial``. With ``generator`` seeded as ``torch.manual_seed`` seeds the global
    one, the draws are ``generate``'s.

    Examples:
        >>> logits = torch.tensor([[0.0, 3.0, 1.0]])
        >>> sample_next(logits, do_sample=False, temperature=1.0, top_k=None, top_p=None,
        ...             generator=None).tolist()
        [[1]]
        >>> g = torch.Generator().manual_seed(0)
        >>> sample_next(logits, do_sample=True, temperature=1.0, top_k=1, top_p=None,
        ...             generator=g).tolist()
        [[1]]
    """
    if not do_sample:
        return logits.argmax(-1, keepdim=True)
    scores = logits.float()
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k is not None and top_k != 0:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None and top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    probs = torch.softmax(scores, -1)
    return torch.multinomial(probs, 1, generator=generator)


@dataclass
class Sampler:
    """How the next token is chosen (shared by :func:`generate` and :class:`Chat`)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None

    def __call__(self, logits: Tensor) -> Tensor:
        return sample_next(
            logits,
            do_sample=self.do_sample,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            generator=self.generator,
        )


def check_sampling(
    do_sample: Any, temperature: Any, top_k: Any, top_p: Any, seed: Any = None
) -> None:
    """Check the sampling arguments: TypeError / ValueError naming the one that is wrong.

    ``temperature``, ``top_k`` and ``top_p`` are ignored when ``do_sample`` is False, but
    still must be of the right type (a typo should not pass silently).
    """
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be True or False, got {do_sample!r}")
    temperature = real("temperature", temperature)
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
    if top_k is not None:
        positive_int("top_k", top_k)
    if top_p is not None and not 0 < real("top_p", top_p) <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if seed is not None:
        non_negative_int("seed", seed)
