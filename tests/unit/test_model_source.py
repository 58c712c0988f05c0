"""Resolving a hub id fetches what transformers loads, not the whole repo."""

from __future__ import annotations

import fnmatch
import os

import huggingface_hub

from tuneloop.core.model_source import resolve_model_source

# A sentence-transformers repo's layout: the same weights in several formats.
REPO = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
        "special_tokens_map.json", "1_Pooling/config.json", "pytorch_model.bin", "tf_model.h5", "rust_model.ot",
        "onnx/model.onnx", "onnx/model_qint8_avx512.onnx", "openvino/openvino_model.bin", "openvino/openvino_model.xml"]


def fake_hub(tmp_path, repo_files):
    """snapshot_download over a repo of ``repo_files``: the files its patterns select land in one folder."""
    calls = []

    def snapshot_download(source, allow_patterns=None, **options):
        calls.append(allow_patterns)
        for name in repo_files:
            if allow_patterns is None or any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / name).write_text("x")
        return str(tmp_path)
    return snapshot_download, calls


def fetched(tmp_path) -> set[str]:
    return {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}


def test_a_repo_with_safetensors_gives_its_configs_weights_and_tokenizer_only(tmp_path, monkeypatch):
    fake, calls = fake_hub(tmp_path, REPO)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert resolve_model_source("org/minilm") == str(tmp_path)
    assert fetched(tmp_path) == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                                 "vocab.txt", "special_tokens_map.json", "1_Pooling/config.json"}
    assert len(calls) == 1


def test_a_repo_without_safetensors_gives_its_pytorch_weights(tmp_path, monkeypatch):
    fake, calls = fake_hub(tmp_path, [n for n in REPO if not n.endswith(".safetensors")])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    resolve_model_source("org/old-bert")
    assert "pytorch_model.bin" in fetched(tmp_path) and "openvino/openvino_model.bin" not in fetched(tmp_path)
    assert len(calls) == 2


def test_a_local_folder_named_relatively_resolves_to_its_absolute_path(tmp_path, monkeypatch):
    """A Ray worker opens it from its own working directory, where the relative name means nothing."""
    (tmp_path / "models" / "teacher").mkdir(parents=True)
    (tmp_path / "models" / "teacher" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert resolve_model_source("models/teacher") == str(tmp_path / "models" / "teacher")


def test_a_folder_without_a_config_json_is_no_model_and_says_so_in_a_line(tmp_path):
    """transformers took it for a tokenizer to convert and asked for sentencepiece, with a
    traceback in every worker; a ValueError is a job's one-line failure."""
    import pytest

    from tuneloop.core.model_source import ModelSourceError

    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelSourceError, match="folder without a config.json") as e:
        resolve_model_source(str(tmp_path))
    assert isinstance(e.value, ValueError)


def test_the_bundled_default_is_resolved_once_a_process_without_asking_the_hub_again(monkeypatch, caplog):
    """Every model of a config on the default base model, and every job, asked the hub again
    (up to its 5 s timeout each) and logged the same line."""
    from tuneloop.core import model_source

    monkeypatch.setattr(model_source, "_BUNDLED_HERE", {})
    asked = []

    def unreachable(source, **options):
        asked.append(options)
        raise OSError("no route to host")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with caplog.at_level("INFO", logger="tuneloop.core.model_source"):
        first = resolve_model_source("sentence-transformers/all-MiniLM-L6-v2")
        again = resolve_model_source("sentence-transformers/all-MiniLM-L6-v2")
    assert first == again and os.path.isdir(first)
    assert len(asked) == 2  # the cache, then the hub: once
    assert sum("hub unreachable" in r.message for r in caplog.records) == 1
