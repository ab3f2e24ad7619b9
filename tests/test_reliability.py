"""No silent wrong output: threads, user hooks on the K/V path, long prompts, pickles and
missing tensors, honest peak memory, interrupted chat turns, train mode, raw errors."""

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import residkit
from residkit import KVDirect, zoo
from residkit._bridge import hook_count
from residkit.generation import Chat, generate, generate_kvdirect
from residkit.markov import markov_test
from residkit.policies import FullCache, Window
from tests.conftest import get_model, raises_naming

PROMPT = "Threads, hooks and interrupts must never change what residkit reports."


# --- 1. two threads, one model -------------------------------------------------------------


def test_two_threads_on_one_model_give_the_single_threaded_outputs() -> None:
    """50 rounds of two threads decoding different prompts with KV-Direct on one model: every
    output equals the one computed alone (residkit serialises its operations per model)."""
    model = get_model("llama")
    prompts = ["abcdefghijkl", "mnopqrstuvwx"]
    alone = [
        generate_kvdirect(model, p, max_new_tokens=4, budget=2, stop_at_eos=False).tokens
        for p in prompts
    ]
    wrong: list[int] = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for _ in range(50):
                got = generate_kvdirect(
                    model, prompts[i], max_new_tokens=4, budget=2, stop_at_eos=False
                ).tokens
                if not torch.equal(got, alone[i]):
                    wrong.append(i)
        except BaseException as err:  # reported below, not swallowed
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not wrong
    assert hook_count(model) == hook_count(get_model("llama"))


# --- 2. user hooks on the recompute path ---------------------------------------------------


def scale_v(act: torch.Tensor, hook: object) -> torch.Tensor:
    return act * 0.5


def test_a_kv_editing_hook_is_refused_by_kvdirect(no_leaked_hooks) -> None:
    """Recompute mutes hooks, so an edit of V would apply to the full cache's K/V and not to
    the recomputed ones: KV-Direct refuses, naming the hook point."""
    model = get_model("llama")
    with no_leaked_hooks(model), model.hooks(fwd_hooks=[("blocks.1.attn.hook_v", scale_v)]):
        with pytest.raises(ValueError, match=r"blocks\.1\.attn\.hook_v"):
            generate_kvdirect(model, PROMPT, max_new_tokens=4, budget=2)
        # The full cache runs the edit as the user asked.
        generate(model, PROMPT, max_new_tokens=4, policy=FullCache())


def test_a_residual_editing_hook_is_refused_in_token_mode(no_leaked_hooks) -> None:
    """Token checkpoints replay the evicted span through the whole stack with hooks muted."""
    model = get_model("qwen3")

    def edit(act: torch.Tensor, hook: object) -> torch.Tensor:
        return act + 1.0

    with no_leaked_hooks(model), model.hooks(fwd_hooks=[("blocks.2.hook_resid_pre", edit)]):
        with pytest.raises(ValueError, match=r"blocks\.2\.hook_in|blocks\.2\.hook_resid_pre"):
            generate_kvdirect(model, PROMPT, max_new_tokens=4, budget=2, checkpoint="token")
        # Layer checkpoints store the residual after the user's edit: they stay exact.
        kvd = generate_kvdirect(model, PROMPT, max_new_tokens=4, budget=2, return_logits=True)
        full = generate(model, PROMPT, max_new_tokens=4, return_logits=True)
        assert torch.equal(kvd.logits, full.logits)


def test_an_observing_hook_sees_each_real_forward_once(no_leaked_hooks) -> None:
    model = get_model("gemma3")
    seen: dict[str, list[int]] = {}
    for name, policy in (("full", FullCache()), ("kvd", KVDirect(2))):
        calls: list[int] = []
        hook = ("blocks.1.attn.hook_v", lambda act, hook, calls=calls: calls.append(act.shape[1]))
        with no_leaked_hooks(model), model.hooks(fwd_hooks=[hook]):
            generate(model, PROMPT, max_new_tokens=5, policy=policy, stop_at_eos=False)
        seen[name] = calls
    assert seen["kvd"] == seen["full"] and len(seen["full"]) == 5


def test_recompute_kv_refuses_hooks_it_would_not_run(no_leaked_hooks) -> None:
    model = get_model("llama")
    resid = residkit.capture_residuals(model, "abc", layers=[1])[0]
    with (
        no_leaked_hooks(model),
        model.hooks(fwd_hooks=[("blocks.1.attn.hook_v", scale_v)]),
        pytest.raises(ValueError, match=r"blocks\.1\.attn\.hook_v"),
    ):
        residkit.recompute_kv(model, 1, resid, range(resid.shape[1]))


