"""The baseline the benchmarks hold tuneloop's training job against: the textbook Hugging Face
fine-tuning loop in one process, with nothing of Ray, DeepSpeed or the registry.

AutoModelForSequenceClassification, torch's AdamW with no weight decay on biases and
LayerNorm, gradients clipped at norm 1 (Trainer's ``max_grad_norm``, and tuneloop's), and
``get_linear_schedule_with_warmup``; every epoch reshuffled. It times itself: the model's
load, and each epoch.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tuneloop.training.deepspeed_config import warmup_steps
from tuneloop.training.recipe import training_speed

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight")


@dataclass
class LoopTimes:
    load_s: float  # tokenizer and model, from disk
    epoch_s: list[float] = field(default_factory=list)
    rows: int = 0  # per epoch
    save_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.load_s + sum(self.epoch_s) + self.save_s

    @property
    def steady_samples_per_s(self) -> float:
        """As a job's manifest counts it (``training_speed``): the epochs after the first."""
        return training_speed([(self.rows, s) for s in self.epoch_s], None)["steady_samples_per_s"]


def fine_tune(base: str, labels: list[str], rows: list[tuple[str, str]], *, epochs: int, learning_rate: float,
              batch_size: int, max_length: int, warmup_ratio: float, weight_decay: float, seed: int = 0,
              out: Path | None = None, progress=None, on_step=None) -> LoopTimes:
    """Fine-tune ``base`` on ``rows`` (text, label); saves the model to ``out`` if given.
    ``seed`` sets the head's initialisation, dropout and the order of every epoch. Runs on
    the torch threads the caller set. ``on_step(step, net, tokenizer)``, if given, after
    every optimizer step (an evaluation in it is timed with the epoch)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(base)
    net = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)})
    times = LoopTimes(load_s=time.perf_counter() - t0, rows=len(rows))
    groups = [{"params": [p for n, p in net.named_parameters() if not n.endswith(NO_DECAY)],
               "weight_decay": weight_decay},
              {"params": [p for n, p in net.named_parameters() if n.endswith(NO_DECAY)], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=learning_rate)
    steps = epochs * -(-len(rows) // batch_size)
    schedule = get_linear_schedule_with_warmup(optimizer, warmup_steps(steps, warmup_ratio), steps)  # the job's count
    index = {x: i for i, x in enumerate(labels)}
    rng = random.Random(seed)
    net.train()
    for epoch in range(epochs):
        t0 = time.perf_counter()
        order = list(rows)
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            chunk = order[i:i + batch_size]
            enc = tokenizer([t for t, _ in chunk], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            loss = net(**enc, labels=torch.tensor([index[y] for _, y in chunk])).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            if on_step:
                on_step(schedule.last_epoch, net, tokenizer)
        times.epoch_s.append(time.perf_counter() - t0)
        if progress:
            progress(f"plain loop (seed {seed}): epoch {epoch + 1}/{epochs} done in {times.epoch_s[-1]:.0f}s, "
                     f"last loss {loss.item():.3f}")
    if out is not None:
        t0 = time.perf_counter()
        net.save_pretrained(out)
        tokenizer.save_pretrained(out)
        times.save_s = time.perf_counter() - t0
    return times
