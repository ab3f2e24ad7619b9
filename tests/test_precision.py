"""The exactness claims in the paper's dtype: bfloat16 weights and activations, on both real
models (and float16 / bfloat16 zoo batches in tests/test_batch.py)."""

import pytest
import torch

import residkit
from residkit.policies import FullCache, KVDirect
from residkit.policies.kvdirect_cache import KVDirectCache
from tests.conftest import REAL, get_real

pytestmark = pytest.mark.real_model

PROMPT = "The lighthouse keeper climbed the stairs every evening, and"
N_NEW = 12
PLANS = {
    "layer": KVDirect(8),
    "token": KVDirect(8, checkpoint="token"),
    "stride": KVDirect(8, checkpoint="stride", stride=6),
}


@pytest.fixture(params=REAL)
def bf16(request: pytest.FixtureRequest):
    return get_real(request.param, torch.bfloat16)


def _decode(model, policy):
    return residkit.generate(
        model, PROMPT, policy=policy, max_new_tokens=N_NEW, return_logits=True, stop_at_eos=False
    )


def test_the_model_runs_in_bf16(bf16) -> None:
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert bf16(bf16.to_tokens(PROMPT)).dtype == torch.bfloat16


def test_markov_kl_is_exactly_zero_in_bf16(bf16) -> None:
    report = residkit.markov_test(
        bf16, "The capital of France is Paris.", "def add(a, b): return a + b", align="right"
    )
    assert report.passed and float(report.table["kl"].max()) == 0.0
    # Negative control: the unpatched target's distribution is far from the source's.
    assert float(report.table["control_kl"].min()) > 1.0


def test_kv_recomputed_bitwise_in_bf16(bf16) -> None:
    report = residkit.kv_reconstruction_report(bf16, PROMPT, decode_steps=4)
    assert report.passed
    # Negative control: layer 1's residual, projected by layer 0, is not layer 0's K.
    r0, r1 = residkit.capture_residuals(bf16, PROMPT, layers=[0, 1])
    k0, _ = residkit.recompute_kv(bf16, 0, r0, positions=range(r0.shape[1]))
    k1, _ = residkit.recompute_kv(bf16, 0, r1, positions=range(r1.shape[1]))
    assert k0.dtype == torch.bfloat16 and not torch.equal(k0, k1)


@pytest.mark.parametrize("plan", list(PLANS))
def test_kvdirect_is_bitwise_the_full_cache_in_bf16(bf16, plan: str) -> None:
    full, ours = _decode(bf16, FullCache()), _decode(bf16, PLANS[plan])
    assert ours.stats.tokens_evicted > 0
    assert full.logits is not None and ours.logits is not None
    assert ours.logits.dtype == torch.bfloat16 and torch.equal(ours.logits, full.logits)


def test_a_shifted_checkpoint_is_caught_in_bf16(bf16, monkeypatch) -> None:
    """Negative control: recomputing the evicted K/V one position off changes the logits."""
    positions = KVDirectCache._positions
    monkeypatch.setattr(
        KVDirectCache, "_positions", lambda self, *chunk: positions(self, *chunk) + 1
    )
    full, shifted = _decode(bf16, FullCache()), _decode(bf16, PLANS["layer"])
    assert full.logits is not None and shifted.logits is not None
    assert not torch.equal(shifted.logits, full.logits)
