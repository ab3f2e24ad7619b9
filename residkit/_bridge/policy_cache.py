"""A ``transformers`` cache that does its work inside the forwards it is given.

Every residkit cache policy builds one of these (:meth:`residkit.policies.CachePolicy.make_cache`).
It is a ``DynamicCache``, so any decoding loop that takes a transformers cache drives it:
transformers' ``generate`` on the wrapped model, TransformerLens's ``generate``, or a loop over
``model(ids, past_key_values=cache)``. What the policy needs from a forward beyond K/V (the
residual entering a layer, attention weights, the token ids) it takes through hooks on the
model's own hook points, which the cache holds while it is *attached*::

    with policy.make_cache(model) as cache:    # hooks on the model for the block only
        model.original_model.generate(ids, past_key_values=cache, ...)

**Which forwards are the cache's.** Hooks fire on every forward of the model, with this cache or
without it. A forward *arms* the cache when its token ids reach ``embed.hook_in``; the cache
*claims* it when the model consults the cache (``get_seq_length`` / ``get_mask_sizes``, which a
transformers model calls before its first decoder layer); the forward ends at the final norm's
input. Hooks act only inside a claimed forward, so another forward on the same model while the
cache is attached changes nothing in it.

**A forward without the hooks fails loudly.** ``update`` of a layer in a forward that was never
claimed means the forward did not pass this cache's hooks: the cache is not attached, its hooks
were removed, or it was given to another model. Each raises :class:`CacheHooksError` naming the
cause, as does a layer index the cache was not built for. Without that check a policy cache
would act as an ever-growing full cache, silently.

**Batches.** A forward's 2-D ``attention_mask`` and ``position_ids`` (what the bridge or
transformers' ``generate`` hands the wrapped model) are read by a keyword pre-hook on the wrapped
model while attached: :attr:`HookedCache.mask` is the latest left-padded mask (None while no
token is masked) and :attr:`HookedCache.forward_positions` the positions of the forward under
way (None when they are the default ``arange``). Policies that recompute K/V replay them with the
same mask and positions; eviction policies rank padding below every real token.

The attention bridges of TransformerLens 4.3 read the cache under its pre-5.24 name only; while
attached, the cache also hands it back under that name (:func:`cache_argument_shim`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, TypeVar

import torch
from torch import Tensor
from transformers import DynamicCache

from residkit._bridge.cache import cache_argument_shim
from residkit._bridge.hooks import (
    OURS,
    carries,
    edit_watch,
    foreign_hooked,
    point_names,
    run_last,
)
from residkit._bridge.model import hf_config

__all__ = ["CacheHooksError", "HookedCache"]

Hook = Callable[[Tensor, Any], Any]
C = TypeVar("C", bound="HookedCache")


class CacheHooksError(RuntimeError):
    """A residkit cache was given to a forward that did not pass through its hooks."""


class _InputsNote:
    """A keyword pre-hook on the wrapped HF model: the mask and positions a forward was given."""

    def __init__(self) -> None:
        self.given: tuple[Tensor | None, Tensor | None] = (None, None)

    def __call__(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        self.given = (kwargs.get("attention_mask"), kwargs.get("position_ids"))


def left_padded_mask(mask: Tensor | None, batch: int, length: int) -> Tensor | None:
    """``mask`` as bool ``[batch, length]``, or None when it masks nothing; a ValueError for a
    mask of another shape or one that is not left padding (a zero after a one)."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"attention_mask must be a tensor [batch, pos] of 0/1, got {mask!r:.80}")
    if mask.ndim != 2 or tuple(mask.shape) != (batch, length):
        raise ValueError(
            f"a residkit cache takes a 2-D attention_mask [batch, past + new] = [{batch}, "
            f"{length}], got shape {tuple(mask.shape)}"
        )
    bool_mask = mask.bool()
    if bool(bool_mask.all()):
        return None
    # Left padding: once a row's first real token is reached, every later token is real.
    gaps = bool_mask.long().cummax(dim=1).values.bool() & ~bool_mask
    if bool(gaps.any()):
        row = int(gaps.any(dim=1).nonzero()[0])
        raise ValueError(
            f"attention_mask row {row} masks a token after a real one; residkit caches take "
            "left padding only (tokenizer.padding_side = 'left', as transformers' generate wants)"
        )
    return bool_mask


class _Attachment:
    """The hooks one attached cache holds on its model."""

    def __init__(self, hooks: list[tuple[str, Hook]]) -> None:
        self.stack = ExitStack()
        self.hooks = hooks
        self.fns: list[Hook] = [fn for _, fn in hooks]
        self.points: list[Any] = []


