"""Section ``load``: what the model is, and what its weights are."""

from __future__ import annotations

from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge import hf_config, hf_model, n_kv_heads
from residkit.architectures import spec_for
from residkit.checks.base import Check, VerifyContext
from residkit.registry import provenance


def run(model: TransformerBridge, ctx: VerifyContext) -> list[Check]:
    spec = spec_for(model)
    cfg, config = model.cfg, hf_config(model)
    params = sum(p.numel() for p in hf_model(model).parameters())
    sliding = spec.sliding_layers(config)
    meta = provenance(model)
    return [
        Check("load", "weights", meta["caveat"] if meta else "as stored in the checkpoint"),
        Check("load", "family", f"{spec.family} ({config.model_type})"),
        Check(
            "load",
            "shape",
            f"{cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, "
            f"{n_kv_heads(model)} KV heads, d_head {cfg.d_head}, {params / 1e6:.2f}M params",
        ),
        Check("load", "sliding-window layers", str(list(sliding)) if sliding else "none"),
    ]
