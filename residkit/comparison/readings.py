"""The three readings of "KL against the full cache", defined once.

The paper (arXiv 2603.19664, Fig. 4) reports a KL divergence between the full cache and each
eviction policy without saying between which two distributions. Three readings are possible, and
:func:`residkit.compare_policies` measures any of them (``kl=``). In each, step ``t`` compares
two next-token distributions with KL(full_t || policy_t) in float64 from log-softmax
(:func:`residkit.metrics.kl_divergence`, exactly ``0.0`` for bitwise-equal logits):

- ``"teacher"`` (**teacher-forced**; columns ``mean_kl``, ``max_kl``): the policy is fed the full
  cache's tokens. Both see the same text, so this measures what eviction does to one step.
- ``"free"`` (**the full cache along the policy's text**; ``free_mean_kl``, ``free_max_kl``): the
  policy decodes its own tokens and the full cache is scored teacher-forced on that same text.
  Once the text has drifted, the full cache disagrees with it more.
- ``"own"`` (**each on its own text**; ``own_mean_kl``, ``own_max_kl``): the full cache and the
  policy each decode their own text, and step ``t`` of one is compared with step ``t`` of the
  other. After the texts part, the two distributions are about different contexts, so this is
  the largest reading.

All three are 0 at step 0 (the prompt forward attends the whole prompt under every policy that
prefills in one chunk) and equal until the policy's first different token; ``"teacher"`` and
``"free"`` coincide with ``"own"`` while the texts agree.

Examples:
    >>> import residkit
    >>> cmp = residkit.compare_policies(residkit.load("zoo:llama"), "abcdefghijkl", budgets=[3],
    ...     policies=["window"], max_new_tokens=6, kl="all", progress=False)
    >>> [column(r) for r in cmp.readings]
    ['mean_kl', 'free_mean_kl', 'own_mean_kl']
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["KL_READINGS", "READING_LABELS", "column", "readings_of"]

KL_READINGS: tuple[str, ...] = ("teacher", "free", "own")
"""The readings, in the order tables and figures show them."""

READING_LABELS: dict[str, str] = {
    "teacher": "teacher-forced",
    "free": "full cache along the policy's text",
    "own": "each on its own text",
}

_PREFIX = {"teacher": "", "free": "free_", "own": "own_"}


def column(reading: str, stat: str = "mean") -> str:
    """The table column of a reading's statistic (``"mean"``, ``"max"``, ``"mean_ci"``).

    Examples:
        >>> column("teacher"), column("own", "max"), column("free", "mean_ci")
        ('mean_kl', 'own_max_kl', 'free_mean_kl_ci')
    """
    suffix = {"mean": "mean_kl", "max": "max_kl", "mean_ci": "mean_kl_ci"}[stat]
    return _PREFIX[reading] + suffix


def readings_of(kl: str | Sequence[str]) -> tuple[str, ...]:
    """The readings ``kl`` asks for: one name, ``"both"`` (teacher and free), ``"all"``, or a
    list of names.

    Raises:
        TypeError: neither a name nor a list.
        ValueError: an unknown name (the message lists the known ones) or an empty list.

    Examples:
        >>> readings_of("all"), readings_of("both"), readings_of(["own"])
        (('teacher', 'free', 'own'), ('teacher', 'free'), ('own',))
    """
    if kl == "all":
        return KL_READINGS
    if kl == "both":
        return ("teacher", "free")
    if not isinstance(kl, str | Sequence):
        raise TypeError(f"kl must be a reading name or a list of them, got {kl!r:.80}")
    names = (kl,) if isinstance(kl, str) else tuple(kl)
    if not names:
        raise ValueError("kl is an empty list; pass a reading, 'both' or 'all'")
    for name in names:
        if name not in KL_READINGS:
            raise ValueError(
                f"kl={name!r} is not a KL reading; choose from {KL_READINGS!r}, 'both' or 'all'"
            )
    return tuple(r for r in KL_READINGS if r in names)
