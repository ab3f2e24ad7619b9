"""AtP*'s correction for attention saturation, for residual-stream patching (``resid_pre``).

A residual patched into block ``l`` at position ``p`` changes block ``l``'s attention pattern
through two vectors only: the query at ``p`` (row ``p`` of the pattern) and the key at ``p``
(column ``p``, for the queries at ``p`` and after). Plain attribution patching takes that change
through the gradient of the softmax, which is near zero where attention is saturated, so a
patch that moves attention a lot can be estimated as doing nothing (Kramár et al. 2024, AtP*,
section 3.1). The correction replaces that part of the estimate:

    estimate* = estimate - (dm/dq . J_q dr + dm/dk . J_k dr)  +  sum_hij dm/dA_hij * dA_hij

where the subtracted term is the query and key paths of the plain estimate (a vector-Jacobian
product of the corrupted run's own graph, exact), and ``dA`` is the pattern change computed
exactly through the softmax from the patched run's query and key at ``p``. Those are the clean
run's own query and key at ``p`` (they depend only on that position's residual and position),
read from its hooks. Every other path (values, the MLP, later blocks) stays first order.

The scores are recomputed as ``scale * q . k`` from the hooks TransformerLens exposes (the
rotated ``hook_rot_q``/``hook_rot_k`` where the family has them, else ``hook_q``/``hook_k``),
with ``scale`` fitted to the model's own ``hook_attn_scores``; a family whose scores are not of
that form (soft-capped, for one) is refused with the measured misfit rather than estimated
wrongly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge import temporary_hooks
from residkit.architectures import spec_for

__all__ = ["qk_terms", "score_hooks"]


def score_hooks(model: TransformerBridge, layer: int) -> tuple[str, str, str, str]:
    """Hook names of block ``layer``'s scoring query and key, its scores and its pattern."""
    attn = f"blocks.{layer}.attn."
    rotated = f"{attn}hook_rot_q" in model.hook_dict
    q, k = ("hook_rot_q", "hook_rot_k") if rotated else ("hook_q", "hook_k")
    names = (attn + q, attn + k, attn + "hook_attn_scores", attn + "hook_pattern")
    missing = [n for n in names if n not in model.hook_dict]
    if missing:
        raise ValueError(
            f"correction='qk' needs the attention hooks {missing}; this model lacks them"
        )
    return names


def _heads(x: Tensor, n_heads: int) -> Tensor:
    """``[pos, kv_heads, d]`` -> ``[heads, pos, d]`` (grouped-query keys repeated)."""
    return x.repeat_interleave(n_heads // x.shape[1], dim=1).transpose(0, 1)


def _exact_change(
    q: Tensor, k: Tensor, q_clean: Tensor, k_clean: Tensor, scores: Tensor, pattern: Tensor,
    grad: Tensor, layer: int,
) -> Tensor:  # fmt: skip
    """``sum_hij grad_hij * dA_hij`` for a patch at each position ``p``: ``[pos]`` (one row).

    ``q, q_clean``: ``[heads, pos, d]``; ``k, k_clean`` likewise; ``scores, pattern, grad``:
    ``[heads, pos, pos]``, the corrupted run's, in float64.
    """
    n = scores.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=scores.device).tril()
    valid = causal & (scores > -1e4)  # masked scores are -inf or a large negative
    dots = q @ k.transpose(1, 2)
    scale = float(
        (scores * dots)[valid.expand_as(dots)].sum() / (dots * dots)[valid.expand_as(dots)].sum()
    )
    misfit = float((scores - scale * dots)[valid.expand_as(dots)].abs().max())
    if misfit > 1e-3 * float(scores[valid.expand_as(dots)].abs().max()) + 1e-5:
        raise ValueError(
            f"correction='qk': block {layer}'s attention scores are not scale * q.k of its hooks "
            f"(misfit {misfit:.3g} at the best scale {scale:.4g}); this family is not supported"
        )
    # Column p for the queries after p: only score (i, p) changes, so the row's softmax is
    # rescaled. With t = A_ip * exp(new - old): A'_ip = t / (1 - A_ip + t), others * 1 / (...).
    new_col = scale * (q @ k_clean.transpose(1, 2))  # [h, i, p]
    after = torch.ones(n, n, dtype=torch.bool, device=scores.device).tril(-1) & valid
    log_t = torch.log(pattern) + (new_col - scores)
    t = torch.exp(torch.clamp(torch.where(after, log_t, torch.zeros_like(log_t)), max=80.0))
    a = torch.where(after, pattern, torch.zeros_like(pattern))
    ratio = 1.0 / (1.0 - a + t)
    ga = (grad * pattern).sum(-1, keepdim=True)  # [h, i, 1]
    column = (ratio - 1.0) * (ga - grad * a) + grad * (t * ratio - a)
    column = torch.where(after, column, torch.zeros_like(column)).sum(dim=(0, 1))  # [p]
    # Row p: query p is the clean one against the corrupted keys before p, and key p is clean.
    row_scores = scale * (q_clean @ k.transpose(1, 2))  # [h, p, j]
    diag = scale * (q_clean * k_clean).sum(-1)  # [h, p]
    row_scores = row_scores.clone()
    row_scores[:, torch.arange(n), torch.arange(n)] = diag
    row_scores = torch.where(valid, row_scores, torch.full_like(row_scores, float("-inf")))
    new_rows = torch.softmax(row_scores, dim=-1)
    row = (grad * (new_rows - pattern)).sum(dim=(0, 2))  # [p]
    return column + row