# --- 3. inputs longer than the context -----------------------------------------------------

TOO_LONG = torch.randint(0, 256, (1, 2099), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "call",
    [
        lambda m: residkit.capture_residuals(m, TOO_LONG),
        lambda m: residkit.kv_reconstruction_report(m, TOO_LONG),
        lambda m: markov_test(m, TOO_LONG, TOO_LONG.flip(-1)),
        lambda m: residkit.capture_residuals(m, "x" * 2098),
    ],
)
def test_an_input_longer_than_the_context_is_refused(call, no_leaked_hooks) -> None:
    model = get_model("llama")
    with no_leaked_hooks(model), pytest.raises(ValueError, match=r"2099 tokens.*context of 2048"):
        call(model)


# --- 4. loading: safetensors only, every tensor present ------------------------------------


def copy_zoo(tmp_path: Path, name: str) -> Path:
    src = zoo.build("llama", size="tiny")
    dst = tmp_path / name
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_a_pickle_next_to_a_stray_safetensors_file_is_never_opened(tmp_path, monkeypatch) -> None:
    folder = copy_zoo(tmp_path, "pickled")
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    save_file({"x": torch.zeros(1)}, folder / "adapter.safetensors")

    def no_pickles(*args, **kwargs):
        raise AssertionError("a pickle was opened")

    monkeypatch.setattr(torch, "load", no_pickles)
    with pytest.raises(residkit.ModelNotFoundError, match="only safetensors"):
        residkit.load(folder)


