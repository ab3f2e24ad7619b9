"""Chat: one session across turns, only new tokens fed, bounded active K/V with KV-Direct."""

import pytest
import torch

from residkit import KVDirect
from residkit.generation.chat import Chat


def test_chat_keeps_state_with_bounded_memory(model_for, no_leaked_hooks) -> None:
    model = model_for("llama")
    budget = 8
    with no_leaked_hooks(model):
        kvd, full = Chat(model, KVDirect(budget)), Chat(model, "full")
        for turn in ["Hello there.", "What is 2 + 2?", "Thanks, bye."]:
            assert kvd.send(turn, max_new_tokens=6) == full.send(turn, max_new_tokens=6)
    mem = kvd.table
    cfg = model.cfg
    assert len(mem) == 3 and mem["tokens_total"].is_monotonic_increasing
    assert (
        mem["active_kv_bytes"] <= budget * cfg.n_layers * 2 * cfg.n_key_value_heads * cfg.d_head * 4
    ).all()
    assert (full.table["active_kv_bytes"] > mem["active_kv_bytes"]).iloc[-1]
    assert len(kvd.figure().data) == 2


def test_turns_feed_only_new_tokens(model_for) -> None:
    """The session sees the concatenation of every turn's tokens, each exactly once: the same
    tokens run as one prompt through the full cache give the same last reply."""
    model = model_for("gpt2")
    chat = Chat(model, "full")
    chat.send("ab", max_new_tokens=3, stop_at_eos=False)
    chat.send("cd", max_new_tokens=3, stop_at_eos=False)
    fed = chat.tokens()
    first_turn = model.to_tokens("ab")[0]
    assert torch.equal(fed[: len(first_turn)], first_turn)
    assert fed.tolist().count(int(first_turn[0])) == 1  # one BOS, at the start
    assert torch.equal(chat.replies[0][:-1], fed[len(first_turn) : len(first_turn) + 2])
    assert chat.table["tokens_fed"].tolist() == [len(first_turn), 1 + 2]  # pending + "cd"


def test_plain_text_chat_on_a_model_without_a_template(model_for) -> None:
    model = model_for("llama")
    with pytest.raises(ValueError, match="no chat template"):
        Chat(model, chat_template=True)
    assert Chat(model).templated is False


@pytest.mark.parametrize(
    ("text", "n", "message"),
    [
        ("", 4, "empty message"),
        ("hi", 0, "max_new_tokens must be a positive int, got 0"),
        ("hi", 5000, "beyond the model's context"),
    ],
)
def test_chat_bad_input(text: str, n: int, message: str, model_for, no_leaked_hooks) -> None:
    model = model_for("llama")
    chat = Chat(model, KVDirect(4))
    with no_leaked_hooks(model), pytest.raises(ValueError, match=message):
        chat.send(text, max_new_tokens=n)


def test_a_failure_after_the_forward_leaves_the_chat_as_it_was(model_for, monkeypatch) -> None:
    model = model_for("llama")
    chat = Chat(model, KVDirect(4))
    chat.send("ab", max_new_tokens=3, stop_at_eos=False)
    before = (chat.tokens().clone(), list(chat.messages), len(chat.table))
    tok = model.tokenizer

    def broken(*args, **kwargs):
        raise RuntimeError("decode failed")

    monkeypatch.setattr(tok, "decode", broken)
    with pytest.raises(RuntimeError, match="decode failed"):
        chat.send("cd", max_new_tokens=3, stop_at_eos=False)
    monkeypatch.undo()
    assert torch.equal(chat.tokens(), before[0])
    assert chat.messages == before[1] and len(chat.table) == before[2]
    # The next turn is the one a chat that never failed would take.
    fresh = Chat(model, KVDirect(4))
    fresh.send("ab", max_new_tokens=3, stop_at_eos=False)
    reply = chat.send("cd", max_new_tokens=3, stop_at_eos=False)
    assert reply == fresh.send("cd", max_new_tokens=3, stop_at_eos=False)
    assert torch.equal(chat.tokens(), fresh.tokens())


def test_one_chat_from_two_threads_takes_whole_turns(model_for) -> None:
    """Turns sent from two threads run one after another: the result is the same as sending
    them in the recorded order from one thread."""
    import threading
    import time

    model = model_for("llama")
    chat = Chat(model, "full")

    def slow(act: torch.Tensor, hook: object) -> None:
        time.sleep(0.005)  # widens the window two unsynchronised turns would interleave in

    model.blocks[0].hook_resid_pre.add_hook(slow)
    try:
        threads = [
            threading.Thread(
                target=lambda w=w: [chat.send(f"{w}{i}", max_new_tokens=2) for i in range(3)]
            )
            for w in "xy"
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        model.blocks[0].hook_resid_pre.remove_hooks()
    users = [m["content"] for m in chat.messages if m["role"] == "user"]
    assert sorted(users) == ["x0", "x1", "x2", "y0", "y1", "y2"]
    again = Chat(model, "full")
    for text in users:
        again.send(text, max_new_tokens=2)
    assert torch.equal(chat.tokens(), again.tokens()) and chat.messages == again.messages
