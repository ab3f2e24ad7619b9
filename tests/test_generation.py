"""The decoding engine: no cache == full cache == HF generate, on every family."""

import pytest
import torch

import residkit
from residkit.generation import generate
from residkit.policies import FullCache, NoCache
from tests.conftest import get_hf

PROMPT = "The residual stream is all you need because"


def test_no_cache_equals_full_cache_equals_hf(family: str, model_for, no_leaked_hooks) -> None:
    model = model_for(family)
    with no_leaked_hooks(model):
        full = generate(model, PROMPT, max_new_tokens=32, policy="full", return_logits=True)
        none = generate(model, PROMPT, max_new_tokens=32, policy="none", return_logits=True)
    tokens = model.to_tokens(PROMPT)
    with torch.no_grad():
        ref = get_hf(family).generate(tokens, do_sample=False, max_new_tokens=32)[
            0, tokens.shape[1] :
        ]
    assert torch.equal(full.tokens, none.tokens)
    assert torch.equal(full.tokens, ref)
    assert len(full.tokens) == len(ref) > 0
    # Token identity is not logit identity: the no-cache path runs other GEMM shapes, so the
    # logits differ by float32 rounding (1e-6 relative on these O(1)-10 logits), far below 1e-3.
    assert (full.logits - none.logits).abs().max().item() < 1e-3


def test_sampling_with_a_seed_is_reproducible(model_for) -> None:
    model = model_for("llama")
    a = generate(model, PROMPT, max_new_tokens=16, do_sample=True, seed=3, top_k=20, top_p=0.9)
    b = generate(
        model, PROMPT, max_new_tokens=16, do_sample=True, seed=3, top_k=20, top_p=0.9, policy="none"
    )
    c = generate(model, PROMPT, max_new_tokens=16, do_sample=True, seed=4, top_k=20, top_p=0.9)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)


def test_generation_result(model_for) -> None:
    model = model_for("gpt2")
    gen = generate(model, PROMPT, max_new_tokens=5, policy=FullCache(), return_logits=True)
    assert gen.text == model.tokenizer.decode(gen.tokens.tolist())
    assert list(gen.table.columns) == ["step", "token", "text", "logprob"]
    assert gen.stats.new_tokens == 5 and gen.stats.peak_active_kv_bytes > 0
    assert len(gen.figure().data) == 2
    assert generate(model, PROMPT, max_new_tokens=0).tokens.numel() == 0


def test_full_cache_bytes_match_the_formula(model_for) -> None:
    model = model_for("llama")
    gen = generate(model, PROMPT, max_new_tokens=6, stop_at_eos=False)
    n_tok = model.to_tokens(PROMPT).shape[1] + 5  # the last token is never fed back
    cfg = model.cfg
    assert (
        gen.stats.peak_active_kv_bytes
        == n_tok * cfg.n_layers * 2 * cfg.n_key_value_heads * cfg.d_head * 4
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": -1}, "max_new_tokens must be a non-negative int, got -1"),
        ({"temperature": 0.0, "do_sample": True}, "temperature must be > 0"),
        ({"top_k": 0}, "top_k must be a positive int, got 0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"policy": "paged"}, "unknown cache policy 'paged'"),
        ({"max_new_tokens": 5000}, "5000 to generate exceed the model's context of 2048"),
    ],
)
def test_bad_input(kwargs, message, model_for, no_leaked_hooks) -> None:
    model = model_for("llama")
    with no_leaked_hooks(model), pytest.raises(ValueError, match=message):
        generate(model, PROMPT, **kwargs)


def test_cache_is_a_deprecated_name_of_policy(model_for) -> None:
    model = model_for("llama")
    with pytest.warns(DeprecationWarning, match="pass policy="):
        old = generate(model, PROMPT, max_new_tokens=4, cache="none")
    assert torch.equal(old.tokens, generate(model, PROMPT, max_new_tokens=4, policy="none").tokens)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="not both"):
        generate(model, PROMPT, max_new_tokens=4, cache="none", policy=FullCache())


def test_empty_prompt(model_for) -> None:
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model_for("llama"), "", max_new_tokens=3, policy=NoCache())
    assert residkit.generate is generate


def test_results_have_short_reprs() -> None:
    """What a notebook shows for a result: one line, what it is and where to look next."""
    import residkit
    from residkit.generation.chat import Chat
    from tests.conftest import get_model

    model = get_model("llama")
    gen = residkit.generate(model, "abc", max_new_tokens=3, stop_at_eos=False)
    chat = Chat(model)
    chat.send("hi", max_new_tokens=2)
    report = residkit.markov_test(model, "abcd", "efgh")
    for obj, words in (
        (gen, "3 new tokens"),
        (gen.stats, "peak total"),
        (report, "holds at 5 layers"),
        (chat, "1 turns"),
    ):
        text = repr(obj)
        assert words in text and len(text) < 200 and "\n" not in text, text
