"""residkit: check, live, that the KV cache is a function of the residual stream.

Importing residkit changes nothing: no global patches, no hooks. Every function that adds
hooks to a model removes them before returning, also when it raises.

Examples:
    >>> import residkit
    >>> model = residkit.load("zoo:llama")
    >>> residkit.capture_residuals(model, "The residual stream").shape[0] == model.cfg.n_layers + 1
    True
"""

from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Every public name lives in a submodule and is imported on first use (PEP 562): importing
# residkit costs milliseconds and loads neither torch nor TransformerLens, so ``residkit
# --help`` answers at once and ``import residkit`` changes nothing.
_EXPORTS: dict[str, str] = {
    "ARCH_TABLE": "residkit.architectures",
    "ArchSpec": "residkit.architectures",
    "UnsupportedArchitectureError": "residkit.architectures",
    "spec_for": "residkit.architectures",
    "capture_residuals": "residkit.capture",
    "PolicyComparison": "residkit.comparison",
    "compare_policies": "residkit.comparison",
    "kept_positions": "residkit.comparison",
    "kvdirect_frontier": "residkit.frontier",
    "Chat": "residkit.generation",
    "Generation": "residkit.generation",
    "Generations": "residkit.generation",
    "generate": "residkit.generation",
    "generate_kvdirect": "residkit.generation",
    "ModelNotFoundError": "residkit.loading",
    "load": "residkit.loading",
    "CrossTaskReport": "residkit.markov",
    "MarkovReport": "residkit.markov",
    "cross_task_suite": "residkit.markov",
    "markov_test": "residkit.markov",
    "PatchingSweep": "residkit.patching",
    "SweepComparison": "residkit.patching",
    "attribution_sweep": "residkit.patching",
    "compare_sweeps": "residkit.patching",
    "patch_residual": "residkit.patching",
    "patching_sweep": "residkit.patching",
    "CachePolicy": "residkit.policies",
    "FullCache": "residkit.policies",
    "H2O": "residkit.policies",
    "KVDirect": "residkit.policies",
    "NoCache": "residkit.policies",
    "SnapKV": "residkit.policies",
    "StreamingLLM": "residkit.policies",
    "TOVA": "residkit.policies",
    "Window": "residkit.policies",
    "KVReport": "residkit.reconstruction",
    "kv_reconstruction_report": "residkit.reconstruction",
    "recompute_kv": "residkit.reconstruction",
    "ModelFetchError": "residkit.registry",
    "reproduce": "residkit.reproduction",
    "QKSpectra": "residkit.spectra",
    "qk_spectra": "residkit.spectra",
    "verify": "residkit.checks",
}
_SUBMODULES = (
    "generation",
    "patching",
    "policies",
    "registry",
    "reproduction",
    "viz",
    "widgets",
    "zoo",
)

if TYPE_CHECKING:
    from residkit import zoo
    from residkit.architectures import ARCH_TABLE, ArchSpec, UnsupportedArchitectureError, spec_for
    from residkit.capture import capture_residuals
    from residkit.checks import verify
    from residkit.comparison import PolicyComparison, compare_policies, kept_positions
    from residkit.frontier import kvdirect_frontier
    from residkit.generation import Chat, Generation, Generations, generate, generate_kvdirect
    from residkit.loading import ModelNotFoundError, load
    from residkit.markov import CrossTaskReport, MarkovReport, cross_task_suite, markov_test
    from residkit.patching import (
        PatchingSweep,
        SweepComparison,
        attribution_sweep,
        compare_sweeps,
        patch_residual,
        patching_sweep,
    )
    from residkit.policies import (
        H2O,
        TOVA,
        CachePolicy,
        FullCache,
        KVDirect,
        NoCache,
        SnapKV,
        StreamingLLM,
        Window,
    )
    from residkit.reconstruction import KVReport, kv_reconstruction_report, recompute_kv
    from residkit.registry import ModelFetchError
    from residkit.reproduction import reproduce
    from residkit.spectra import QKSpectra, qk_spectra

__all__ = [
    "ARCH_TABLE",
    "H2O",
    "TOVA",
    "ArchSpec",
    "CachePolicy",
    "Chat",
    "CrossTaskReport",
    "FullCache",
    "Generation",
    "Generations",
    "KVDirect",
    "KVReport",
    "MarkovReport",
    "ModelFetchError",
    "ModelNotFoundError",
    "NoCache",
    "PatchingSweep",
    "PolicyComparison",
    "QKSpectra",
    "SnapKV",
    "StreamingLLM",
    "SweepComparison",
    "UnsupportedArchitectureError",
    "Window",
    "attribution_sweep",
    "capture_residuals",
    "compare_policies",
    "compare_sweeps",
    "cross_task_suite",
    "generate",
    "generate_kvdirect",
    "kept_positions",
    "kv_reconstruction_report",
    "kvdirect_frontier",
    "load",
    "markov_test",
    "patch_residual",
    "patching_sweep",
    "qk_spectra",
    "recompute_kv",
    "reproduce",
    "spec_for",
    "verify",
    "zoo",
]


def __getattr__(name: str) -> object:
    import importlib

    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"residkit.{name}")
    raise AttributeError(f"module 'residkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_SUBMODULES})
