"""Fuzz cases for the surfaces users reach through transformers and through batches: policy
caches in transformers' ``generate``, batched and padded prompts, dtype and device arguments,
cell files, the patching sweep, the cross-task suite, the frontier, ``kept_positions``,
``spec_for`` and ``reproduce``'s arguments.

As in ``tests/fuzz_cases.py``: a result or a TypeError / ValueError, the model as it was. Where
a call is exact by construction (KV-Direct against the full cache, in float32 and in bfloat16),
the case also checks that the tokens are the full cache's: no silent change.
"""

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import residkit
from residkit import H2O, TOVA, FullCache, KVDirect, SnapKV, StreamingLLM, Window
from residkit.comparison import kept_positions
from residkit.generation import Chat
from residkit.patching import patching_sweep
from tests.conftest import get_model
from tests.fuzz_cases import FUZZ, junk, mostly, numbers, prompts, run, small, tensors

ids_of = st.builds(lambda n: torch.randint(3, 259, (n,)), st.integers(1, 7))
batches = st.lists(ids_of, min_size=1, max_size=3)
budgets = mostly(st.integers(1, 6), st.one_of(st.integers(-2, 0), junk))
chunks = mostly(st.one_of(st.none(), st.integers(1, 5)), st.one_of(st.integers(-2, 0), junk))
scopes = mostly(st.sampled_from(["global", "all"]), st.one_of(st.just("some"), junk))
exact = st.one_of(
    st.builds(KVDirect, st.integers(0, 6), st.sampled_from(["layer", "token"]),
              prefill_chunk=st.one_of(st.none(), st.integers(1, 5))),
    st.builds(KVDirect, st.integers(0, 6), st.just("stride"), stride=st.integers(1, 3),
              prefill_chunk=st.one_of(st.none(), st.integers(1, 5))),
)  # fmt: skip
# Eviction policies as recipes (class, args, kwargs), built inside the call: a bad setting
# must fail there, with the model in hand, as it does for a user.
evicting = st.one_of(
    st.tuples(st.just(Window), st.tuples(budgets), st.fixed_dictionaries({"prefill_chunk": chunks, "scope": scopes})),
    st.tuples(st.just(StreamingLLM), st.tuples(budgets, mostly(st.integers(0, 3), junk)),
              st.fixed_dictionaries({"scope": scopes})),
    st.tuples(st.just(H2O), st.tuples(budgets, mostly(st.one_of(st.none(), st.integers(0, 3)), junk)),
              st.just({})),
    st.tuples(st.just(TOVA), st.tuples(budgets), st.fixed_dictionaries({"prefill_chunk": chunks})),
    st.tuples(
        st.just(SnapKV),
        st.tuples(
            budgets,
            mostly(st.integers(1, 4), junk),
            mostly(st.sampled_from([1, 3, 5]), junk),
            mostly(st.sampled_from(["avg", "max"]), st.one_of(st.just("sum"), junk)),
            mostly(st.sampled_from(["window", "append"]), junk),
        ),
        st.just({}),
    ),
)  # fmt: skip


def build(policy: Any) -> Any:
    """A policy from a recipe; anything else as it is."""
    if isinstance(policy, tuple) and len(policy) == 3 and isinstance(policy[0], type):
        make, args, kwargs = policy
        return make(*args, **kwargs)
    return policy


def _padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and their attention mask, as transformers' tokenizers make them."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


def _exact_policy(policy: Any) -> bool:
    """Whether ``policy`` is KV-Direct's exact mode (so its tokens must be the full cache's)."""
    return isinstance(policy, KVDirect) and policy.mode == "exact"


@pytest.fixture(scope="module")
def model() -> Any:
    return get_model("llama")


@pytest.fixture(scope="module")
def bf16() -> Any:
    return residkit.load("zoo:llama", dtype=torch.bfloat16)


