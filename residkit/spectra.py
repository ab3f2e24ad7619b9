"""Singular values of the query-key bilinear form ``M_h = W_Q^h W_K^h^T``, per head.

Head ``h`` scores query position ``i`` against key position ``j`` with
``x_i W_Q^h (x_j W_K^h)^T = x_i M_h x_j^T`` (``x``: the normalised residual), and
``M_h`` is a ``d_model x d_model`` matrix of rank at most ``d_head``. A head whose spectrum
collapses onto a few values scores keys through a low-dimensional projection of the
residual. The paper's spectra figure plots an effective rank of ``M_h`` per head.

**Factored, never materialised.** With thin QRs ``W_Q^h = Q_q R_q``, ``W_K^h = Q_k R_k``,
``M_h = Q_q (R_q R_k^T) Q_k^T``; the orthonormal ``Q`` factors leave singular values
unchanged, so they are those of the ``d_head x d_head`` core ``R_q R_k^T``: two thin QRs
and a small SVD per head instead of a ``d_model x d_model`` SVD (``benchmarks/spectra.py``).
Under GQA query head ``h`` reads KV head ``h // (n_heads // n_kv_heads)`` (HF's
``repeat_kv``); each KV head's ``R_k`` is computed once and shared by its group.

**What the bilinear form leaves out**:

- *Rotary* rotates ``q_i`` and ``k_j`` by their positions, so the score is
  ``q_i R_{i-j} k_j^T`` with a rotation that depends on the offset; ``M_h`` is the
  zero-offset form. Rotation acts inside the ``d_head`` space: it cannot make a head read
  residual directions outside the column spaces of ``W_Q^h`` and ``W_K^h``.
- *Biases* (qwen2, gpt2, gpt_neox) add terms linear in ``x_i`` or ``x_j``; ``M_h`` is the
  bilinear part.
- *QK-norm* (qwen3, gemma3, olmo2) normalises ``q`` and ``k`` after the projection, so the
  score is not bilinear in ``x``; ``M_h`` describes the pre-norm projections only (the
  normaliser also sees directions ``M_h`` weights little).
- *The pre-attention norm* divides ``x`` by a per-token scalar (no effect on ranks) and
  multiplies by a per-channel gain; ``fold_norm=True`` folds ``diag(w + norm_offset)`` into
  both factors. LayerNorm's centring and bias are not folded. OLMo 2 has no pre-attention
  norm, so there ``fold_norm`` is a no-op and the result says so.

It is still the object the paper studies: a property of the weights alone (no prompt, no
position), the standard QK circuit, and the one whose low rank would let a head's scores be
computed from a few directions of the residual. Random-init zoo weights give near-full-rank
heads; the low, heterogeneous ranks the paper reports (layer 0 near rank 1) are learned.

Examples:
    >>> import residkit
    >>> from residkit.spectra import qk_spectra
    >>> spectra = qk_spectra(residkit.load("zoo:llama"))
    >>> spectra.singular_values.shape
    torch.Size([4, 4, 16])
    >>> list(spectra.table.columns)
    ['layer', 'head', 'kv_head', 'rank', 'rank_fraction']
"""

import operator
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge import hf_model, n_kv_heads, norms_folded
from residkit._entry import entry
from residkit._validate import check_energy
from residkit.architectures import spec_for
from residkit.qk_svd import explicit_qk_svdvals, kv_head_of, layers_per_chunk, qk_singular_values

__all__ = [
    "MEASURES",
    "QKSpectra",
    "check_energy",
    "explicit_qk_svdvals",
    "kv_head_of",
    "qk_singular_values",
    "qk_spectra",
]

MEASURES = ("sigma2", "sigma")
"""What the effective rank accumulates: ``sigma**2`` (energy, the default) or ``sigma``."""


def _check_measure(measure: Any) -> str:
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; choose one of {', '.join(MEASURES)}")
    return str(measure)


