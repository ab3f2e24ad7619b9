"""The adapter: the only place residkit touches TransformerLens or transformers internals.

Every other module reaches the bridge through these names. Each assumption they rest on is
named and checked in :mod:`residkit._bridge.contract` (run once per model by
:func:`residkit._bridge.contract.check_contract`, and on every family by
``tests/test_bridge.py``).

- :mod:`~residkit._bridge.model`: the HF model and config, q/k/v and norm components, the
  tokenizer slot, skipping blocks.
- :mod:`~residkit._bridge.hooks`: adding, muting and counting hooks, forward overrides.
- :mod:`~residkit._bridge.cache`: cache layers, the capturing cache, K/V read-back, and the
  cache argument transformers 5.24 renamed.
- :mod:`~residkit._bridge.policy_cache`: the ``transformers`` cache every policy builds on,
  doing its work through hooks inside the forwards it is given.
"""

from residkit._bridge.cache import (
    CacheLayer,
    CaptureCache,
    Captured,
    cache_argument_shim,
    cached_forward,
    install,
    installed,
    kv_bytes,
    layer_kv,
    nbytes,
    new_cache,
    repeated_cache,
)
from residkit._bridge.hooks import (
    edit_watch,
    hook_count,
    hook_points,
    hooked,
    muted,
    muted_hook_points,
    point_names,
    replaced_forward,
    temporary_hooks,
)
from residkit._bridge.model import (
    attn_norm,
    clear_pre_norm_capture,
    generation_config,
    head_at,
    hf_config,
    hf_model,
    is_bridge,
    linear,
    materialized,
    n_kv_heads,
    native_norm,
    norms_folded,
    positionwise_at,
    positionwise_parts,
    set_tokenizer,
    skipped_blocks,
)
from residkit._bridge.policy_cache import CacheHooksError, HookedCache, attached, left_padded_mask
from residkit._bridge.replay import Piece, replay_cache, replay_kv

__all__ = [
    "CacheHooksError",
    "CacheLayer",
    "CaptureCache",
    "Captured",
    "HookedCache",
    "Piece",
    "attached",
    "attn_norm",
    "cache_argument_shim",
    "cached_forward",
    "clear_pre_norm_capture",
    "edit_watch",
    "generation_config",
    "head_at",
    "hf_config",
    "hf_model",
    "hook_count",
    "hook_points",
    "hooked",
    "install",
    "installed",
    "is_bridge",
    "kv_bytes",
    "layer_kv",
    "left_padded_mask",
    "linear",
    "materialized",
    "muted",
    "muted_hook_points",
    "n_kv_heads",
    "native_norm",
    "nbytes",
    "new_cache",
    "norms_folded",
    "point_names",
    "positionwise_at",
    "positionwise_parts",
    "repeated_cache",
    "replaced_forward",
    "replay_cache",
    "replay_kv",
    "set_tokenizer",
    "skipped_blocks",
    "temporary_hooks",
]
