"""Random arguments to every public function: a correct result or a TypeError / ValueError,
never another exception, and the model left as it was (no hooks, no overrides, eval mode).

Each test draws a mix of valid and invalid values (wrong types, shapes, dtypes, ranges,
lengths). ``tests/test_fuzz.py`` runs this file in a subprocess without the run-time type
checker the rest of the suite installs, so a wrong type reaches residkit's own checks as it
does for a user; the number of cases run is written to ``$RESIDKIT_FUZZ_COUNT``.
"""

import atexit
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import residkit
from residkit import H2O, TOVA, KVDirect, SnapKV, StreamingLLM, Window, zoo
from residkit._bridge import hook_count
from residkit.generation import Chat
from residkit.quantisation import requantise
from residkit.viz.spectra import rank_heatmap, spectrum
from tests.conftest import get_model

CASES = 160
FUZZ = settings(
    max_examples=CASES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

numbers = st.one_of(
    st.integers(-3, 9),
    st.sampled_from([2**31, 5000, -(2**40)]),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.booleans(),
)
junk = st.one_of(
    st.none(),
    numbers,
    st.text(max_size=4),
    st.lists(st.integers(-2, 300), max_size=3),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)


@st.composite
def tensors(draw: Any, d_last: int | None = None) -> torch.Tensor:
    ndim = draw(st.integers(0, 3))
    shape = [draw(st.integers(0, 4)) for _ in range(ndim)]
    if d_last is not None and ndim and draw(st.booleans()):
        shape[-1] = d_last
    dtype = draw(st.sampled_from([torch.float32, torch.int64, torch.bool, torch.float16]))
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    if dtype == torch.bool:
        return torch.zeros(shape, dtype=torch.bool)
    return torch.randint(-2, 300, shape, dtype=dtype)


@st.composite
def _mostly(draw: Any, valid: Any, invalid: Any) -> Any:
    # A seeded Random picks the branch: hypothesis's own choices lean to edge cases.
    return draw(valid if draw(st.randoms(use_true_random=False)).random() < 0.75 else invalid)


def mostly(valid: Any, invalid: Any) -> Any:
    """Valid values three times in four: most cases reach the computation, not only a check."""
    return _mostly(valid, invalid)


good_text = st.text(alphabet="abcxyz ", min_size=1, max_size=6)
good_ids = st.builds(lambda n: torch.randint(0, 259, (1, n)), st.integers(1, 6))
prompts = mostly(
    st.one_of(good_text, good_ids),
    st.one_of(
        st.just(""),
        st.lists(st.text(alphabet="abc", max_size=3), max_size=3),
        tensors(),
        junk,
    ),
)
layers = mostly(
    st.one_of(st.none(), st.lists(st.integers(0, 4), min_size=1, max_size=3)),
    st.one_of(st.lists(st.one_of(st.integers(-2, 6), numbers), max_size=3), junk),
)
small = mostly(st.integers(0, 3), st.one_of(st.integers(-3, -1), junk))
policies = mostly(
    st.one_of(
        st.sampled_from(["full", "none"]),
        st.builds(KVDirect, st.integers(0, 3)),
        st.builds(Window, st.integers(0, 3)),
    ),
    st.one_of(st.just("paged"), junk),
)


CALLS: list[bool] = []  # one per call: whether it returned a result


@atexit.register
def _report() -> None:
    path = os.environ.get("RESIDKIT_FUZZ_COUNT")
    if path:
        with open(path, "a") as f:  # one line per instance of this module (see test_fuzz.py)
            f.write(f"{len(CALLS)} {sum(CALLS)}\n")


def run(call: Callable[[], Any], model: Any, allowed: tuple[type[BaseException], ...] = ()) -> None:
    before = hook_count(model)
    try:
        call()
        CALLS.append(True)
    except (TypeError, ValueError, *allowed):
        CALLS.append(False)
    assert hook_count(model) == before
    assert not model.training
    assert all("forward" not in m.__dict__ for m in model.modules())


@pytest.fixture(scope="module")
def model() -> Any:
    return get_model("llama")


@FUZZ
@given(inputs=prompts, layer_list=layers)
def test_capture_residuals(model, inputs, layer_list) -> None:
    run(lambda: residkit.capture_residuals(model, inputs, layers=layer_list), model)


@FUZZ
@given(
    inputs=prompts,
    residual=mostly(st.builds(lambda n: torch.randn(1, n, 64), st.integers(1, 6)), tensors(64)),
    layer=small,
    positions=mostly(st.none(), st.one_of(st.lists(st.integers(-8, 8), max_size=3), junk)),
)
def test_patch_residual(model, inputs, residual, layer, positions) -> None:
    run(
        lambda: residkit.patch_residual(model, inputs, residual, layer=layer, positions=positions),
        model,
    )


@FUZZ
@given(
    source=prompts,
    target=prompts,
    layer_list=layers,
    align=st.one_of(st.none(), st.sampled_from(["left", "right", "up"]), junk),
)
def test_markov_test(model, source, target, layer_list, align) -> None:
    run(lambda: residkit.markov_test(model, source, target, layers=layer_list, align=align), model)


@FUZZ
@given(
    layer=small,
    n=st.integers(1, 5),
    residual=st.one_of(st.none(), tensors(64)),
    positions=mostly(st.none(), st.one_of(junk, tensors())),
)
def test_recompute_kv(model, layer, n, residual, positions) -> None:
    x = torch.randn(1, n, 64) if residual is None else residual
    pos = range(n) if positions is None else positions
    run(lambda: residkit.recompute_kv(model, layer, x, pos), model)


@FUZZ
@given(
    inputs=prompts,
    mode=mostly(st.sampled_from(["exact", "fast"]), st.one_of(st.just("batched"), junk)),
    steps=small,
)
def test_kv_reconstruction_report(model, inputs, mode, steps) -> None:
    run(
        lambda: residkit.kv_reconstruction_report(model, inputs, mode=mode, decode_steps=steps),
        model,
    )


@FUZZ
@given(
    prompt=prompts,
    n=small,
    policy=policies,
    do_sample=mostly(st.booleans(), junk),
    temperature=mostly(st.floats(0.1, 2.0), numbers),
    top_k=mostly(st.one_of(st.none(), st.integers(1, 50)), small),
    top_p=mostly(st.one_of(st.none(), st.floats(0.1, 1.0)), numbers),
    seed=mostly(st.one_of(st.none(), st.integers(0, 99)), junk),
)
def test_generate(model, prompt, n, policy, do_sample, temperature, top_k, top_p, seed) -> None:
    run(
        lambda: residkit.generate(
            model,
            prompt,
            max_new_tokens=n,
            policy=policy,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
        ),
        model,
    )


@FUZZ
@given(
    prompt=prompts,
    budget=small,
    checkpoint=mostly(st.sampled_from(["layer", "token"]), st.one_of(st.just("nowhere"), junk)),
    mode=mostly(st.sampled_from(["exact", "fast"]), junk),
    n=small,
)
def test_generate_kvdirect(model, prompt, budget, checkpoint, mode, n) -> None:
    run(
        lambda: residkit.generate_kvdirect(
            model, prompt, max_new_tokens=n, budget=budget, checkpoint=checkpoint, mode=mode
        ),
        model,
    )


@FUZZ
@given(
    make=st.sampled_from([KVDirect, Window, StreamingLLM, H2O, SnapKV, TOVA]),
    args=st.lists(mostly(st.integers(1, 40), st.one_of(st.integers(-2, 0), junk)), max_size=3),
)
def test_policy_constructors(model, make, args) -> None:
    run(lambda: make(*args), model)


@FUZZ
@given(
    inputs=prompts,
    budgets=mostly(
        st.lists(st.integers(0, 3), min_size=1, max_size=2),
        st.one_of(st.lists(st.one_of(st.integers(-1, 3), junk), max_size=2), junk),
    ),
    names=mostly(
        st.lists(st.sampled_from(["window", "tova", "kvdirect"]), min_size=1, max_size=2),
        st.one_of(st.none(), st.lists(st.just("lru"), max_size=1), junk),
    ),
    n=mostly(st.integers(1, 2), st.one_of(st.integers(-1, 0), junk)),
)
def test_compare_policies(model, inputs, budgets, names, n) -> None:
    run(
        lambda: residkit.compare_policies(
            model, inputs, budgets=budgets, policies=names, max_new_tokens=n, progress=False
        ),
        model,
    )


@FUZZ
@given(
    fold=mostly(st.booleans(), junk),
    dtype=mostly(st.just(torch.float64), st.sampled_from([torch.float16, torch.int64])),
    energy=mostly(st.floats(0.0, 1.0), numbers),
)
def test_qk_spectra_and_figures(model, fold, dtype, energy) -> None:
    def call() -> None:
        spectra = residkit.qk_spectra(model, fold_norm=fold, dtype=dtype)
        rank_heatmap(spectra, energy)
        spectrum(spectra, 0, 0, energy=energy)
        spectra.effective_rank(energy)

    run(call, model)


@FUZZ
@given(
    text=mostly(good_text, st.one_of(st.just(""), junk)),
    n=mostly(st.integers(1, 3), small),
    stop=mostly(st.booleans(), junk),
    policy=policies,
)
def test_chat(model, text, n, stop, policy) -> None:
    def call() -> None:
        chat = Chat(model, policy)
        chat.send(text, max_new_tokens=n, stop_at_eos=stop)

    run(call, model)


@FUZZ
@given(name=st.one_of(st.sampled_from(["", "zoo:nope", "zoo:llama:huge", "no/such-model"]), junk))
def test_load_and_zoo(model, name) -> None:
    run(lambda: residkit.load(name), model, allowed=(residkit.ModelNotFoundError,))
    run(lambda: zoo.config_for(name), model)


@FUZZ
@given(
    w=mostly(st.builds(lambda h: torch.randn(h, 64, 8), st.integers(1, 2)), tensors()),
    qtype=mostly(st.sampled_from(["Q4_1", "Q8_0"]), st.one_of(st.just("Q4_K"), junk)),
)
def test_requantise(model, w, qtype) -> None:
    run(lambda: requantise(w, qtype), model)
