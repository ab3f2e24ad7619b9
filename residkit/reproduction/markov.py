"""Abstract: cross-task residual patching at every layer gives D_KL = 0 (the Markov property)."""

from __future__ import annotations

from transformer_lens.model_bridge import TransformerBridge

from residkit.markov import cross_task_suite
from residkit.reproduction.base import DIFFERS, REPRODUCED, ClaimResult, Row, Sizes, settings_of
from residkit.reproduction.prompts import TASK_FAMILIES

TITLE = "Cross-task residual patching at every layer: D_KL = 0 (abstract)"


def run(models: dict[str, TransformerBridge], sizes: Sizes, progress: bool) -> ClaimResult:
    tasks = dict(list(TASK_FAMILIES.items())[: sizes.markov_tasks])
    rows, figures, data = [], [], {}
    for name, model in models.items():
        # Every patched run's logits, computed: the claim is about output distributions.
        suite = cross_task_suite(model, tasks=tasks, compare="logits", progress=progress)
        table = suite.table
        pairs = len(tasks) * (len(tasks) - 1)
        layers = model.cfg.n_layers + 1
        max_kl = float(table["kl"].max())
        bitwise = bool(table["bitwise_equal"].all())
        rows.append(
            Row(
                name,
                f"D_KL(source || patched), {pairs} task pairs x {layers} layers",
                "0 at every layer",
                f"max {max_kl:.3g}; logits bitwise equal in {int(table['bitwise_equal'].sum())} "
                f"of {len(table)} runs; unpatched control {table['control_kl'].min():.2f}-"
                f"{table['control_kl'].max():.2f} nats",
                REPRODUCED if bitwise and max_kl == 0.0 else DIFFERS,
                "" if bitwise else "some patched runs differ from their source in the last bits",
            )
        )
        fig = suite.figure()
        fig.update_layout(title=f"{name}: cross-task residual patching at every layer")
        figures.append(fig.to_json())
        data[name] = table.to_dict("records")
    return ClaimResult("markov", TITLE, rows, figures, data, settings=settings_of(sizes))
