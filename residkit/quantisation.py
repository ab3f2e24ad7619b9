"""How much 4-bit quantisation can move the effective ranks measured on a real model.

The real models residkit fetches (:mod:`residkit.registry`) are 4-bit GGUF files,
dequantised. Their upstream bf16 weights are not available offline, so the effect of the
quantisation on ``W_Q W_K^T`` spectra cannot be measured directly. What can be measured is
the effect of *one more round of the same noise*: quantise the dequantised ``W_Q`` and
``W_K`` again with the GGUF type the file used (gguf's own reference quantiser), dequantise,
and recompute every head's effective rank. The change bounds, in size, what one round of
that quantisation does to the ranks; it is not the difference from the bf16 model.

One subtlety decides whether this measures anything: dequantised weights already lie on the
quantisation grid of their blocks, so re-quantising with the *same* block boundaries gives
them back bit for bit (``weight_rel_error == 0.0`` on SmolLM2's Q4_1 ``W_Q``/``W_K``). The
blocks are therefore shifted by half a block (``shift``): each new block mixes two original
ones, and the round adds fresh noise of the type's size.

Examples:
    >>> import residkit
    >>> model = residkit.load("zoo:llama")
    >>> effect = requantisation_effect(model, qtype="Q4_1")
    >>> list(effect.table.columns)
    ['layer', 'head', 'kv_head', 'rank', 'rank_requantised', 'delta']
    >>> effect.weight_rel_error > 0
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from residkit._entry import entry
from residkit.spectra import QKSpectra, check_energy, qk_spectra

__all__ = [
    "QUANTISABLE",
    "RequantisationEffect",
    "attention_weight_types",
    "requantisation_effect",
    "requantise",
]

QUANTISABLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
"""GGUF types gguf's Python quantiser implements (its K-quants only dequantise)."""


