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