class HookedCache(DynamicCache):
    """Base of residkit's policy caches (see the module docstring).

    Subclasses list their hooks in :meth:`forward_hooks` and act in :meth:`begin_forward`
    (the forward was claimed: its token ids are known, no block has run) and
    :meth:`end_forward` (every block has run). Hooks they list are called only inside a
    claimed forward.
    """

    tokens_hook = "embed.hook_in"
    final_hook = "ln_final.hook_in"

    def __init__(self, model: Any, label: str) -> None:
        super().__init__(config=hf_config(model))
        self.model = model
        self.label = label
        self.n_layers = len(self.layers)
        self._attached: _Attachment | None = None
        self._ids: Tensor | None = None  # the armed forward's token ids
        self._claimed = False
        self._updated: set[int] = set()
        self._watch: ExitStack | None = None
        self._edited: set[str] = set()
        self._note = _InputsNote()
        self._inputs: tuple[Tensor | None, Tensor | None] = (None, None)
        self.fed = 0  # tokens fed through claimed forwards
        self.mask: Tensor | None = None  # latest left-padded 2-D mask; None while all real
        self.forward_positions: Tensor | None = None  # [batch, q] unless the default arange

    # --- what a subclass provides ---------------------------------------------------------
    def forward_hooks(self) -> list[tuple[str, Hook]]:
        """``(hook name, fn(act, hook))`` pairs called inside claimed forwards."""
        return []

    def begin_forward(self, ids: Tensor) -> None:
        """The forward of ``ids`` uses this cache; no decoder layer has run yet."""

    def end_forward(self) -> None:
        """Every decoder layer of the claimed forward has run."""

    def watched_points(self) -> list[Any]:
        """Hook points whose edits by user hooks a claimed forward refuses (see
        :meth:`edited_message`); none by default."""
        return []

    def edited_message(self, names: str) -> str:
        return f"hooks at {names} changed activations this cache cannot reproduce"

    # --- lifecycle --------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        """Whether the cache's hooks are on its model now."""
        return self._attached is not None

    def attach(self: C) -> C:
        """Put the cache's hooks on its model (``with cache:`` does this and :meth:`detach`)."""
        if self._attached is not None:
            return self
        att = _Attachment(
            [
                (self.tokens_hook, self._arm),
                (self.final_hook, self._end),
                *[(name, self._gated(fn)) for name, fn in self.forward_hooks()],
            ]
        )
        try:
            att.stack.enter_context(self.model.hooks(fwd_hooks=att.hooks))
            att.stack.enter_context(cache_argument_shim(self.model))
            att.stack.enter_context(_noting_inputs(self.model, self._note))
        except BaseException:
            att.stack.close()
            raise
        att.points = list(
            {id(p): p for p in (self.model.hook_dict[n] for n, _ in att.hooks)}.values()
        )
        self._attached = att
        return self

    def detach(self) -> None:
        """Remove the cache's hooks from the model; its state stays (re-attach to go on)."""
        att, self._attached = self._attached, None
        self._close_watch()
        self._ids, self._claimed = None, False
        if att is not None:
            att.stack.close()

    def __enter__(self: C) -> C:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # --- the forward ------------------------------------------------------------------------
    def _arm(self, ids: Tensor, hook: Any) -> None:
        self._close_watch()
        self._ids, self._claimed = ids, False
        self._inputs, self._note.given = self._note.given, (None, None)
        self._updated.clear()

    def _claim(self) -> None:
        if self._ids is None or self._claimed or self._attached is None:
            return
        self._claimed = True
        # Hooks a user added since the cache was attached would otherwise run after ours.
        run_last(self._attached.points, self._attached.fns)
        user = foreign_hooked(self.watched_points(), self._attached.fns)
        if user:
            self._watch = ExitStack()
            self._edited = self._watch.enter_context(edit_watch(user))
        self._read_inputs(self._ids)
        self.begin_forward(self._ids)

    def _read_inputs(self, ids: Tensor) -> None:
        """:attr:`mask` and :attr:`forward_positions` of the forward of ``ids``."""
        given_mask, given_positions = self._inputs
        batch, q = ids.shape
        if given_mask is None:
            # A forward without a mask: its tokens are real, the past keeps its padding.
            mask = (
                None
                if self.mask is None
                else torch.cat([self.mask, self.mask.new_ones(batch, q)], dim=1)
            )
        else:
            mask = left_padded_mask(given_mask, batch, self.fed + q)
            past = self.mask if self.mask is not None else None
            now = None if mask is None else mask[:, : self.fed]
            same = (past is None and (now is None or bool(now.all()))) or (
                past is not None and now is not None and torch.equal(now, past)
            )
            if not same:
                raise ValueError(
                    "attention_mask changed a token already in the cache; pass the mask of the "
                    "whole sequence so far, extended by ones for the new tokens"
                )
        self.mask = mask
        positions = given_positions
        if positions is not None:
            default = torch.arange(self.fed, self.fed + q, device=positions.device)
            if positions.ndim != 2 or bool((positions == default).all()):
                positions = None
            else:
                positions = positions.expand(batch, q)
        self.forward_positions = positions

    def row_padding(self) -> Tensor | None:
        """Leading padding tokens per row ``[batch]`` (None when no token is masked)."""
        if self.mask is None:
            return None
        return (~self.mask).long().cumprod(dim=1).sum(dim=1)

    def _gated(self, fn: Hook) -> Hook:
        def gated(act: Tensor, hook: Any) -> Any:
            return fn(act, hook) if self._claimed else None

        return gated

    @property
    def forward_ids(self) -> Tensor | None:
        """Token ids of the forward under way (None between forwards)."""
        return self._ids

    def _end(self, act: Tensor, hook: Any) -> None:
        claimed, edited = self._claimed, set(self._edited)
        self._close_watch()
        try:
            if claimed and edited:
                raise ValueError(self.edited_message(point_names(self.model, edited)))
            if claimed:
                self.end_forward()
                assert self._ids is not None
                self.fed += self._ids.shape[1]
        finally:
            self._claimed, self._ids = False, None

    def _close_watch(self) -> None:
        if self._watch is not None:
            self._watch.close()
        self._watch, self._edited = None, set()

    def _unhooked(self, what: str) -> CacheHooksError:
        return CacheHooksError(
            f"{what.format(label=self.label)} without passing through the cache's hooks: "
            f"{self._why_unhooked()}. Without them the policy would not act and the cache would "
            "silently keep every token's K/V (or, unattached, none at all)"
        )

    def _why_unhooked(self) -> str:
        if self._attached is None:
            return (
                "it is not attached to a model: use it inside `with policy.make_cache(model) as "
                "cache:` (or call cache.attach() first)"
            )
        missing = [n for n in (self.tokens_hook, self.final_hook) if not self._has_ours(n)]
        if missing:
            return (
                f"its hooks at {', '.join(missing)} were removed from the model (reset_hooks?); "
                "make a new cache"
            )
        return (
            f"the forward ran on another model than the one it was made for "
            f"({type(self.model.original_model).__name__}, {self.n_layers} layers), "
            "or with its hook points muted"
        )

    def _has_ours(self, name: str) -> bool:
        assert self._attached is not None
        return carries(self.model.hook_dict[name], self._attached.fns)

    # --- transformers' Cache protocol --------------------------------------------------------
    def get_seq_length(self, *args: Any, **kwargs: Any) -> int:
        self._claim()
        return super().get_seq_length(*args, **kwargs)

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> Any:
        # Only a forward asks for mask sizes. One that was not armed did not pass the hooks,
        # and on transformers >= 5.24 its attention would not even reach update() unattached.
        self._claim()
        if not self._claimed:
            raise self._unhooked("a forward asked this {label} cache for its mask")
        return super().get_mask_sizes(*args, **kwargs)

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kw: Any
    ) -> tuple[Tensor, Tensor]:
        if not 0 <= layer_idx < self.n_layers:
            raise CacheHooksError(
                f"this {self.label} cache was made for a model with {self.n_layers} layers and "
                f"received layer {layer_idx}: it was given to another model's forward"
            )
        if not self._claimed or layer_idx in self._updated:
            raise self._unhooked(f"a forward reached layer {layer_idx} of this {{label}} cache")
        self._updated.add(layer_idx)
        return super().update(key_states, value_states, layer_idx, *args, **kw)

    def _unsupported(self, what: str) -> None:
        raise NotImplementedError(
            f"a {self.label} cache does not support {what} (beam search, assisted decoding and "
            "num_return_sequences > 1 need it); decode with FullCache for those"
        )

    def crop(self, max_length: int) -> None:
        self._unsupported("crop()")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._unsupported("batch_repeat_interleave()")

    def batch_select_indices(self, indices: Tensor) -> None:
        self._unsupported("batch_select_indices()")

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self._unsupported("reorder_cache()")


@contextmanager
def _noting_inputs(model: Any, note: _InputsNote) -> Iterator[None]:
    handle = model.original_model.register_forward_pre_hook(note, with_kwargs=True)
    OURS.add(note)
    try:
        yield
    finally:
        handle.remove()
        OURS.discard(note)


@contextmanager
def attached(cache: C) -> Iterator[C]:
    """``cache`` attached for the block, detached after if it was not attached before."""
    was = cache.attached
    cache.attach()
    try:
        yield cache
    finally:
        if not was:
            cache.detach()