def requantise(
    w: Float[Tensor, "... d_model d_head"], qtype: str, *, shift: int = 0
) -> Float[Tensor, "... d_model d_head"]:
    """Quantise ``w`` to ``qtype`` and back, in blocks along ``d_model`` as GGUF stores it.

    In TransformerLens's layout (``q = x @ W``) a GGUF row of the projection (one output
    channel, all of ``d_model``) is a column here, so blocks run along ``d_model``.

    Args:
        w: Weights.
        qtype: A type in :data:`QUANTISABLE`.
        shift: Move the block boundaries by this many channels (the row is rolled before
            quantising and rolled back after).

    Raises:
        ValueError: ``qtype`` is not in :data:`QUANTISABLE`, or ``d_model`` is not a multiple
            of its block size.

    Examples:
        >>> w = torch.randn(2, 64, 16)
        >>> back = requantise(w, "Q8_0")
        >>> back.shape == w.shape and 0 < float((back - w).abs().max()) < 0.05
        True
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    if not isinstance(qtype, str) or qtype not in QUANTISABLE:
        raise ValueError(f"cannot quantise to {qtype!r}; gguf's quantiser implements {QUANTISABLE}")
    if not isinstance(w, Tensor) or not w.is_floating_point() or w.ndim < 2 or not w.numel():
        raise ValueError(
            f"w must be a non-empty float tensor [..., d_model, d_head], got {w!r:.80}"
        )
    kind = GGMLQuantizationType[qtype]
    block = GGML_QUANT_SIZES[kind][0]
    d_model = w.shape[-2]
    if d_model % block:
        raise ValueError(f"d_model={d_model} is not a multiple of {qtype}'s block of {block}")
    rows = w.transpose(-1, -2).reshape(-1, d_model).to(torch.float32).numpy()
    rows = np.roll(rows, -shift, axis=-1)
    back = np.roll(dequantize(quantize(rows, kind), kind).astype(np.float32), shift, axis=-1)
    out = torch.from_numpy(np.ascontiguousarray(back)).reshape(*w.shape[:-2], w.shape[-1], d_model)
    return out.transpose(-1, -2).to(w.dtype)


@dataclass(frozen=True)
class RequantisationEffect:
    """Effective ranks before and after one more round of quantisation.

    Attributes:
        original: Spectra of the weights as loaded.
        requantised: Spectra of the re-quantised weights.
        qtype: The GGUF type used.
        shift: How far the block boundaries were moved (0: the file's own blocks).
        energy: Energy of the effective rank.
        weight_rel_error: ``||W' - W||_F / ||W||_F`` over every ``W_Q`` and ``W_K``.
    """

    original: QKSpectra
    requantised: QKSpectra
    qtype: str
    shift: int
    energy: float
    weight_rel_error: float

    @property
    def table(self) -> pd.DataFrame:
        """Per (layer, head): ``rank``, ``rank_requantised`` and ``delta`` (their difference)."""
        before = self.original.effective_rank(self.energy)
        after = self.requantised.effective_rank(self.energy)
        out = before[["layer", "head", "kv_head", "rank"]].copy()
        out["rank_requantised"] = after["rank"].to_numpy()
        out["delta"] = out["rank_requantised"] - out["rank"]
        return out

    @property
    def max_abs_delta(self) -> int:
        """Largest change of any head's effective rank."""
        return int(self.table["delta"].abs().max())

    def figure(self, *, title: str | None = None) -> go.Figure:
        """Rank before vs after, one dot per (layer, head); dots on the diagonal did not move."""
        df = self.table
        top = self.original.d_head
        fig = go.Figure()
        fig.add_scatter(
            x=[0, top], y=[0, top], mode="lines", line={"dash": "dot"}, name="unchanged"
        )
        fig.add_scatter(
            x=df["rank"],
            y=df["rank_requantised"],
            mode="markers",
            marker={"color": df["layer"], "colorscale": "Viridis", "showscale": True},
            text=[f"layer {r.layer} head {r.head}" for r in df.itertuples()],
            name="heads",
        )
        fig.update_layout(
            title=title
            or f"{self.original.model_name}: effective rank at {self.energy:.0%} energy, "
            f"before vs after one more {self.qtype} round, blocks shifted by {self.shift} "
            f"(max |change| {self.max_abs_delta})",
            xaxis_title="rank (weights as loaded)",
            yaxis_title=f"rank (re-quantised to {self.qtype})",
        )
        return fig


def attention_weight_types(model: TransformerBridge) -> set[str]:
    """GGUF types of the W_Q and W_K weight matrices of a real model (empty for any other:
    its provenance records none). Their biases, where a model has them, are float32 and left out.

    Examples:
        >>> import residkit
        >>> attention_weight_types(residkit.load("zoo:llama"))
        set()
    """
    from residkit.registry import provenance

    meta = provenance(model)
    types: dict[str, Any] = (meta or {}).get("tensor_types", {})
    return {
        str(types[k])
        for k in types
        if (".attn_q." in k or ".attn_k." in k) and k.endswith(".weight")
    }


def _default_qtype(model: TransformerBridge) -> str:
    used = attention_weight_types(model)
    if len(used) == 1 and (only := used.pop()) in QUANTISABLE:
        return str(only)
    raise ValueError(
        "pass qtype: this model carries no single quantisable GGUF type for W_Q/W_K "
        f"(found {sorted(used) or 'none'}; quantisable: {QUANTISABLE})"
    )


@entry
@torch.no_grad()
def requantisation_effect(
    model: TransformerBridge,
    *,
    qtype: str | None = None,
    shift: int | None = None,
    energy: float = 0.9,
    fold_norm: bool = False,
) -> RequantisationEffect:
    """Effective ranks of ``W_Q W_K^T`` before and after re-quantising ``W_Q`` and ``W_K``.

    Args:
        model: A bridge from :func:`residkit.load`.
        qtype: GGUF type to re-quantise with; default the type the model's GGUF file stored
            W_Q and W_K in (real models only).
        shift: Block-boundary shift; default half a block (see the module docstring for why
            0 measures nothing on weights that were dequantised from the same type).
        energy: Energy of the effective rank.
        fold_norm: As in :func:`residkit.qk_spectra`.

    Raises:
        ValueError: no ``qtype`` given for a model without one recorded, or one gguf cannot
            quantise to.
    """
    energy = check_energy(energy)
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    qtype = qtype or _default_qtype(model)
    if qtype not in QUANTISABLE:
        raise ValueError(f"cannot quantise to {qtype!r}; gguf's quantiser implements {QUANTISABLE}")
    if shift is None:
        shift = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][0] // 2
    errors: list[tuple[float, float]] = []

    def noisy(w: Tensor) -> Tensor:
        out = requantise(w, qtype, shift=shift)
        errors.append((float((out - w).double().square().sum()), float(w.double().square().sum())))
        return out

    original = qk_spectra(model, fold_norm=fold_norm)
    requantised = qk_spectra(model, fold_norm=fold_norm, weight_map=noisy)
    num, den = (sum(x) for x in zip(*errors, strict=True))
    return RequantisationEffect(original, requantised, qtype, shift, energy, (num / den) ** 0.5)
