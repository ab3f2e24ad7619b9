"""Per-token memory accounting: what it costs to remember a token, each way.

The paper compares *one residual vector per token* with *all-layer K/V per token* (7-27x on
its models). KV-Direct's layer checkpoints are not one residual per token: recomputing a
layer's K/V by its norm and two projections needs the residual *at that layer*, so a token
costs ``d_model`` values per global layer, against ``2 * n_kv_heads * d_head`` for the K/V it
replaces. These functions compute every accounting from a config, so the two can be compared.

Examples:
    >>> t = accounting_table()
    >>> int(t.set_index("model").loc["gemma-3-4b", "kv_all_layers"])
    139264
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from residkit.architectures import ARCH_TABLE, spec_for

__all__ = ["accounting_table", "per_token_bytes"]


def per_token_bytes(
    config: Any, *, dtype_bytes: int = 2, family: str | None = None
) -> dict[str, int]:
    """Bytes per token of each way to remember a token, for an HF config.

    Keys: ``kv_all_layers`` (full cache: every layer's K and V), ``kv_global_layers`` (what
    KV-Direct's checkpoints replace), ``residual_one`` (one residual vector: the paper's
    accounting), ``residual_per_global_layer`` (KV-Direct ``checkpoint="layer"``),
    ``residual_all_layers`` (a residual per token at every layer, sliding ones included),
    ``token_id`` (``checkpoint="token"``, int64).

    Examples:
        >>> from residkit import zoo
        >>> b = per_token_bytes(zoo.config_for("gemma3", config="gemma-3-4b"))
        >>> b["kv_all_layers"], b["residual_one"]
        (139264, 5120)
    """
    spec = ARCH_TABLE[family] if family else spec_for(config)
    n_layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    d_head = getattr(config, "head_dim", None) or config.hidden_size // heads
    n_global = n_layers - len(spec.sliding_layers(config))
    kv = 2 * kv_heads * d_head * dtype_bytes
    return {
        "kv_all_layers": n_layers * kv,
        "kv_global_layers": n_global * kv,
        "residual_one": config.hidden_size * dtype_bytes,
        "residual_per_global_layer": n_global * config.hidden_size * dtype_bytes,
        "residual_all_layers": n_layers * config.hidden_size * dtype_bytes,
        "token_id": 8,
    }


def accounting_table(dtype_bytes: int = 2) -> pd.DataFrame:
    """:func:`per_token_bytes` of every paper config (bf16 by default), with both ratios.

    Columns: the keys of :func:`per_token_bytes`, ``kv / one residual`` (the paper's 7-27x)
    and ``per-global-layer residuals / global K/V`` (what layer checkpoints actually cost).
    """
    from residkit.zoo import PAPER_CONFIGS, config_for

    rows = []
    for key, entry in PAPER_CONFIGS.items():
        b = per_token_bytes(
            config_for(entry["family"], config=key), dtype_bytes=dtype_bytes, family=entry["family"]
        )
        rows.append(
            {
                "model": key,
                **b,
                "kv / one residual": b["kv_all_layers"] / b["residual_one"],
                "per-global-layer residuals / global K/V": b["residual_per_global_layer"]
                / b["kv_global_layers"],
            }
        )
    return pd.DataFrame(rows)