def test_an_index_naming_a_pickle_is_refused(tmp_path, monkeypatch) -> None:
    import json

    folder = copy_zoo(tmp_path, "indexed")
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model-00001.bin")
    index = {"metadata": {}, "weight_map": {k: "pytorch_model-00001.bin" for k in weights}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    def no_pickles(*args, **kwargs):
        raise AssertionError("a pickle was opened")

    monkeypatch.setattr(torch, "load", no_pickles)
    with pytest.raises(
        residkit.ModelNotFoundError, match=r"pytorch_model-00001\.bin, which are not"
    ):
        residkit.load(folder)
    # Control: the same index naming a safetensors shard loads.
    save_file(weights, folder / "model-00001.safetensors", metadata={"format": "pt"})
    index["weight_map"] = {k: "model-00001.safetensors" for k in weights}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert residkit.load(folder).cfg.n_layers == 4


def test_string_flags_are_not_read_as_true() -> None:
    from residkit._validate import flag

    for value in ("no", "False", 0, None):
        with pytest.raises(TypeError, match="allow_pickle must be True or False"):
            flag("allow_pickle", value)
    assert flag("allow_pickle", False) is False
    with pytest.raises(TypeError, match="trust_remote_code"):
        residkit.load("zoo:llama", trust_remote_code="no")


def test_missing_tensors_are_listed(tmp_path) -> None:
    folder = copy_zoo(tmp_path, "partial")
    weights = load_file(folder / "model.safetensors")
    kept = {k: v for k, v in weights.items() if "layers.1." not in k}
    save_file(kept, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.1\."):
        residkit.load(folder)


# --- 5. honest peak memory -----------------------------------------------------------------


def test_the_prefill_counts_in_the_peak(no_leaked_hooks) -> None:
    """A 1,021-token prompt at budget 8: the K/V of all 1,021 tokens are alive during the
    prefill, so the peak says so (before, it said 8 tokens' worth)."""
    model = get_model("llama")
    cfg = model.cfg
    per_token = cfg.n_layers * 2 * cfg.n_key_value_heads * cfg.d_head * 4
    prompt = torch.randint(0, 256, (1, 1021), generator=torch.Generator().manual_seed(1))
    gen = generate_kvdirect(model, prompt, max_new_tokens=2, budget=8, mode="fast")
    assert gen.stats.peak_active_kv_bytes >= 1021 * per_token
    assert gen.stats.active_kv_bytes == 8 * per_token  # after the forward, trimmed
    parts = ["peak_active_kv_bytes", "peak_checkpoint_reserved_bytes", "peak_transient_bytes"]
    assert gen.stats.peak_total_bytes <= sum(getattr(gen.stats, p) for p in parts)
    assert gen.stats.peak_total_bytes >= gen.stats.peak_active_kv_bytes


# --- 6. chat turns are atomic --------------------------------------------------------------


@pytest.mark.parametrize("policy", [FullCache(), KVDirect(4), Window(4)])
def test_an_interrupted_turn_leaves_the_chat_as_before(policy, monkeypatch) -> None:
    model = get_model("llama")
    plain, interrupted = Chat(model, policy), Chat(model, policy)
    for chat in (plain, interrupted):
        chat.send("first turn", max_new_tokens=5, stop_at_eos=False)
    before = interrupted.tokens().clone()
    import residkit.generation.chat as chat_module

    real_step = chat_module.next_logits
    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(chat_module, "next_logits", flaky)
    with pytest.raises(KeyboardInterrupt):
        interrupted.send("second turn", max_new_tokens=6, stop_at_eos=False)
    monkeypatch.setattr(chat_module, "next_logits", real_step)
    assert torch.equal(interrupted.tokens(), before) and len(interrupted.table) == 1
    a = plain.send("second turn", max_new_tokens=6, stop_at_eos=False)
    b = interrupted.send("second turn", max_new_tokens=6, stop_at_eos=False)
    assert a == b and torch.equal(plain.tokens(), interrupted.tokens())


def test_a_list_is_not_a_chat_message() -> None:
    chat = Chat(get_model("llama"))
    with raises_naming("text", ["a", "b"]):
        chat.send(["a", "b"])  # type: ignore[arg-type]
    assert len(chat.table) == 0 and chat.tokens().numel() == 0


# --- 7. train mode -------------------------------------------------------------------------


def test_experiments_run_in_eval_mode_and_restore_train_mode(tmp_path) -> None:
    model = residkit.load(zoo.build("llama", root=tmp_path, overrides={"attention_dropout": 0.5}))
    model.train()
    try:
        assert markov_test(model, "abcdef", "ghijkl").passed
        kvd = generate_kvdirect(model, PROMPT, max_new_tokens=4, budget=2, return_logits=True)
        full = generate(model, PROMPT, max_new_tokens=4, return_logits=True)
        assert torch.equal(kvd.logits, full.logits)
        assert model.training  # put back as it was
    finally:
        model.eval()


def test_a_block_in_train_mode_on_its_own_is_put_in_eval_too(tmp_path) -> None:
    """``model.eval()`` on the bridge leaves a block the user switched to train mode alone; the
    call switches every module (dropout on one block's attention would break exactness)."""
    model = residkit.load(zoo.build("llama", root=tmp_path, overrides={"attention_dropout": 0.5}))
    model.eval()
    block = model.blocks[1]
    block.train()
    try:
        assert not model.training and block.training  # only the block trains
        assert markov_test(model, "abcdef", "ghijkl").passed
        kvd = generate_kvdirect(model, PROMPT, max_new_tokens=4, budget=2, return_logits=True)
        full = generate(model, PROMPT, max_new_tokens=4, return_logits=True)
        assert torch.equal(kvd.logits, full.logits)
        assert block.training and not model.training  # each put back as it was
        # Control: outside a residkit call the block's dropout does change a forward.
        tokens = model.to_tokens(PROMPT)
        with torch.no_grad():
            assert not torch.equal(model(tokens), model(tokens))
    finally:
        model.eval()


def test_another_threads_forward_waits_for_the_call(tmp_path) -> None:
    """A forward started in another thread while residkit's hooks are on the model runs after
    the call, and gets the model's own logits (before, it ran through a patch hook)."""
    model = residkit.load(zoo.build("llama", root=tmp_path))
    source, target = model.to_tokens("abcdefgh"), model.to_tokens("stuvwxyz")
    with torch.no_grad():
        clean = model(target)
    resid = residkit.capture_residuals(model, source, layers=[2])[0]
    inside, go = threading.Event(), threading.Event()

    def slow(act: torch.Tensor, hook: object) -> None:
        inside.set()
        go.wait(timeout=10)

    handle = model.blocks[3].hook_resid_pre.add_hook(slow)
    seen: dict[str, torch.Tensor] = {}
    try:
        caller = threading.Thread(
            target=lambda: seen.update(
                patched=residkit.patch_residual(model, target, resid, layer=2)
            )
        )
        caller.start()
        assert inside.wait(timeout=10)

        def other() -> None:
            with torch.no_grad():
                seen["other"] = model(target)

        thread = threading.Thread(target=other)
        thread.start()
        thread.join(timeout=0.5)
        assert thread.is_alive()  # held until the call ends
        go.set()
        caller.join(timeout=30)
        thread.join(timeout=30)
    finally:
        go.set()
        model.blocks[3].hook_resid_pre.remove_hooks()
        del handle
    assert torch.equal(seen["other"], clean)
    assert not torch.equal(seen["patched"], clean)  # control: the call itself was patched


# --- 8. clear errors instead of raw ones ---------------------------------------------------


@pytest.mark.parametrize(
    ("call", "kind", "words"),
    [
        (
            lambda m: residkit.capture_residuals(m, torch.tensor([[1, 2, 10_000]])),
            ValueError,
            "10000",
        ),
        (lambda m: residkit.capture_residuals(m, torch.tensor([[1, -2, 3]])), ValueError, "-2"),
        (lambda m: residkit.capture_residuals(m, None), TypeError, "None"),
        (lambda m: residkit.capture_residuals(m, "abc", layers=[1.5]), TypeError, "1.5"),
        (lambda m: residkit.capture_residuals(m, "abc", layers=[True]), TypeError, "True"),
        (
            lambda m: residkit.patch_residual(m, "ab", torch.zeros(1, 3, 64), layer=True),
            TypeError,
            "True",
        ),
        (lambda m: generate(m, "abc", max_new_tokens=2.0), TypeError, "2.0"),
        (lambda m: residkit.qk_spectra(m, dtype=torch.float16), ValueError, "float16"),
        (
            lambda m: residkit.recompute_kv(m, 0, torch.zeros(1, 3, 64), [0.5, 1, 2]),
            TypeError,
            "0.5",
        ),
        (
            lambda m: residkit.compare_policies(m, "abc", budgets=[2], policies="window"),
            TypeError,
            "'window'",
        ),
        (
            lambda m: residkit.kv_reconstruction_report(m, "abc", decode_steps=5000),
            ValueError,
            "5000",
        ),
    ],
)
def test_clear_errors(call, kind, words, no_leaked_hooks) -> None:
    model = get_model("llama")
    with no_leaked_hooks(model), pytest.raises(kind) as err:
        call(model)
    assert words in str(err.value)


@pytest.mark.parametrize("not_a_model", ["zoo:llama", None, 3])
def test_something_else_than_a_model_is_a_type_error(not_a_model) -> None:
    with raises_naming("model", not_a_model):
        residkit.capture_residuals(not_a_model, "abc")


def test_a_plain_hf_model_is_a_type_error() -> None:
    from tests.conftest import get_hf

    with pytest.raises(TypeError, match=r"model.*TransformerBridge"):
        generate(get_hf("llama"), "abc", max_new_tokens=2)


def test_temperature_zero_is_fine_when_greedy() -> None:
    model = get_model("llama")
    a = generate(model, PROMPT, max_new_tokens=3, temperature=0.0)
    b = generate(model, PROMPT, max_new_tokens=3)
    assert torch.equal(a.tokens, b.tokens)


def test_chat_figure_before_a_turn() -> None:
    fig = Chat(get_model("llama")).figure()
    assert len(fig.data) == 2 and len(fig.data[0].x) == 0


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["verify", "--model", "zoo:llama", "--section", "nope"], "unknown verify section"),
        (["verify", "--model", "{corrupt}"], "corrupt"),
        (["verify", "--model", "zoo:llama", "--out", "{readonly}"], "cannot write"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(argv, words, capsys, tmp_path) -> None:
    from residkit import cli

    corrupt = copy_zoo(tmp_path, "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    readonly = tmp_path / "file-not-folder"
    readonly.write_text("x")
    argv = [a.format(corrupt=corrupt, readonly=readonly / "out") for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("device", ["tpu", "cuda:7", "mps"])
def test_an_unknown_or_absent_device_is_named(device) -> None:
    with pytest.raises(ValueError, match=f"device={device!r}"):
        residkit.load("zoo:llama", device=device)


@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8, torch.int8])
def test_token_ids_of_any_integer_dtype_are_taken(dtype) -> None:
    model = get_model("llama")
    ids = torch.tensor([[1, 2, 3]])
    want = residkit.capture_residuals(model, ids)
    assert torch.equal(residkit.capture_residuals(model, ids.to(dtype)), want)
    assert torch.equal(
        residkit.generate(model, ids.to(dtype), max_new_tokens=2, stop_at_eos=False).tokens,
        residkit.generate(model, ids, max_new_tokens=2, stop_at_eos=False).tokens,
    )


def test_nan_weights_are_named_not_blamed_on_versions(tmp_path) -> None:
    folder = copy_zoo(tmp_path, "nan")
    weights = load_file(folder / "model.safetensors")
    name = next(k for k in weights if "layers.1.mlp" in k)
    weights[name][0, 0] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    model = residkit.load(folder)
    with pytest.raises(ValueError, match=r"NaN or inf in 1 tensor.*damaged") as err:
        residkit.generate(model, "abc", max_new_tokens=2)
    assert "transformers" not in str(err.value)  # not blamed on the libraries
    assert residkit.generate(residkit.load(copy_zoo(tmp_path, "ok")), "abc", max_new_tokens=2)
