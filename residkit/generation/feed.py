"""What each forward of a decoding loop is fed: token ids, and for a padded batch, the mask
and positions transformers' ``generate`` would give it.

A batch of prompts of different lengths is left padded (the last token of every row is real,
so one forward's last position is every row's next-token distribution). Each forward then
gets the 2-D ``attention_mask`` of the whole sequence so far and ``position_ids`` counted from
each row's first real token, padding at 0: exactly what transformers' ``generate`` passes, so
a residkit cache decodes a batch the same way in either loop. A batch without padding gets
neither (the model's defaults), as a single prompt always has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from residkit.capture import Inputs, eos_ids, left_pad, pad_id, to_tokens

__all__ = ["Feed", "eos_ids", "is_batch", "pad_id"]


def is_batch(prompt: Inputs) -> bool:
    """Whether ``prompt`` is a batch: a list of strings, or token ids ``[batch > 1, pos]``."""
    if isinstance(prompt, Tensor):
        return prompt.ndim == 2 and prompt.shape[0] > 1
    return not isinstance(prompt, str) and isinstance(prompt, Sequence)


@dataclass
class Feed:
    """A left-padded batch and the keyword arguments of each forward over it.

    Attributes:
        ids: The prompts' token ids ``[batch, pos]``, left padded.
        mask: ``[batch, pos]`` 1 at real tokens, 0 at padding; None when no row is padded.
        padding: Leading padding tokens per row.
    """

    ids: Int[Tensor, "batch pos"]
    mask: Int[Tensor, "batch pos"] | None
    padding: list[int]

    @classmethod
    def of(
        cls,
        model: TransformerBridge,
        prompt: Inputs,
        *,
        extra: int = 0,
        attention_mask: Tensor | None = None,
    ) -> Feed:
        """Token ids of ``prompt`` (each string tokenised alone, then left padded).

        Raises:
            ValueError: as :func:`residkit.capture.to_tokens`, or an ``attention_mask`` of
                another shape than the ids, or one that is not left padding.
        """
        if isinstance(prompt, Tensor | str):
            ids = to_tokens(model, prompt, extra=extra)
            return cls._with_mask(ids, attention_mask)
        if attention_mask is not None:
            raise ValueError("attention_mask goes with token ids; strings are padded here")
        ids, mask = left_pad(model, to_list(prompt), extra=extra)
        return cls._with_mask(ids, mask)

    @classmethod
    def _with_mask(cls, ids: Tensor, mask: Tensor | None) -> Feed:
        from residkit._bridge import left_padded_mask

        if mask is not None:
            checked = left_padded_mask(mask, *ids.shape)
            mask = None if checked is None else checked.long().to(ids.device)
        padding = [0] * ids.shape[0] if mask is None else (1 - mask).sum(1).tolist()
        return cls(ids, mask, padding)

    @property
    def batch(self) -> int:
        return int(self.ids.shape[0])

    def kwargs(self, end: int, n: int) -> dict[str, Any]:
        """Keyword arguments of the forward of the ``n`` tokens ending at absolute ``end``."""
        if self.mask is None:
            return {}
        grown = end - self.mask.shape[1]
        mask = self.mask[:, :end]
        if grown > 0:
            mask = torch.cat([self.mask, self.mask.new_ones(self.batch, grown)], dim=1)
        padding = torch.tensor(self.padding, device=self.ids.device).unsqueeze(1)
        positions = (torch.arange(end - n, end, device=self.ids.device) - padding).clamp_min(0)
        return {"attention_mask": mask, "position_ids": positions}


def to_list(prompt: Inputs) -> list[str]:
    """The prompts of a list, checked (a ValueError for an empty list)."""
    prompts = list(prompt)
    if not prompts:
        raise ValueError("prompt is an empty list of prompts")
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"a batch of prompts is a list of strings, got {prompts!r:.80}")
    return prompts
