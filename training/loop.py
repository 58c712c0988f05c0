"""The Ray Train worker: fine-tune with DeepSpeed, evaluate, export one consolidated HF checkpoint.

Runs once per worker inside a TorchTrainer, which has already set up torch.distributed
(gloo on CPU, nccl on GPU); deepspeed.initialize joins that process group.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from contextlib import nullcontext
from typing import Any

from tuneloop.core.tasks import Task, make_task
from tuneloop.training.deepspeed_config import build_deepspeed_config

EVAL_BATCH_SIZE = 64


def _log(rank: int, msg: str) -> None:
    if rank == 0:
        print(f"[tuneloop train] {msg}", flush=True)


def _param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and LayerNorm weights, as in BERT's recipe."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or name.endswith(".bias") else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _encode(tokenizer, texts, max_length: int, device, task: Task) -> tuple[dict[str, Any], dict[str, list]]:
    """The model's inputs on ``device``, and the encoding as lists for the task (with what
    its ``tokenizer_options`` asked for, such as offsets, which the model does not take)."""
    enc = tokenizer([str(t) for t in texts], padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt", **task.tokenizer_options)
    encoding = task.encoding_for(enc)  # and enc keeps only the model's inputs
    return {k: v.to(device) for k, v in enc.items()}, encoding


def _columns(batch: dict[str, Any]) -> dict[str, list]:
    return {k: v.tolist() for k, v in batch.items()}


def _evaluate(engine, tokenizer, shard, max_length: int, task: Task) -> dict[str, Any]:
    """Score a whole evaluation set: its metrics, whether each row (by its ``row`` number,
    when the set has one) was answered right, and whether every output was finite. Every
    worker sees all of the set (it is not split), so candidate and production are scored on
    exactly the same rows, and ZeRO-3's collective forward passes stay in step across ranks."""
    import torch

    engine.eval()
    y_true: list = []
    y_pred: list = []
    right: list[list] = []  # [row, answered right]: plain lists cross Ray Train's report
    finite = True
    with torch.no_grad():
        for batch in shard.iter_batches(batch_size=EVAL_BATCH_SIZE, batch_format="numpy"):
            inputs, encoding = _encode(tokenizer, batch["text"], max_length, engine.device, task)
            logits = engine(**inputs).logits
            finite = finite and bool(torch.isfinite(logits).all())
            predicted = task.predictions(logits.argmax(-1).tolist(), encoding)
            targets = task.batch_targets(_columns(batch), encoding)
            y_pred.extend(predicted)
            y_true.extend(targets)
            if "row" in batch:
                right.extend([int(r), bool(t == p)] for r, t, p in zip(batch["row"], targets, predicted, strict=True))
    engine.train()
    return {"metrics": task.metrics(y_true, y_pred).model_dump(), "right": right, "finite": finite}


def _evaluate_all(engine, tokenizer, shards: dict[str, Any], max_length: int, task: Task) -> dict[str, Any]:
    return {name: _evaluate(engine, tokenizer, shard, max_length, task) for name, shard in shards.items()}


def _summary(evaluations: dict[str, Any]) -> str:
    return ", ".join(f"{name}: accuracy {e['metrics']['accuracy']:.4f} on {e['metrics']['eval_rows']} rows"
                     for name, e in evaluations.items())


def _consolidated_state_dict(module, rank: int) -> dict[str, Any]:
    """Full weights on rank 0, gathering ZeRO-3 partitions one parameter at a time."""
    import deepspeed

    keys = set(module.state_dict().keys())  # persistent entries only
    state: dict[str, Any] = {}
    for name, param in module.named_parameters():
        partitioned = hasattr(param, "ds_id")
        ctx = deepspeed.zero.GatheredParameters([param], modifier_rank=None) if partitioned else nullcontext()
        with ctx:
            if rank == 0 and name in keys:
                state[name] = param.data.detach().to("cpu", copy=True).contiguous()
    if rank == 0:
        for name, buf in module.named_buffers():
            if name in keys:
                state[name] = buf.detach().to("cpu", copy=True)
    return state


def train_loop_per_worker(config: dict[str, Any]) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if config["use_gpu"] else "cpu")
    import deepspeed
    import ray.train
    import torch
    import transformers

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"])
    task = make_task(config["task"], config["labels"])
    head = task.head_labels()
    max_length: int = config["max_length"]
    batch_size: int = config["batch_size"]

    tokenizer = transformers.AutoTokenizer.from_pretrained(config["init_path"])
    model = getattr(transformers, task.auto_class).from_pretrained(
        config["init_path"],
        num_labels=len(head),
        id2label=dict(enumerate(head)),
        label2id={label: i for i, label in enumerate(head)},
        ignore_mismatched_sizes=True,  # a base encoder or a changed label set gets a fresh head
        dtype=torch.float32,
    )
    steps_per_epoch = max(1, math.ceil(config["train_rows"] / (batch_size * world)))
    total_steps = steps_per_epoch * config["epochs"]
    if config.get("max_steps"):
        total_steps = min(total_steps, config["max_steps"])
    ds_config = build_deepspeed_config(
        zero_stage=config["zero_stage"],
        micro_batch_size=batch_size,
        world_size=world,
        learning_rate=config["learning_rate"],
        weight_decay=config["weight_decay"],
        total_steps=total_steps,
        warmup_ratio=config["warmup_ratio"],
        use_gpu=config["use_gpu"],
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=_param_groups(model, config["weight_decay"]), config=ds_config
    )
    train_shard = ray.train.get_dataset_shard("train")
    eval_shards = {name: ray.train.get_dataset_shard(name) for name in config["eval_sets"]}

    parent_eval = None
    if config["has_parent"]:
        # The starting weights are production's: score them on the same evaluation rows.
        parent_eval = _evaluate_all(engine, tokenizer, eval_shards, max_length, task)
        _log(rank, "production baseline: " + _summary(parent_eval))

    step = 0
    done = False
    for epoch in range(config["epochs"]):
        t0, seen, loss_sum, batches = time.perf_counter(), 0, 0.0, 0
        for batch in train_shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
            inputs, encoding = _encode(tokenizer, batch["text"], max_length, engine.device, task)
            targets = task.batch_targets(_columns(batch), encoding)
            target = torch.as_tensor(targets, dtype=torch.long, device=engine.device)
            loss = engine(**inputs, labels=target).loss
            engine.backward(loss)
            engine.step()
            step += 1
            seen += len(target)
            loss_sum += float(loss)
            batches += 1
            if step >= total_steps:
                done = True
                break
        dt = time.perf_counter() - t0
        _log(
            rank,
            f"epoch {epoch + 1}/{config['epochs']} step {step}/{total_steps} "
            f"loss {loss_sum / max(1, batches):.4f} {seen * world / max(dt, 1e-9):.1f} samples/s",
        )
        if done:
            break

    candidate_eval = _evaluate_all(engine, tokenizer, eval_shards, max_length, task)
    _log(rank, "candidate: " + _summary(candidate_eval))
    state = _consolidated_state_dict(engine.module, rank)
    report = {"candidate": candidate_eval, "parent": parent_eval, "steps": step}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            engine.module.save_pretrained(tmp, state_dict=state)
            tokenizer.save_pretrained(tmp)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(report, checkpoint=checkpoint)
