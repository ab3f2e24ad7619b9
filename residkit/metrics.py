"""Divergences between next-token distributions."""

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["kl_divergence", "mean_interval"]


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


# Two-sided 95% Student t quantiles t(0.975, df) for df = 1..30; beyond 30 the normal 1.96 is
# within 2% of t and the interval is reported with it.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def mean_interval(values: list[float] | tuple[float, ...]) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval (Student t, sample standard deviation).

    The half-width is NaN for fewer than two values (no spread to estimate).

    Examples:
        >>> mean, half = mean_interval([1.0, 2.0, 3.0])
        >>> mean, round(half, 3)  # 4.303 * 1 / sqrt(3)
        (2.0, 2.484)
        >>> mean_interval([5.0])
        (5.0, nan)
    """
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval needs at least one value")
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    return mean, t * sd / n**0.5
