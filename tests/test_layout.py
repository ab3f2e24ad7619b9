"""The package's shape: no import cycles, files readable in one sitting, and no
TransformerLens / transformers internals outside the adapter (residkit/_bridge/)."""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "residkit"
MODULES = {
    ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): path
    for path in PACKAGE.rglob("*.py")
}


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name | ast.Attribute) and "TYPE_CHECKING" in ast.unparse(
        node.test
    )


def imports(module: str) -> set[str]:
    """residkit modules ``module`` imports, at any depth (lazy imports included), except
    ``if TYPE_CHECKING`` blocks, which never run."""
    tree = ast.parse(MODULES[module].read_text())
    is_package = MODULES[module].name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("residkit"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join([*parts, *([base] if base else [])])
            if base.startswith("residkit"):
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    found.add(sub if sub in MODULES else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in MODULES and m != module}


def find_cycle() -> list[str] | None:
    graph = {m: imports(m) for m in MODULES}
    # Importing a submodule first runs its parents' __init__; the package's own __init__
    # importing its children is not a cycle with them.
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if node.startswith(nxt + "."):  # a child importing its own package: cycles always
                continue
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := dfs(module)):
            return cycle
    return None


def test_no_import_cycle() -> None:
    cycle = find_cycle()
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle(monkeypatch) -> None:
    """Negative control: a lazy import of verify from an experiment module is a cycle."""
    real = imports

    def with_lazy_verify(module: str) -> set[str]:
        out = real(module)
        return out | {"residkit.checks"} if module == "residkit.markov" else out

    monkeypatch.setitem(globals(), "imports", with_lazy_verify)
    cycle = find_cycle()
    assert cycle is not None and "residkit.markov" in cycle and "residkit.checks" in cycle


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_file_over_400_lines(module: str) -> None:
    lines = MODULES[module].read_text().count("\n")
    assert lines <= 400, f"{MODULES[module]} has {lines} lines"


# Attributes that belong to TransformerLens's or transformers' internals: private names of
# their objects, the HF module behind a bridge component, cache-layer machinery.
INTERNALS = re.compile(
    r"\.original_component\b|\.original_model\b|\._forward(_pre)?_hooks\b|\.fwd_hooks\b"
    r"|\.bwd_hooks\b|\bDynamicLayer\b|\bcache_utils\b|\blazy_initialization\b|\bis_initialized\b"
    r"|\.layers\[|\b_captured_pre_ln_residual\b|\buse_native_layernorm_autograd\b"
    r"|\blayer_norm_folding\b|\bobject\.__setattr__\b|\b_tokenizer\b|\b_update_kv_cache\b"
)


def internals_outside_the_adapter() -> list[str]:
    hits = []
    for module, path in sorted(MODULES.items()):
        if module.startswith("residkit._bridge"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if INTERNALS.search(line.split("#")[0]):
                hits.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    return hits


def test_internals_only_in_the_adapter() -> None:
    assert internals_outside_the_adapter() == []


def test_the_internals_search_finds_one(monkeypatch, tmp_path) -> None:
    """Negative control: a module reaching for ``original_component`` is reported."""
    stray = tmp_path / "stray.py"
    stray.write_text("def f(attn):\n    return attn.k.original_component\n")
    monkeypatch.setitem(MODULES, "residkit.stray", stray)
    monkeypatch.setattr(
        Path, "relative_to", lambda self, other: Path(self.name)
    )  # the stray file lives outside the package
    assert internals_outside_the_adapter() == ["stray.py:2: return attn.k.original_component"]


PATH_REFERENCE = re.compile(r"(?<![\w/.])(tests/[\w/]+\.py|residkit(?:\.[A-Za-z_]\w*)+)")


def stale_references() -> list[str]:
    """Every ``tests/...py`` file or ``residkit.x.y`` module/attribute a docstring or comment
    in the package names that does not exist."""
    import importlib

    root = PACKAGE.parent
    stale = []
    for module, path in sorted(MODULES.items()):
        for ref in sorted(set(PATH_REFERENCE.findall(path.read_text()))):
            if ref.startswith("tests/"):
                if not (root / ref).exists():
                    stale.append(f"{module}: {ref}")
                continue
            parts = ref.split(".")
            for cut in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
                try:
                    obj = importlib.import_module(".".join(parts[:cut]))
                except ImportError:
                    continue
                try:
                    for attr in parts[cut:]:
                        obj = getattr(obj, attr)
                except AttributeError:
                    stale.append(f"{module}: {ref}")
                break
            else:
                stale.append(f"{module}: {ref}")
    return stale


def test_every_named_path_exists() -> None:
    assert stale_references() == []


def test_a_stale_reference_is_caught(monkeypatch) -> None:
    """Negative control: a docstring naming a test file and a module that do not exist."""
    fake = PACKAGE / "policies" / "base.py"
    real_text = Path.read_text

    def with_stale(self: Path, *a, **k) -> str:
        text = real_text(self, *a, **k)
        if self == fake:
            text += '\n"""See tests/test_nowhere.py and residkit._recompute."""\n'
        return text

    monkeypatch.setattr(Path, "read_text", with_stale)
    found = stale_references()
    assert "residkit.policies.base: tests/test_nowhere.py" in found
    assert "residkit.policies.base: residkit._recompute" in found


def figure_signature_faults(classes: list[type]) -> list[str]:
    """Every ``figure`` method that is not ``figure(self, *, title=None, <keyword options>)``."""
    import inspect

    faults = []
    for cls in classes:
        params = list(inspect.signature(cls.figure).parameters.values())[1:]
        if not params or params[0].name != "title" or params[0].default is not None:
            faults.append(f"{cls.__qualname__}: first option is not title=None")
        for p in params:
            if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.default is inspect.Parameter.empty:
                faults.append(f"{cls.__qualname__}: {p.name} is not keyword-only with a default")
    return faults


def result_classes() -> list[type]:
    import importlib
    import inspect

    found: dict[str, type] = {}
    for module in MODULES:
        for _, obj in inspect.getmembers(importlib.import_module(module), inspect.isclass):
            if obj.__module__.startswith("residkit") and callable(getattr(obj, "figure", None)):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return list(found.values())


def test_one_figure_signature() -> None:
    classes = result_classes()
    assert len(classes) >= 12, [c.__qualname__ for c in classes]
    assert figure_signature_faults(classes) == []


def test_a_second_figure_signature_is_caught() -> None:
    """Negative control: a positional option and a missing title."""

    class Positional:
        def figure(self, energy: float = 0.9, *, title: str | None = None) -> None: ...

    class Untitled:
        def figure(self) -> None: ...

    faults = figure_signature_faults([Positional, Untitled])
    assert any("Positional" in f for f in faults)
    assert any("Untitled" in f for f in faults)