def _hf(model: Any, policy: Any, ids: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    with policy.make_cache(model) as cache:
        return model.original_model.generate(
            ids, attention_mask=mask, past_key_values=cache, max_new_tokens=n, do_sample=False,
            pad_token_id=0,
        )  # fmt: skip


@FUZZ
@given(rows=batches, policy=st.one_of(exact, evicting), n=mostly(st.integers(1, 4), small))
def test_policy_caches_in_transformers_generate(model, rows, policy, n) -> None:
    ids, mask = _padded(rows)

    def call() -> None:
        out = _hf(model, build(policy), ids, mask, n)
        if _exact_policy(policy) and policy.prefill_chunk is None:
            assert torch.equal(out, _hf(model, FullCache(), ids, mask, n))

    run(call, model)


@FUZZ
@given(
    rows=batches,
    policy=st.one_of(exact, evicting, st.sampled_from(["full", "none", "kvdirect"])),
    n=mostly(st.integers(1, 4), small),
    mask=mostly(st.just("own"), st.one_of(st.just("ones"), tensors(), junk)),
    forced=mostly(st.none(), st.one_of(tensors(), junk)),
)
def test_generate_batches(model, rows, policy, n, mask, forced) -> None:
    ids, own = _padded(rows)
    attention = own if mask == "own" else torch.ones_like(own) if mask == "ones" else mask

    def call() -> None:
        kw = {"max_new_tokens": n, "attention_mask": attention, "forced_tokens": forced}
        out = residkit.generate(model, ids, policy=build(policy), **kw)
        if _exact_policy(policy) and mask == "own" and forced is None:
            full = residkit.generate(model, ids, policy=FullCache(policy.prefill_chunk), **kw)
            assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(out, full, strict=True))

    run(call, model)


@FUZZ
@given(rows=batches, policy=exact, n=st.integers(1, 3))
def test_bfloat16_kvdirect_is_the_full_cache(bf16, rows, policy, n) -> None:
    ids, mask = _padded(rows)

    def call() -> None:
        kw = {"max_new_tokens": n, "attention_mask": mask, "return_logits": True}
        out = residkit.generate(bf16, ids, policy=policy, **kw)
        full = residkit.generate(bf16, ids, policy=FullCache(policy.prefill_chunk), **kw)
        for a, b in zip(out, full, strict=True):
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logits, b.logits)

    run(call, bf16)


@FUZZ
@given(
    dtype=mostly(
        st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
        st.one_of(st.sampled_from([torch.int64, torch.bool, "float32", "bf16"]), junk),
    ),
    device=mostly(
        st.sampled_from([None, "cpu", torch.device("cpu")]),
        st.one_of(st.sampled_from(["cuda", "cuda:3", "meta", "mps", "tpu", "cpu:x"]), junk),
    ),
    flag=mostly(st.booleans(), st.one_of(st.sampled_from(["no", "yes", 0, 1]), junk)),
)
def test_load_dtype_device_and_flags(model, dtype, device, flag) -> None:
    def call() -> None:
        loaded = residkit.load("zoo:llama", dtype=dtype, device=device, allow_pickle=flag)
        assert next(loaded.parameters()).dtype == dtype

    run(call, model)


@FUZZ
@given(
    clean=prompts,
    corrupted=prompts,
    hook=mostly(
        st.sampled_from(["resid_pre", "resid_mid", "attn_out", "mlp_out", "z"]),
        st.one_of(st.just("q"), junk),
    ),
    positions=mostly(st.none(), st.one_of(st.lists(st.integers(-9, 9), max_size=3), junk)),
    batch=mostly(st.one_of(st.none(), st.integers(1, 4)), st.one_of(st.integers(-1, 0), junk)),
    reuse=mostly(st.booleans(), junk),
    metric=mostly(st.just("logit"), st.one_of(st.just("shape"), junk)),
)
def test_patching_sweep(model, clean, corrupted, hook, positions, batch, reuse, metric) -> None:
    fn = (
        (lambda logits: logits[:, -1, 5] - logits[:, -1, 7])
        if metric == "logit"
        else (lambda logits: logits)
        if metric == "shape"
        else metric
    )
    run(
        lambda: patching_sweep(
            model, clean, corrupted, fn, hook=hook, positions=positions, batch_size=batch,
            reuse_prefix=reuse, progress=False,
        ),
        model,
    )  # fmt: skip


@FUZZ
@given(
    tasks=mostly(
        st.dictionaries(st.sampled_from("abcd"), st.text(alphabet="xyz ", min_size=1, max_size=5),
                        min_size=1, max_size=3),
        st.one_of(st.dictionaries(st.text(max_size=2), junk, max_size=2), junk),
    ),
    layers=mostly(st.one_of(st.none(), st.lists(st.integers(0, 4), min_size=1, max_size=2)), junk),
    align=mostly(st.sampled_from(["left", "right"]), junk),
    compare=mostly(st.sampled_from(["final_residual", "logits"]), junk),
)  # fmt: skip
def test_cross_task_suite(model, tasks, layers, align, compare) -> None:
    run(
        lambda: residkit.cross_task_suite(
            model, tasks=tasks, layers=layers, align=align, compare=compare, progress=False
        ),
        model,
    )


@FUZZ
@given(prompt=prompts, policy=st.one_of(exact, evicting, junk), n=small)
def test_kept_positions(model, prompt, policy, n) -> None:
    run(lambda: kept_positions(model, prompt, build(policy), max_new_tokens=n), model)