def qk_terms(
    model: TransformerBridge,
    clean: Tensor,
    corrupted: Tensor,
    metric: Callable[[Tensor], Tensor],
    per_row: Callable[[Any, int], Tensor],
) -> tuple[Tensor, Tensor]:
    """For every block and position, the query and key part of the plain ``resid_pre``
    estimate and its exact replacement: two ``[layer, batch, pos]`` tensors."""
    spec, n_layers, n_heads = spec_for(model), model.cfg.n_layers, model.cfg.n_heads
    resid = [spec.resid_hook(layer, n_layers) for layer in range(n_layers)]
    names = [score_hooks(model, layer) for layer in range(n_layers)]
    # Hooks are keyed by the name they were added under: the bridge's aliases (hook_resid_pre
    # for a block's hook_in) report their target's name.
    seen: dict[str, Tensor] = {}

    def keeper(name: str) -> Callable[[Tensor, Any], None]:
        return lambda act, hook: seen.__setitem__(name, act.detach().clone())

    clean_points = [(n, keeper(n)) for n in resid + [n for qk in names for n in qk[:2]]]
    with torch.no_grad(), temporary_hooks(model, clean_points):
        model(clean)
    clean_seen, seen = seen, {}
    zeros: dict[str, Tensor] = {}
    outs: dict[str, Tensor] = {}

    def add_zero(name: str) -> Callable[[Tensor, Any], Tensor]:
        def hook(act: Tensor, hook: Any) -> Tensor:
            zero = torch.zeros_like(act, requires_grad=True)
            seen[name], zeros[name] = act.detach(), zero
            outs[name] = act + zero
            return outs[name]

        return hook

    points = resid + [n for qk in names for n in (qk[0], qk[1], qk[3])]
    hooks = [(p, add_zero(p)) for p in points] + [(qk[2], keeper(qk[2])) for qk in names]
    with torch.enable_grad(), temporary_hooks(model, hooks):
        values = per_row(metric(model(corrupted)), corrupted.shape[0])
        wanted = [zeros[n] for qk in names for n in (qk[0], qk[1], qk[3])]
        grads = dict(zip([n for qk in names for n in (qk[0], qk[1], qk[3])],
                         torch.autograd.grad(values.sum(), wanted, retain_graph=True,
                                             allow_unused=True), strict=True))  # fmt: skip
        linear, exact = [], []
        for layer, (q_name, k_name, s_name, a_name) in enumerate(names):
            g_q = grads[q_name] if grads[q_name] is not None else torch.zeros_like(seen[q_name])
            g_k = grads[k_name] if grads[k_name] is not None else torch.zeros_like(seen[k_name])
            (through_qk,) = torch.autograd.grad(
                [outs[q_name], outs[k_name]], [zeros[resid[layer]]], grad_outputs=[g_q, g_k],
                retain_graph=True, allow_unused=True,
            )  # fmt: skip
            diff = clean_seen[resid[layer]] - seen[resid[layer]]
            through = torch.zeros_like(diff) if through_qk is None else through_qk
            linear.append((through.double() * diff.double()).sum(-1))
            g_a = grads[a_name] if grads[a_name] is not None else torch.zeros_like(seen[a_name])
            rows = [
                _exact_change(
                    _heads(seen[q_name][b].double(), n_heads),
                    _heads(seen[k_name][b].double(), n_heads),
                    _heads(clean_seen[q_name][b].double(), n_heads),
                    _heads(clean_seen[k_name][b].double(), n_heads),
                    seen[s_name][b].double(),
                    seen[a_name][b].double(),
                    g_a[b].double(),
                    layer,
                )
                for b in range(corrupted.shape[0])
            ]
            exact.append(torch.stack(rows))
    return torch.stack(linear).float(), torch.stack(exact).float()