@dataclass(frozen=True)
class QKSpectra:
    """Singular values of ``M_h = W_Q^h W_K^h^T`` for every layer and query head.

    Attributes:
        singular_values: Descending singular values per (layer, query head).
        model_name: Label of the model.
        family: residkit family (a key of ``ARCH_TABLE``).
        n_heads: Query heads per layer.
        n_kv_heads: KV heads per layer (``n_heads`` without GQA).
        d_head: Head dimension.
        d_model: Residual width.
        fold_norm: Whether folding the pre-attention norm gain was asked for.
        norm_folded: Whether a gain was actually folded (False for OLMo 2, which has no
            pre-attention norm, even when ``fold_norm`` is True).
        rank_rtol: Singular values at most ``rank_rtol * sigma_max`` of their head count as
            zero in :meth:`effective_rank`: rounding noise, not directions.
        notes: Caveats about this result, in words.

    Examples:
        >>> import residkit
        >>> spectra = residkit.qk_spectra(residkit.load("zoo:llama"))
        >>> spectra.singular_values.shape, spectra.ranks(0.9).shape
        (torch.Size([4, 4, 16]), torch.Size([4, 4]))
    """

    singular_values: Float[Tensor, "layer head d_head"]
    model_name: str
    family: str
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    fold_norm: bool = False
    norm_folded: bool = False
    rank_rtol: float = 1e-12
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _, heads, d_head = self.singular_values.shape
        if heads != self.n_heads or d_head != self.d_head:
            raise ValueError(
                f"singular_values has shape {tuple(self.singular_values.shape)}, expected "
                f"[layer, {self.n_heads}, {self.d_head}]"
            )
        kv_head_of(0, self.n_heads, self.n_kv_heads)  # validates the GQA grouping

    @property
    def n_layers(self) -> int:
        """Number of layers."""
        return int(self.singular_values.shape[0])

    @property
    def kv_heads(self) -> list[int]:
        """KV head read by each query head, in query-head order."""
        return [kv_head_of(h, self.n_heads, self.n_kv_heads) for h in range(self.n_heads)]

    def _tails(self, measure: str) -> Float[Tensor, "layer head k"]:
        # tails[..., k] = mass of the values after the top k; k runs 0..d_head.
        s = self.singular_values.double()
        keep = s > self.rank_rtol * s[..., :1]  # also drops everything of an all-zero head
        w = torch.where(keep, s.square() if measure == "sigma2" else s, torch.zeros_like(s))
        tails = w.flip(-1).cumsum(-1).flip(-1)
        return F.pad(tails, (0, 1))

    def cumulative_share(
        self, layer: int, head: int, *, measure: str = "sigma2"
    ) -> Float[Tensor, " d_head"]:
        """Share of ``sigma**2`` (or ``sigma``) in the top ``k`` values, ``k = 1..d_head``."""
        tails = self._tails(_check_measure(measure))[layer, head]
        total = tails[0]
        if total == 0:
            return torch.ones(self.d_head, dtype=tails.dtype)
        return 1.0 - tails[1:] / total

    def ranks(self, energy: Any = 0.9, *, measure: str = "sigma2") -> Int[Tensor, "layer head"]:
        """Effective rank per (layer, head) as a tensor; see :meth:`effective_rank`."""
        e = check_energy(energy)
        tails = self._tails(_check_measure(measure))
        # Comparing the tail (not the cumulative sum) with its budget is exact at the edges:
        # energy 0 allows the whole mass (k = 0); energy 1 allows none (k = #nonzero).
        ok = tails <= (1.0 - e) * tails[..., :1]
        return ok.int().argmax(dim=-1)

    def effective_rank(self, energy: Any = 0.9, *, measure: str = "sigma2") -> pd.DataFrame:
        """Smallest number of singular values that carry ``energy`` of the head's mass.

        ``rank = min{k in 0..d_head : sum_{i>k} w_i <= (1 - energy) * sum_i w_i}`` with
        ``w_i = sigma_i**2`` (``measure="sigma2"``, the default) or ``sigma_i``
        (``measure="sigma"``), after setting ``sigma_i <= rank_rtol * sigma_max`` to zero.
        So ``energy=0`` gives 0 and ``energy=1`` gives the number of nonzero singular values
        (``rank_rtol`` is ``1e-12`` in float64: the factored and explicit SVDs agree to
        about 1e-15 relative, so a value below that is rounding, not a direction).

        Args:
            energy: Share in ``[0, 1]``.
            measure: ``"sigma2"`` or ``"sigma"``.

        Returns:
            Columns ``layer, head, kv_head, rank, rank_fraction`` (``rank / d_head``).

        Raises:
            ValueError: energy not a number in ``[0, 1]`` (NaN included), or an unknown
                measure.

        Examples:
            >>> import residkit
            >>> spectra = qk_spectra(residkit.load("zoo:llama"))
            >>> int(spectra.effective_rank(0.0)["rank"].max())
            0
            >>> int(spectra.effective_rank(1.0)["rank"].min())
            16
        """
        ranks = self.ranks(energy, measure=measure).numpy().ravel()
        layers, heads = (a.ravel() for a in np.indices((self.n_layers, self.n_heads)))
        return pd.DataFrame(
            {
                "layer": layers,
                "head": heads,
                "kv_head": np.array(self.kv_heads)[heads],
                "rank": ranks,
                "rank_fraction": ranks / self.d_head,
            }
        )

    def per_kv_head(self, energy: Any = 0.9, *, measure: str = "sigma2") -> pd.DataFrame:
        """Effective rank aggregated per (layer, KV head) over the query heads that read it.

        The paper plots one dot per KV head: under GQA the keys of a KV head serve several
        query heads, each with its own ``M_h``.

        Returns:
            Columns ``layer, kv_head, n_query_heads, mean_rank, max_rank, min_rank,
            mean_rank_fraction``.

        Examples:
            >>> import residkit
            >>> table = qk_spectra(residkit.load("zoo:llama")).per_kv_head()
            >>> table.shape, int(table["n_query_heads"].iloc[0])
            ((8, 7), 2)
        """
        table = self.effective_rank(energy, measure=measure)
        out = (
            table.groupby(["layer", "kv_head"])
            .agg(
                n_query_heads=("head", "size"),
                mean_rank=("rank", "mean"),
                max_rank=("rank", "max"),
                min_rank=("rank", "min"),
            )
            .reset_index()
        )
        out["mean_rank_fraction"] = out["mean_rank"] / self.d_head
        return out

    @property
    def table(self) -> pd.DataFrame:
        """:meth:`effective_rank` at ``energy=0.9``."""
        return self.effective_rank(0.9)

    def figure(
        self, *, title: str | None = None, energy: Any = 0.9, measure: str = "sigma2"
    ) -> go.Figure:
        """Rank heatmap (layer x head); see :func:`residkit.viz.spectra.rank_heatmap`."""
        from residkit.viz.spectra import rank_heatmap

        return rank_heatmap(self, energy, measure=measure, title=title)


