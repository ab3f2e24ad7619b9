"""Each policy's cache in transformers' own ``generate``, on the real models: the same tokens
and bitwise the same per-step logits as :func:`residkit.generate` with that policy, greedy and
sampled (residkit/generation/engine.py, residkit/policies/)."""

import pytest
import torch

import residkit
from residkit.policies import (
    H2O,
    TOVA,
    FullCache,
    KVDirect,
    NoCache,
    SnapKV,
    StreamingLLM,
    Window,
)
from residkit.policies.checkpoints import ResidualCheckpoints

pytestmark = pytest.mark.real_model

PROMPT = (
    "The lighthouse keeper climbed the stairs every evening, lit the lamp, and wrote in his "
    "log what ships had passed. One night the log read:"
)
N_NEW = 64
BUDGET = 16
POLICIES = {
    "full": FullCache(),
    "none": NoCache(),
    "kvdirect-layer": KVDirect(BUDGET),
    # Exact token and stride plans replay every evicted chunk in its original shape at every
    # step (O(T^2) forwards over 64 tokens); here they recompute the span as one chunk, which
    # both loops do alike. Their exact modes are compared on the zoo (test_policy_cache.py).
    "kvdirect-token": KVDirect(BUDGET, checkpoint="token", mode="fast"),
    "kvdirect-stride": KVDirect(BUDGET, checkpoint="stride", stride=2, mode="fast"),
    "window": Window(BUDGET),
    "streaming": StreamingLLM(BUDGET),
    "h2o": H2O(BUDGET),
    "snapkv": SnapKV.for_budget(BUDGET),
    "tova": TOVA(BUDGET),
}
SAMPLING = {"do_sample": True, "temperature": 0.8, "top_k": 40, "top_p": 0.95}


def hf_generate(model, ids, policy, **kwargs):
    """transformers' generate on the wrapped model with ``policy``'s cache, EOS ignored."""
    with torch.no_grad(), policy.make_cache(model) as cache:
        return model.original_model.generate(
            ids,
            past_key_values=cache,
            max_new_tokens=kwargs.pop("max_new_tokens", N_NEW),
            output_logits=True,
            return_dict_in_generate=True,
            eos_token_id=None,
            pad_token_id=model.tokenizer.pad_token_id or 0,
            **kwargs,
        )


@pytest.mark.parametrize("name", list(POLICIES))
def test_greedy_tokens_and_logits_equal_residkit_generate(real, name: str) -> None:
    policy = POLICIES[name]
    ids = real.to_tokens(PROMPT)
    ref = residkit.generate(
        real, ids, max_new_tokens=N_NEW, policy=policy, return_logits=True, stop_at_eos=False
    )
    out = hf_generate(real, ids, policy, do_sample=False)
    assert torch.equal(out.sequences[0, ids.shape[1] :], ref.tokens)
    assert ref.logits is not None and len(out.logits) == N_NEW
    for step, logits in enumerate(out.logits):
        assert torch.equal(logits[0], ref.logits[step]), f"{name}: step {step} differs"
    if name.startswith("kvdirect"):
        assert ref.stats.tokens_evicted > 0  # the budget was exceeded: recompute was exercised


@pytest.mark.parametrize("name", ["full", "kvdirect-layer", "h2o"])
def test_sampled_tokens_equal_with_the_same_seed(real, name: str) -> None:
    policy = POLICIES[name]
    ids = real.to_tokens(PROMPT)
    ref = residkit.generate(
        real, ids, max_new_tokens=24, policy=policy, seed=7, stop_at_eos=False, **SAMPLING
    )
    torch.manual_seed(7)
    out = hf_generate(real, ids, policy, max_new_tokens=24, **SAMPLING)
    assert torch.equal(out.sequences[0, ids.shape[1] :], ref.tokens)
    # Negative control: another seed draws another continuation.
    torch.manual_seed(8)
    other = hf_generate(real, ids, policy, max_new_tokens=24, **SAMPLING)
    assert not torch.equal(other.sequences[0, ids.shape[1] :], ref.tokens)


def test_chunked_prefill_matches_transformers_prefill_chunk_size(real) -> None:
    policy = KVDirect(BUDGET, prefill_chunk=8)
    ids = real.to_tokens(PROMPT)
    ref = residkit.generate(
        real, ids, max_new_tokens=8, policy=policy, return_logits=True, stop_at_eos=False
    )
    out = hf_generate(real, ids, policy, max_new_tokens=8, do_sample=False, prefill_chunk_size=8)
    assert ref.logits is not None
    assert all(torch.equal(a[0], b) for a, b in zip(out.logits, ref.logits, strict=True))


def test_a_shifted_checkpoint_is_caught(real, monkeypatch) -> None:
    """Negative control: residual checkpoints stored one position late (each chunk's rows
    shifted by one) make transformers' generate with the KV-Direct cache differ from the
    reference logits once evicted K/V are recomputed from them."""
    policy = POLICIES["kvdirect-layer"]
    ids = real.to_tokens(PROMPT)
    ref = residkit.generate(
        real, ids, max_new_tokens=8, policy=policy, return_logits=True, stop_at_eos=False
    )
    real_append = ResidualCheckpoints.append

    def shifted(self, rows):
        return real_append(self, torch.roll(rows, 1, dims=-2))

    monkeypatch.setattr(ResidualCheckpoints, "append", shifted)
    out = hf_generate(real, ids, policy, max_new_tokens=8, do_sample=False)
    assert ref.logits is not None
    assert torch.equal(out.logits[0][0], ref.logits[0])  # the prompt forward recomputes nothing
    assert not torch.equal(out.logits[1][0], ref.logits[1])
