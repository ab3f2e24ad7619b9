"""Per-token accounting: the paper's one-residual ratio and the layer-checkpoint cost."""

from residkit import zoo
from residkit.accounting import accounting_table, per_token_bytes


def test_per_token_bytes_accounting() -> None:
    smol = per_token_bytes(zoo.config_for("llama", config="smollm2-135m"))
    assert smol["kv_all_layers"] == 30 * 384 * 2
    assert smol["residual_per_global_layer"] == 30 * 576 * 2  # more than the K/V it replaces
    g4 = per_token_bytes(zoo.config_for("gemma3", config="gemma-3-4b"))
    assert (g4["kv_all_layers"], g4["residual_one"]) == (139_264, 5_120)
    assert g4["residual_per_global_layer"] == 5 * 5_120  # only the 5 global layers


def test_accounting_table_ratios() -> None:
    table = accounting_table().set_index("model")
    ratio = table["kv / one residual"]
    assert ratio.min() > 6.8 and ratio.max() < 27.3  # the paper's 7-27x, computed
    assert (table["per-global-layer residuals / global K/V"] >= 1.25).all()