def _model_name(model: TransformerBridge) -> str:
    name = str(getattr(model.cfg, "model_name", None) or "model")
    path = Path(name)
    return path.name if path.is_absolute() else name


def _attn_norm_gains(
    model: TransformerBridge, dtype: torch.dtype
) -> tuple[Float[Tensor, "layer d_model"] | None, str]:
    """Per-layer gain ``w + norm_offset`` of the norm feeding Q/K, or None and why not."""
    spec = spec_for(model)
    if spec.attn_norm_path is None:
        return None, (
            f"{spec.family} has no pre-attention norm (Q/K read the raw residual), "
            "so fold_norm is a no-op"
        )
    if norms_folded(model):
        return None, "the bridge already folded the norm gains into W_Q/W_K; fold_norm is a no-op"
    layers = operator.attrgetter(spec.layers_path)(hf_model(model))
    gains = []
    for layer in layers:
        weight = getattr(operator.attrgetter(spec.attn_norm_path)(layer), "weight", None)
        if weight is None:
            return None, "the pre-attention norm has no gain, so fold_norm is a no-op"
        # In ``dtype``: float32 would round 1 + w (Gemma) before the float64 factorisation.
        gains.append(weight.detach().to(dtype) + spec.norm_offset)
    return torch.stack(gains), f"folded diag(w + {spec.norm_offset:g}) of {spec.attn_norm_path}"


