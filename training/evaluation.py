"""Scoring an evaluation set inside the job: the gate's metrics, the loss early stopping
watches, and each row's answer, every worker on all of every set.
"""

from __future__ import annotations

import math
import time
from typing import Any

from tuneloop.core.tasks import Task
from tuneloop.training.model_inputs import encode_batch, target_tensor, token_lengths
from tuneloop.training.shards import batches

EVAL_BATCH_SIZE = 64


def activated(logits, task: Task):
    """Scores from logits as the task reads them: a softmax over the last axis, or a sigmoid
    per output (multi-label)."""
    return logits.float().sigmoid() if task.activation == "sigmoid" else logits.float().softmax(-1)


def eval_loss(logits, target, task: Task):
    """(the summed loss, how many terms it sums) of the loss the model's head computes:
    cross-entropy over classes a row, binary cross-entropy per label averaged a row for
    multi-label, cross-entropy a tagged token for token classification (tags marked -100
    left out), from fp32 logits: the head's own, on a bf16 engine's bf16 logits, was rounded
    to 3 significant digits, enough to change which epoch early stopping keeps. Summed, not
    averaged a pass: a pass of token windows with no tagged token (a text of control
    characters, whose tokens are all special) averaged to NaN, and the NaN validation loss
    stopped the job early."""
    import torch.nn.functional as F

    logits = logits.float()
    if task.activation == "sigmoid":
        per_row = F.binary_cross_entropy_with_logits(logits, target.float(), reduction="none").mean(-1)
        return per_row.sum(), per_row.numel()
    target = target.reshape(-1)
    summed = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target, ignore_index=-100, reduction="sum")
    return summed, int((target != -100).sum())


def evaluate(engine, tokenizer, rows, max_length: int, task: Task, masked: list[int] | None = None,
              order=None) -> dict[str, Any]:
    """Score a whole evaluation set: its metrics, its mean loss, whether each row (by its
    ``row`` number, when the set has one) was answered right, and whether every output was finite. Every
    worker sees all of the set (it is not split), so candidate and production are scored on
    exactly the same rows, and ZeRO-3's collective forward passes stay in step across ranks.
    ``masked``: output rows never answered (production's baseline, which had no rows for the
    labels added since: their fresh rows would answer at random); its loss is then NaN.
    ``order``: the rows' indices in the order to score them (``Evaluator`` gives longest
    first: SST-2 dev, 872 rows, MiniLM-L6, 2 threads, cut at 128, took 3.5 s where its own
    order took 6.8 s, with the same accuracy and loss). The metrics, the per-row answers and
    the loss (a mean over rows, or over tagged tokens) do not depend on it."""
    import torch

    engine.eval()
    y_true: list = []
    y_pred: list = []
    right: list[list] = []  # [row, answered right]: plain lists cross Ray Train's report
    finite = True
    loss_sum, loss_terms = 0.0, 0
    with torch.no_grad():
        for batch in batches(rows, EVAL_BATCH_SIZE, order):
            # Read as the replicas read it: a long text in windows, where its task has them.
            inputs, encoding, windows = encode_batch(tokenizer, batch, max_length, engine.device, task)
            window_targets = task.batch_targets(windows, encoding)
            scores: list = []
            # At most EVAL_BATCH_SIZE windows a forward pass: a batch of long documents is
            # thousands of windows (seed and golden rows have no max_chars_per_input).
            for start in range(0, len(window_targets), EVAL_BATCH_SIZE):
                end = start + EVAL_BATCH_SIZE
                logits = engine(**{k: v[start:end] for k, v in inputs.items()}).logits
                target = target_tensor(window_targets[start:end], task, engine.device)
                if masked:
                    logits = logits.clone()
                    logits[..., masked] = -1e4
                finite = finite and bool(torch.isfinite(logits).all())
                summed, terms = eval_loss(logits, target, task)
                loss_sum, loss_terms = loss_sum + float(summed), loss_terms + terms
                scores.extend(activated(logits, task).tolist())
            targets, predicted = task.evaluated(batch, encoding, scores)
            y_pred.extend(predicted)
            y_true.extend(targets)
            if "row" in batch:
                right.extend([int(r), task.answered_right(t, p)] for r, t, p in zip(batch["row"], targets, predicted, strict=True))
    engine.train()
    loss = loss_sum / loss_terms if loss_terms and not masked else math.nan
    return {"metrics": task.metrics(y_true, y_pred).model_dump(), "loss": loss, "right": right, "finite": finite}


class Evaluator:
    """Scores every evaluation set, each longest row first (batches of rows of about one
    length, little padding), and counts the seconds spent doing it (the job's
    feedback-to-serving time puts them under evaluation, not training)."""

    def __init__(self, engine, tokenizer, sets: dict[str, Any], max_length: int, task: Task):
        import numpy as np

        self.engine, self.tokenizer, self.sets, self.max_length, self.task = engine, tokenizer, sets, max_length, task
        self.orders = {name: np.argsort(-token_lengths(tokenizer, rows, max_length), kind="stable")
                       for name, rows in sets.items()}
        self.seconds = 0.0

    def __call__(self, masked: list[int] | None = None) -> dict[str, Any]:
        t0 = time.perf_counter()
        out = {name: evaluate(self.engine, self.tokenizer, rows, self.max_length, self.task, masked,
                               self.orders[name])
               for name, rows in self.sets.items()}
        self.seconds += time.perf_counter() - t0
        return out


def summary(evaluations: dict[str, Any]) -> str:
    return ", ".join(f"{name}: accuracy {e['metrics']['accuracy']:.4f} on {e['metrics']['eval_rows']} rows"
                     for name, e in evaluations.items())
