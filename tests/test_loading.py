"""Loading: offline folders, zoo names, and a fast, clear failure for missing models."""

import os
import time

import pytest

import residkit
from residkit import zoo


@pytest.mark.parametrize("offline", ["1", None])
def test_missing_model_fails_fast_with_message(offline: str | None, monkeypatch) -> None:
    if offline is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # one real attempt, no retries
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    start = time.perf_counter()
    with pytest.raises(residkit.ModelNotFoundError) as err:
        residkit.load("no-such-org/no-such-model")
    elapsed = time.perf_counter() - start
    assert elapsed < 10, f"took {elapsed:.1f}s"
    message = str(err.value)
    assert "no-such-org/no-such-model" in message
    assert "local checkpoint folder" in message and "HF_HUB_OFFLINE" in message


def test_folder_without_safetensors_is_refused(tmp_path) -> None:
    src = zoo.build("llama", root=tmp_path / "zoo")
    dst = tmp_path / "bin-only"
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    (dst / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(residkit.ModelNotFoundError, match="only safetensors"):
        residkit.load(dst)


def test_zoo_prefix_loads() -> None:
    model = residkit.load("zoo:gpt2")
    assert residkit.spec_for(model).family == "gpt2"
    assert not model.training


def test_hub_id_resolves_from_local_cache(tmp_path, monkeypatch) -> None:
    """A hub id whose snapshot is in the HF cache loads offline from that snapshot."""
    src = zoo.build("llama", root=tmp_path / "zoo")
    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    snap = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snap.mkdir(parents=True)
    for f in src.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = residkit.load("acme/tiny-llama")
    assert model.cfg.n_layers == 4
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def _offloaded_map(n_layers: int) -> dict[str, str]:
    placement = {name: "cpu" for name in ("model.embed_tokens", "model.norm", "lm_head")}
    placement["model.rotary_emb"] = "cpu"
    for layer in range(n_layers):  # every other layer's weights on disk, loaded per forward
        placement[f"model.layers.{layer}"] = "disk" if layer % 2 else "cpu"
    return placement


def test_a_device_map_with_disk_offload_decodes_bitwise(tmp_path, monkeypatch) -> None:
    """accelerate's offload (half the layers on disk): every exact policy, alone and in a
    batch, bitwise as the same model in memory; a shifted recompute is caught."""
    import torch

    from residkit.policies import H2O, FullCache, KVDirect
    from residkit.policies.kvdirect_cache import KVDirectCache

    in_memory = residkit.load("zoo:llama")
    placement = _offloaded_map(in_memory.cfg.n_layers)
    offloaded = residkit.load("zoo:llama", device_map=placement, offload_folder=tmp_path)
    assert offloaded.original_model.hf_device_map == placement
    # The disk layers' weights are meta placeholders, read from disk around each use.
    assert any(param.device.type == "meta" for param in offloaded.parameters())
    kw = {"max_new_tokens": 8, "return_logits": True, "stop_at_eos": False}
    policies = [
        FullCache(),
        KVDirect(4),
        KVDirect(4, checkpoint="token"),
        KVDirect(4, checkpoint="stride", stride=2),
        H2O(4),
    ]
    for prompt in ("abcdefghijklmnop", ["abcdefghijkl", "ab"]):
        for policy in policies:
            a = residkit.generate(in_memory, prompt, policy=policy, **kw)
            b = residkit.generate(offloaded, prompt, policy=policy, **kw)
            rows = zip(a, b, strict=True) if isinstance(prompt, list) else [(a, b)]
            assert all(torch.equal(x.logits, y.logits) for x, y in rows), (prompt, policy)
    positions = KVDirectCache._positions
    monkeypatch.setattr(KVDirectCache, "_positions", lambda s, *c: positions(s, *c) + 1)
    shifted = residkit.generate(offloaded, "abcdefghijklmnop", policy=KVDirect(4), **kw)
    full = residkit.generate(in_memory, "abcdefghijklmnop", **kw)
    assert not torch.equal(shifted.logits, full.logits)


def test_placement_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="not both"):
        residkit.load("zoo:llama", device="cpu", device_map="auto")
    with pytest.raises(ValueError, match="offload_folder goes with a device_map"):
        residkit.load("zoo:llama", offload_folder="/tmp/x")


def test_a_load_draws_no_transformers_bar_and_leaves_the_setting(capfd) -> None:
    from transformers.utils import logging as hf_logging

    import residkit

    assert hf_logging.is_progress_bar_enabled()
    residkit.load("zoo:llama")
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # put back as it was