@entry
@torch.no_grad()
def qk_spectra(
    model: TransformerBridge,
    *,
    fold_norm: bool = False,
    dtype: torch.dtype = torch.float64,
    name: str | None = None,
    weight_map: Callable[[Tensor], Tensor] | None = None,
) -> QKSpectra:
    """Singular values of ``W_Q^h W_K^h^T`` for every layer and query head of ``model``.

    Reads the bridge's per-block ``attn.W_Q`` / ``attn.W_K`` (``[heads, d_model, d_head]``,
    K not expanded under GQA). The bridge splits fused projections (gpt2 ``c_attn``,
    gpt_neox ``query_key_value``, phi3 ``qkv_proj``) into these; ``tests/test_spectra.py``
    checks on all ten zoo families that they reproduce the projections the model computes.
    Adds no hooks and changes nothing on the model.

    Args:
        model: A bridge from :func:`residkit.load`.
        fold_norm: Fold the pre-attention norm gain ``diag(w + norm_offset)`` into both
            factors (``W_Q <- diag(g) W_Q``, ``W_K <- diag(g) W_K``). A no-op, flagged in
            ``notes`` and ``norm_folded=False``, where there is no pre-attention norm.
        dtype: Precision of the factorisations.
        name: Label for the result (default: the model's name).
        weight_map: Applied to each chunk of ``W_Q`` and ``W_K`` (``[layer, heads, d_model,
            d_head]``, the model's dtype) before anything else, e.g. to re-quantise them
            (:func:`residkit.quantisation.requantisation_effect`). The model is not changed.

    Returns:
        A :class:`QKSpectra`.

    Examples:
        >>> import residkit
        >>> spectra = qk_spectra(residkit.load("zoo:olmo2"), fold_norm=True)
        >>> spectra.fold_norm, spectra.norm_folded
        (True, False)
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if not isinstance(fold_norm, bool):
        raise TypeError(f"fold_norm must be True or False, got {fold_norm!r}")
    spec = spec_for(model)
    cfg = model.cfg
    n_heads = int(cfg.n_heads)
    n_kv = n_kv_heads(model)
    gains, how = _attn_norm_gains(model, dtype) if fold_norm else (None, "")
    blocks = list(model.blocks)
    d_model, d_head = blocks[0].attn.W_Q.shape[-2:]
    step = layers_per_chunk(n_heads + n_kv, d_model, d_head, dtype)
    out = []
    for start in range(0, len(blocks), step):
        chunk = blocks[start : start + step]
        w_q = torch.stack([b.attn.W_Q.detach() for b in chunk])
        w_k = torch.stack([b.attn.W_K.detach() for b in chunk])
        if weight_map is not None:
            w_q, w_k = weight_map(w_q), weight_map(w_k)
        w_q, w_k = w_q.to(dtype), w_k.to(dtype)
        if w_q.shape[1] != n_heads or w_k.shape[1] != n_kv:
            raise ValueError(
                f"W_Q/W_K have {w_q.shape[1]}/{w_k.shape[1]} heads, expected "
                f"{n_heads}/{n_kv} (cfg.n_heads / n_key_value_heads)"
            )
        if gains is not None:
            g = gains[start : start + step, None, :, None]
            w_q, w_k = g * w_q, g * w_k
        out.append(qk_singular_values(w_q, w_k, dtype=dtype))
    notes = [how] if fold_norm else []
    if spec.k_norm is not None:
        notes.append("QK-norm after the projection: M_h is the pre-norm bilinear form")
    if spec.position != "absolute":
        notes.append("rotary: the score at offset n is q R_n k^T; M_h is the n = 0 form")
    eps = torch.finfo(dtype).eps
    return QKSpectra(
        singular_values=torch.cat(out),
        model_name=name or _model_name(model),
        family=spec.family,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        d_head=int(d_head),
        d_model=int(d_model),
        fold_norm=fold_norm,
        norm_folded=gains is not None,
        rank_rtol=max(1e-12, int(d_model) * eps),  # 1e-12 in float64; looser in float32
        notes=tuple(notes),
    )
