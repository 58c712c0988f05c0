"""A batch's texts as the model takes them, read as the replicas read them: the tokenizer's
padding and length fitted to the model, texts in windows where the task reads them so, and
the targets as the loss takes them. Used by training steps and evaluation alike.
"""

from __future__ import annotations

from typing import Any

from tuneloop.core.tasks import Task


def encode_batch(tokenizer, batch: dict[str, list], max_length: int, device,
              task: Task) -> tuple[dict[str, Any], dict[str, list], dict[str, list]]:
    """``batch`` read as the replicas read it: the model's inputs on ``device``, the encoding
    as lists for the task (with what it asked the tokenizer for, such as offsets, which the
    model does not take), and the batch with a row per window. A task that reads long texts
    in windows (token classification) has a window per ``max_length`` tokens, each a row of
    the inputs; any other, a row per text."""
    enc = tokenizer([str(t) for t in batch["text"]], padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt", **task.serving_tokenizer_options(max_length))
    encoding = task.encoding_for(enc)  # and enc keeps only the model's inputs
    of_window = encoding.get("overflow_to_sample_mapping") or range(len(batch["text"]))
    windows = {k: [v[int(i)] for i in of_window] for k, v in batch.items()}
    return {k: v.to(device) for k, v in enc.items()}, encoding, windows


def target_tensor(targets: list, task: Task, device):
    """The loss's targets: class or tag ids, or multi-hot rows (``task.target_dtype``)."""
    import torch

    return torch.as_tensor(targets, dtype=torch.float32 if task.target_dtype == "float" else torch.long, device=device)


def token_lengths(tokenizer, shard, max_length: int):
    """Each row's tokens as a batch takes it (cut at ``max_length``): ``group_by_length``'s
    batches, and the evaluation sets' order."""
    import numpy as np

    texts = [str(t) for t in shard.column("text").to_pylist()]
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"] if texts else []
    return np.array([len(row) for row in ids], dtype=np.int64)


def with_pad_token(tokenizer, model) -> str | None:
    """Give a tokenizer without a padding token (GPT-2's, Llama's: decoder families) its end
    token as padding, and tell the model, which finds a text's last real token by it. Batches
    need padding, and the version saved with both serves as it trained. Returns what it did."""
    if tokenizer.pad_token is not None:
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return None
    if tokenizer.eos_token is None:
        raise ValueError(f"the tokenizer of {type(model).__name__} has neither a padding nor an end token "
                         "to pad batches with: save the base model's tokenizer with a pad_token")
    tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return f"the tokenizer has no padding token: padding with its end token {tokenizer.eos_token!r}"


def fit_to_positions(tokenizer, model, max_length: int) -> tuple[int, str | None]:
    """``max_length`` within the tokens ``model`` takes: its table of absolute positions
    (less the slots before the first position, in families that number positions after the
    pad id: RoBERTa's 514 hold 512 tokens), and the tokenizer's own limit. A longer batch
    failed indexing that table. The tokenizer keeps the limit, so the version it is saved
    with tells every replica, PyTorch or ONNX. Returns the length and what it changed."""
    table = next((m for name, m in model.base_model.named_modules()
                  if name.rpartition(".")[2] in ("position_embeddings", "wpe") and hasattr(m, "num_embeddings")), None)
    if table is not None:
        before = table.padding_idx + 1 if table.padding_idx is not None else 0
        tokenizer.model_max_length = min(tokenizer.model_max_length, table.num_embeddings - before)
    if max_length <= tokenizer.model_max_length:
        return max_length, None
    return tokenizer.model_max_length, (f"max_length {max_length} is more than the {tokenizer.model_max_length} "
                                        f"tokens {type(model).__name__} takes: training at {tokenizer.model_max_length}")
