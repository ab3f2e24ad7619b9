"""Divergences between next-token distributions."""

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["kl_divergence"]


def kl_divergence(
    p_logits: Float[Tensor, "... vocab"], q_logits: Float[Tensor, "... vocab"]
) -> Float[Tensor, "..."]:
    """KL(P || Q) per position, in float64, from log-softmax of both logit tensors.

    Exactly ``0.0`` when the logits are bitwise equal (the same log-softmax bits cancel).

    Examples:
        >>> logits = torch.randn(3, 10)
        >>> kl_divergence(logits, logits).tolist()
        [0.0, 0.0, 0.0]
        >>> bool((kl_divergence(logits, logits.flip(-1)) > 0).all())
        True
    """
    logp = torch.log_softmax(p_logits.double(), dim=-1)
    logq = torch.log_softmax(q_logits.double(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)
