"""The offline zoo: every family builds, boots offline, and is reproducible."""

import json

import pytest
import torch
from safetensors.torch import load_file

import residkit
from residkit import zoo


def test_ten_families_listed() -> None:
    assert len(zoo.ARCHITECTURES) == 10
    assert set(zoo.ARCHITECTURES) == {
        "llama",
        "qwen2",
        "qwen3",
        "mistral",
        "gemma2",
        "gemma3",
        "gpt2",
        "gpt_neox",
        "phi3",
        "olmo2",
    }


def test_every_family_boots_offline(family: str, model_for) -> None:
    model = model_for(family)
    assert residkit.spec_for(model).family == family
    logits = model("hello")
    assert logits.shape[-1] == zoo.VOCAB_SIZE
    assert torch.isfinite(logits).all()


def test_build_writes_safetensors_and_tokenizer(tmp_path) -> None:
    path = zoo.build("qwen3", root=tmp_path)
    assert (path / "model.safetensors").exists()
    assert not list(path.glob("*.bin"))
    assert (path / "tokenizer.json").exists()
    manifest = json.loads((path / "residkit_zoo.json").read_text())
    assert manifest["arch"] == "qwen3" and manifest["seed"] == 0


def test_tiny_init_is_far_from_uniform_attention(model_for) -> None:
    # initializer_range 0.2: the largest attention weight of a late query is far above 1/pos.
    model = model_for("llama")
    _, cache = model.run_with_cache("the quick brown fox jumps over the lazy dog")
    pattern = cache["blocks.1.attn.hook_pattern"][0, :, -1]  # [head, key]
    assert pattern.max().item() > 5 / pattern.shape[-1]


def test_same_seed_same_weights_other_seed_differs(tmp_path) -> None:
    a = load_file(zoo.build("llama", seed=1, root=tmp_path / "a") / "model.safetensors")
    b = load_file(zoo.build("llama", seed=1, root=tmp_path / "b") / "model.safetensors")
    c = load_file(zoo.build("llama", seed=2, root=tmp_path / "c") / "model.safetensors")
    key = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(a[key], b[key])
    assert not torch.equal(a[key], c[key])


def test_build_does_not_touch_caller_rng(tmp_path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    zoo.build("gpt2", seed=7, root=tmp_path)
    assert torch.equal(torch.rand(3), expected)


def test_rebuild_is_reused(tmp_path) -> None:
    path = zoo.build("llama", root=tmp_path)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert zoo.build("llama", root=tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp


def test_small_is_a_few_million_parameters() -> None:
    cfg = zoo.config_for("llama", size="small")
    model = __import__("transformers").AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert 2e6 < n < 10e6


def test_sliding_window_variant() -> None:
    assert zoo.config_for("mistral-swa").sliding_window == zoo.SLIDING_WINDOW
    assert zoo.config_for("mistral").sliding_window is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "bert"}, "unknown architecture 'bert'"),
        ({"arch": "llama", "size": "huge"}, "unknown size 'huge'"),
        ({"arch": "llama", "config": "gpt-5"}, "unknown paper config 'gpt-5'"),
        ({"arch": "llama", "config": "gemma-3-1b"}, "is a gemma3 model, not llama"),
    ],
)
def test_bad_build_arguments(kwargs: dict, message: str) -> None:
    arch = kwargs.pop("arch")
    with pytest.raises(ValueError, match=message):
        zoo.config_for(arch, **kwargs)


# Published numbers the paper quotes, recomputed from the configs (bf16: 2 bytes).
@pytest.mark.parametrize(
    ("key", "kv_bytes", "resid_bytes"),
    [
        ("gemma-3-4b", 139_264, 5_120),  # the paper's "136 KB vs 5 KB"
        ("smollm2-135m", 23_040, 1_152),
        ("llama-3.2-1b", 32_768, 4_096),
    ],
)
def test_paper_configs_per_token_bytes(key: str, kv_bytes: int, resid_bytes: int) -> None:
    paper = zoo.PAPER_CONFIGS[key]
    cfg = zoo.config_for(paper["family"], config=key)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 2 == kv_bytes
    assert cfg.hidden_size * 2 == resid_bytes


def test_paper_configs_cite_sources() -> None:
    assert len(zoo.PAPER_CONFIGS) == 7
    for key, entry in zoo.PAPER_CONFIGS.items():
        assert entry["source"].startswith("https://"), key
        assert entry["family"] in zoo.ARCHITECTURES, key
        zoo.config_for(entry["family"], config=key)  # every one is a valid HF config


def test_gemma3_1b_global_layers() -> None:
    cfg = zoo.config_for("gemma3", config="gemma-3-1b")
    spec = residkit.ARCH_TABLE["gemma3"]
    globals_ = sorted(set(range(cfg.num_hidden_layers)) - set(spec.sliding_layers(cfg)))
    assert globals_ == [5, 11, 17, 23]