@FUZZ
@given(
    context=mostly(st.integers(8, 64), st.one_of(st.integers(-4, 0), junk)),
    budget=mostly(st.integers(0, 8), st.one_of(st.integers(-3, -1), junk)),
    measure=mostly(st.just(False), st.one_of(st.just(True), junk)),
    steps=mostly(st.integers(1, 2), st.one_of(st.integers(-1, 0), junk)),
    name=mostly(st.one_of(st.none(), st.text(max_size=4)), junk),
)
def test_kvdirect_frontier(model, context, budget, measure, steps, name) -> None:
    run(
        lambda: residkit.kvdirect_frontier(
            model, context=context, budget=budget, measure=measure, steps=steps, name=name,
            progress=False,
        ),
        model,
    )  # fmt: skip


@FUZZ
@given(thing=st.one_of(junk, tensors(), st.just(torch.nn.Linear(2, 2))))
def test_spec_for(model, thing) -> None:
    run(lambda: residkit.spec_for(thing), model, allowed=(residkit.UnsupportedArchitectureError,))


@FUZZ
@given(
    prompt=st.one_of(prompts, st.lists(st.text(alphabet="abc ", min_size=2, max_size=4), min_size=1,
                                       max_size=3)),
    kl=mostly(st.sampled_from(["teacher", "free", "own", "both", "all", ["own"]]),
              st.one_of(st.just("half"), st.just([]), junk)),
    scope=scopes,
    batch=mostly(st.integers(1, 3), st.one_of(st.integers(-1, 0), junk)),
    seed=mostly(st.one_of(st.none(), st.integers(0, 9)), junk),
    resume=mostly(st.sampled_from([None, "file"]), st.one_of(st.just("folder"), junk)),
)  # fmt: skip
def test_compare_policies_readings_batches_resume(model, prompt, kl, scope, batch, seed,
                                                   resume) -> None:  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp) / "c.jsonl" if resume == "file" else tmp if resume == "folder" else resume

        def call() -> None:
            kw = {"budgets": [2], "policies": ["window", "kvdirect"], "max_new_tokens": 2}
            first = residkit.compare_policies(
                model, prompt, kl=kl, scope=scope, batch_size=batch, seed=seed, resume=where,
                progress=False, **kw,
            )  # fmt: skip
            kvd = first.table[first.table["policy"] == "kvdirect"]
            assert (kvd["token_match"] == 100.0).all()
            if where is not None:  # read back: the same table
                again = residkit.compare_policies(
                    model, prompt, kl=kl, scope=scope, batch_size=batch, seed=seed,
                    resume=where, progress=False, **kw,
                )  # fmt: skip
                assert again.table.equals(first.table)

        run(call, model)


@FUZZ
@given(
    policy=mostly(st.one_of(exact, st.sampled_from(["full", "kvdirect"])), st.one_of(evicting, junk)),
    template=mostly(st.one_of(st.none(), st.booleans()), junk),
    system=mostly(st.one_of(st.none(), st.text(alphabet="ab ", max_size=4)), junk),
    texts=st.lists(mostly(st.text(alphabet="abc ", min_size=1, max_size=4), junk), max_size=3),
)  # fmt: skip
def test_chat_sessions(model, policy, template, system, texts) -> None:
    def call() -> None:
        chat = Chat(model, build(policy), chat_template=template, system=system)
        for text in texts:
            chat.send(text, max_new_tokens=2)

    run(call, model)


@FUZZ
@given(
    models=mostly(st.just(["zoo:llama"]), st.one_of(st.just([]), st.just("zoo:llama"), junk)),
    claims=mostly(st.sampled_from([["anatomy"], ["ranks"]]),
                  st.one_of(st.just(["lunch"]), st.just("anatomy"), junk)),
    not_run=mostly(st.one_of(st.none(), st.just({"ranks": "too long"})),
                   st.one_of(st.just({"tea": "x"}), junk)),
)  # fmt: skip
def test_reproduce_arguments(model, models, claims, not_run) -> None:
    run(
        lambda: residkit.reproduce(
            models, claims=claims, quick=True, cache=None, progress=False, not_run=not_run,
            load=lambda name: model,
        ),
        model,
    )  # fmt: skip


@FUZZ
@given(policy=st.one_of(exact, evicting), field=st.sampled_from(["budget", "prefill_chunk"]),
       value=st.one_of(numbers, junk))  # fmt: skip
def test_policies_replaced_with_bad_fields(model, policy, field, value) -> None:
    def call() -> None:
        bad = dataclasses.replace(build(policy), **{field: value})
        residkit.generate(model, "abc", max_new_tokens=2, policy=bad)

    run(call, model)
