"""residkit: check, live, that the KV cache is a function of the residual stream.

Importing residkit changes nothing: no global patches, no hooks. Every function that adds
hooks to a model removes them before returning, also when it raises.

Example:
    >>> import residkit
    >>> model = residkit.load("zoo:llama")
    >>> residkit.capture_residuals(model, "The residual stream").shape[0] == model.cfg.n_layers + 1
    True
"""

from residkit import zoo
from residkit.architectures import ARCH_TABLE, ArchSpec, UnsupportedArchitectureError, spec_for
from residkit.capture import capture_residuals
from residkit.comparison import PolicyComparison, compare_policies, kept_positions
from residkit.generation import Chat, Generation, generate, generate_kvdirect
from residkit.loading import ModelNotFoundError, load
from residkit.markov import CrossTaskReport, MarkovReport, cross_task_suite, markov_test
from residkit.patching import patch_residual, patching_sweep
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
from residkit.spectra import QKSpectra, qk_spectra
from residkit.verify import verify

__version__ = "0.1.0"

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
    "KVDirect",
    "KVReport",
    "MarkovReport",
    "ModelFetchError",
    "ModelNotFoundError",
    "NoCache",
    "PolicyComparison",
    "QKSpectra",
    "SnapKV",
    "StreamingLLM",
    "UnsupportedArchitectureError",
    "Window",
    "capture_residuals",
    "compare_policies",
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
    # ipywidgets and anywidget load only when the widgets are asked for; the reproduction
    # (plotly report, every claim module) only when it is run.
    if name == "kvdirect_frontier":
        from residkit.frontier import kvdirect_frontier

        return kvdirect_frontier
    if name == "reproduce":
        from residkit.reproduction import reproduce

        return reproduce
    if name == "widgets":
        import importlib

        return importlib.import_module("residkit.widgets")
    raise AttributeError(f"module 'residkit' has no attribute {name!r}")
