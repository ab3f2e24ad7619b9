"""Inputs the fuzz suite found ending in raw errors or accepted silently, each now refused by
name. Every test has the valid call beside it as its control."""

import pytest
import torch

import residkit
from residkit.comparison import compare_policies, kept_positions
from residkit.policies import Window
from tests.conftest import get_model, raises_naming


def test_an_attention_mask_that_is_not_a_tensor_is_named() -> None:
    model = get_model("llama")
    ids = torch.tensor([[5, 6, 7]])
    with raises_naming("attention_mask", 0):
        residkit.generate(model, ids, max_new_tokens=2, attention_mask=0)
    ok = residkit.generate(model, ids, max_new_tokens=2, attention_mask=torch.ones_like(ids))
    assert ok.tokens.shape == (2,)


@pytest.mark.parametrize("dtype", [None, "float32", torch.int64])
def test_load_refuses_a_dtype_that_is_not_floating(dtype) -> None:
    with raises_naming("dtype", dtype):
        residkit.load("zoo:llama", dtype=dtype)
    assert (
        next(residkit.load("zoo:llama", dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16
    )


def test_cross_task_suite_names_tasks_that_are_not_a_dict_of_texts() -> None:
    model = get_model("llama")
    for tasks in (["ab", "cd"], {"a": 3, "b": "x"}):
        with raises_naming("tasks", tasks):
            residkit.cross_task_suite(model, tasks=tasks, layers=[0], progress=False)
    ok = residkit.cross_task_suite(
        model, tasks={"a": "ab c", "b": "cd e"}, layers=[0], progress=False
    )
    assert len(ok.reports) == 2


def test_kept_positions_names_a_policy_that_is_not_one() -> None:
    model = get_model("llama")
    with raises_naming("policy", None):
        kept_positions(model, "abcdef", None, max_new_tokens=2)
    assert set(kept_positions(model, "abcdef", "window", max_new_tokens=2)["position"])
    assert len(kept_positions(model, "abcdef", Window(2), max_new_tokens=2)) > 0


def test_resume_must_name_a_file(tmp_path) -> None:
    model = get_model("llama")
    kw = {"budgets": [2], "policies": ["window"], "max_new_tokens": 2, "progress": False}
    with raises_naming("resume", str(tmp_path)):
        compare_policies(model, "abcdef", resume=tmp_path, **kw)
    with raises_naming("resume", 3):
        compare_policies(model, "abcdef", resume=3, **kw)
    assert len(compare_policies(model, "abcdef", resume=tmp_path / "c.jsonl", **kw).table) == 1
