"""The model a job starts from: where each of its processes finds the files (on its own
node), and the model to fine-tune built from them, its head in tuneloop's label order.

The job's driver resolves a version to a folder by downloading it from the bucket into its
node's cache (``Registry.local_path``), and a base model through its node's Hugging Face
cache. A training worker or the teacher's scorer on another node (the shipped cluster has
a CPU head and GPU workers) had that path and no such folder: ``from_pretrained`` took it
for a hub id and the job failed. So the driver hands them what to fetch (``ModelFiles``),
and each resolves it where it runs; two workers of a node share one download.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel

from tuneloop.core.model_source import resolve_model_source
from tuneloop.core.tasks import Task
from tuneloop.store.registry import Registry
from tuneloop.store.storage import Storage
from tuneloop.training.recipe import dropout_overrides, head_order, inherited_rows


class ModelFiles(BaseModel):
    """A published ``version`` of ``model`` in the storage at ``storage`` (its URI), or a
    configured ``base_model`` (a hub id or a folder every node has)."""

    storage: str | None = None
    model: str | None = None
    version: str | None = None
    base_model: str | None = None

    @classmethod
    def of_version(cls, registry: Registry, model: str, version: str) -> ModelFiles:
        return cls(storage=registry.storage.uri, model=model, version=version)

    def local_path(self) -> str:
        """A folder of this node holding the files (downloaded here if need be)."""
        if self.version is not None:
            return Registry(Storage(self.storage)).local_path(self.model, self.version)
        return resolve_model_source(self.base_model)


def load_for_training(init_path: str, task: Task, dropout: float | None) -> tuple[Any, list[int]]:
    """The model to fine-tune, in fp32, with ``task``'s head in its label order, and the
    rows of that head the checkpoint had none for. A base encoder or another label set gets
    a fresh head (of as many labels under other names too); a checkpoint whose head has these labels in another order (a hub NER
    model's tags, a classifier trained elsewhere) has its output rows put in tuneloop's
    order. Without that its rows were read as the labels at their positions, and a
    [positive, negative] head started out answering each as the other. A checkpoint with
    some of the labels (labels added to the config) keeps its rows for those: its answers
    are production's as they were, which the gate compares the candidate with."""
    import torch
    import transformers

    head = task.head_labels()
    model_config = transformers.AutoConfig.from_pretrained(init_path)
    id2label = {int(i): label for i, label in (model_config.id2label or {}).items()}
    labels = [id2label.get(i) for i in range(len(id2label))]
    order, inherited = head_order(labels, head), inherited_rows(labels, head)
    model = getattr(transformers, task.auto_class).from_pretrained(
        init_path,
        num_labels=len(head),
        id2label=dict(enumerate(head)),
        label2id={label: i for i, label in enumerate(head)},
        ignore_mismatched_sizes=True,  # a base encoder or a changed label set gets a fresh head
        dtype=torch.float32,
        **task.model_options,
        **dropout_overrides(model_config.to_dict(), dropout),
    )
    if order is not None:
        _reorder_output_rows(model, order)
    elif _other_labels(labels, head):
        _fresh_output_layer(model, len(head))
    if inherited is None:
        return model, []
    named = _output_layer(model, len(head), named=True)
    old = _saved_rows(init_path, [name for name, _ in named], len(labels))
    if old is None:  # not in safetensors (a .bin checkpoint): the whole model, for its head
        production = getattr(transformers, task.auto_class).from_pretrained(init_path, dtype=torch.float32,
                                                                            **task.model_options)
        old = _output_layer(production, len(labels))
    new = [p for _, p in named]
    kept = [(i, row) for i, row in enumerate(inherited) if row is not None]
    with torch.no_grad():
        for p, q in zip(new, old, strict=True):
            p[torch.tensor([i for i, _ in kept])] = q[torch.tensor([row for _, row in kept])]
    return model, [i for i, row in enumerate(inherited) if row is None]


def _other_labels(checkpoint_labels: list[str | None], head: list[str]) -> bool:
    """Whether the checkpoint's head is as large as ``head`` but for labels of its own names
    (a hub sentiment model's NEGATIVE/POSITIVE under a config's neg/pos): loaded as it is
    (the shapes match), its rows were read as the config's labels at their positions.
    Transformers' placeholder names (LABEL_0, ...) say nothing of what a row means: kept."""
    if len(checkpoint_labels) != len(head) or any(label is None for label in checkpoint_labels):
        return False
    if all(str(label).upper() == f"LABEL_{i}" for i, label in enumerate(checkpoint_labels)):
        return False
    return {str(label).lower() for label in checkpoint_labels} != {label.lower() for label in head}


def _fresh_output_layer(model, rows: int) -> None:
    """Initialise the head's last layer anew, as transformers does a missing one."""
    import torch

    std = getattr(model.config, "initializer_range", 0.02)
    with torch.no_grad():
        for p in _output_layer(model, rows):
            if p.ndim == 2:
                p.normal_(mean=0.0, std=std)
            else:
                p.zero_()


def _output_layer(model, rows: int, named: bool = False) -> list:
    """The head's last layer: its weight, and bias if any (the last parameters outside the
    encoder, as Hugging Face heads register them), with one row a label; with ``named``,
    (name, parameter) pairs."""
    prefix = model.base_model_prefix + "."
    outside = [(n, p) for n, p in model.named_parameters() if not n.startswith(prefix)]
    last = [(n, p) for n, p in outside[-2:] if p.shape[0] == rows]
    if sum(p.ndim == 2 for _, p in last) != 1:
        raise ValueError(f"cannot find the output layer of {type(model).__name__}, of {rows} label rows "
                         f"(parameters outside the encoder: {[n for n, _ in outside]})")
    return last if named else [p for _, p in last]


def _saved_rows(path: str, names: list[str], rows: int) -> list | None:
    """Just the tensors ``names`` of the checkpoint at ``path``, from its safetensors (one
    file, or shards and their index), in fp32; None when they are not all there with
    ``rows`` rows. A job that adds labels needs production's output rows only: it loaded the
    whole production model a second time for them."""
    import json

    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = {n: os.path.join(path, weight_map[n]) for n in names if n in weight_map}
    else:
        single = os.path.join(path, "model.safetensors")
        files = {n: single for n in names} if os.path.exists(single) else {}
    out = []
    for name in names:
        if name not in files:
            return None
        with safe_open(files[name], framework="pt") as saved:
            if name not in saved.keys():
                return None
            tensor = saved.get_tensor(name).float()
        if tensor.shape[0] != rows:
            return None
        out.append(tensor)
    return out


def _reorder_output_rows(model, order: list[int]) -> None:
    """Permute the rows of the head's last layer into ``order``."""
    import torch

    index = torch.tensor(order)
    with torch.no_grad():
        for p in _output_layer(model, len(order)):
            p.copy_(p[index])
