"""The transfer-learning recipe's decisions, as pure functions of names and numbers: which
precision a device trains in, which parameters stay frozen, which config keys carry dropout,
when to stop early, which layers a distilled student keeps. The worker (``loop.py``) applies them; tests check them without torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

Precision = str  # "bf16", "fp16" or "fp32"


def resolve_precision(requested: str, use_gpu: bool, bf16_supported: bool) -> Precision:
    """What a worker trains in. ``auto``: bf16 where the GPU has it (Ampere and later: no loss
    scaling needed, fp32's range), fp16 with dynamic loss scaling on older GPUs, fp32 on CPU
    (DeepSpeed's CPU path has no half-precision kernels worth having). Half precision asked
    at ZeRO stage 0 runs at stage 1 (``zero_stage_to_run``), which keeps the fp32 master
    weights the export reads."""
    if requested == "auto":
        if not use_gpu:
            return "fp32"
        return "bf16" if bf16_supported else "fp16"
    if requested == "bf16" and use_gpu and not bf16_supported:
        raise ValueError("precision 'bf16' was asked for, but this GPU does not support bf16: use fp16 or auto")
    if requested in ("bf16", "fp16") and not use_gpu:
        raise ValueError(f"precision {requested!r} needs a GPU; on CPU training runs in fp32")
    return requested



def zero_stage_to_run(requested: int, world_size: int, precision: Precision) -> int:
    """The ZeRO stage a job runs at. ZeRO partitions optimizer state and gradients (and at
    stage 3 the weights) among the workers: a lone worker has no one to share them with, so
    stages 1 to 3 add only their bookkeeping (flattened gradient buckets, a norm computed
    over partitions). Measured on CPU, MiniLM-L6 on SST-2, one run: one worker at ZeRO-2
    trained at 24.0 samples/s, at ZeRO-0 at 34.6. A lone fp32 worker therefore runs at stage
    0; in bf16 or fp16 the stage stays, as it holds the fp32 master weights the export reads,
    and stage 0 runs as stage 1: DeepSpeed 0.19's bf16 at stage 0 wraps the optimizer in its
    fp16 optimizer, whose fp32 copies ``safe_get_full_fp32_param`` cannot reach, so the export
    took the bf16-rounded weights."""
    if precision == "fp32":
        return 0 if world_size == 1 else requested
    return max(requested, 1)

# Encoder blocks are numbered under one of these names in Hugging Face models: BERT, RoBERTa,
# DistilBERT and ELECTRA ("layer"), Llama and Mistral ("layers"), T5 ("block"), GPT-2 ("h").
_BLOCK = re.compile(r"(?:^|\.)(?:layer|layers|block|h)\.(\d+)\.")
# What feeds the first block, outside any block: token and position embeddings by the same
# families' names, and any name holding "embed" (ELECTRA's embeddings_project, DeBERTa's
# rel_embeddings, which every block reads), which named segments alone left training.
_EMBEDDING = re.compile(r"(?:^|\.)(?:\w*embed\w*|wte|wpe|shared)(?:\.|$)")
# What else every block reads, outside them: DeBERTa-v2's norm of its relative embeddings
# (encoder.LayerNorm) and the convolution over layer 0's output (encoder.conv), MPNet's
# relative attention bias. Left training, the frozen layers' outputs moved all the same.
_SHARED_INPUT = re.compile(r"(?:^|\.)(?:encoder\.(?:LayerNorm|conv)|relative_attention_bias)\.")


# Where Hugging Face configs keep the encoder's layer count (BERT and most; GPT-2; T5;
# DistilBERT, whose config.json has n_layers alone and whose checks were skipped).
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def layer_problem(config: dict[str, Any], freeze_layers: int, feature_extraction: bool,
                  student_layers: int | None = None) -> str | None:
    """Why the job cannot take the layers it asks of the model of ``config`` (its config.json),
    known before the workers start: ``freeze_layers`` it does not have, or, for a student's
    v1 cut from this teacher, more ``student_layers`` than the teacher has. None if it can,
    or the count is unknown. (The workers check the parameters themselves, ``frozen_parameters``
    and ``student_layers``: that came only after the job's start-up.)"""
    layers = next((config[k] for k in _LAYER_COUNT_KEYS if isinstance(config.get(k), int)), None)
    if student_layers is not None and layers is not None and student_layers > layers:
        return (f"distill.student_layers {student_layers} exceeds the teacher's {layers} encoder layers: "
                f"a student cut from it keeps at most {layers}")
    layers = student_layers or layers
    if feature_extraction or not freeze_layers:
        return None
    if layers is not None and freeze_layers > layers:
        return (f"freeze_layers {freeze_layers} exceeds the model's {layers} encoder layers "
                "(use feature_extraction to freeze the whole encoder)")
    return None


def frozen_parameters(names: Iterable[str], base_prefix: str, freeze_layers: int, feature_extraction: bool) -> set[str]:
    """The parameter names to freeze. ``names`` are the whole model's (for a classifier,
    ``bert.encoder.layer.3.output.dense.weight`` and ``classifier.weight``); the encoder's are
    those under ``base_prefix`` (the model's ``base_model_prefix``), the rest are the head,
    which always trains. Feature extraction freezes the whole encoder; ``freeze_layers`` N its
    embeddings and blocks 0..N-1. Raises ValueError when the model cannot be frozen as asked."""
    names = list(names)
    if not feature_extraction and freeze_layers == 0:
        return set()
    encoder = [n for n in names if n.startswith(base_prefix + ".")]
    if not encoder:
        raise ValueError(f"no encoder parameters under {base_prefix!r}: this architecture cannot be frozen by tuneloop")
    if len(encoder) == len(names):
        raise ValueError("the model has no head outside its encoder: freezing would leave nothing to train")
    if feature_extraction:
        return set(encoder)
    blocks = {int(m.group(1)) for n in encoder if (m := _BLOCK.search(n[len(base_prefix) + 1:]))}
    if not blocks:
        raise ValueError(f"freeze_layers {freeze_layers}: the encoder under {base_prefix!r} has no numbered layers "
                         "of its own to freeze (ALBERT, for one, shares one layer's weights among all of them); "
                         "use feature_extraction to freeze the whole encoder")
    if freeze_layers > len(blocks):
        raise ValueError(f"freeze_layers {freeze_layers} exceeds the model's {len(blocks)} encoder layers "
                         "(use feature_extraction to freeze the whole encoder)")
    frozen = set()
    for name in encoder:
        inner = name[len(base_prefix) + 1:]
        block = _BLOCK.search(inner)
        feeds_blocks = _EMBEDDING.search(inner) or _SHARED_INPUT.search(f"{base_prefix}.{inner}")
        if (block and int(block.group(1)) < freeze_layers) or (not block and feeds_blocks):
            frozen.add(name)
    return frozen


# A dropout probability in a Hugging Face config: a key naming dropout (or GPT-2's "pdrop")
# whose value is a number, or None (BERT's classifier_dropout: "use hidden_dropout_prob").
# A fixed list of keys missed ModernBERT's embedding_dropout and mlp_dropout and DeBERTa's
# pooler_dropout, which kept the checkpoint's values without a word.
_DROPOUT_KEY = re.compile(r"dropout|pdrop")


def dropout_overrides(config: dict[str, Any], dropout: float | None) -> dict[str, float]:
    """The ``from_pretrained`` keyword arguments that set every dropout the model's
    ``config`` (its ``to_dict()``) has to ``dropout``; nothing when it is None (the
    checkpoint's own values stay)."""
    if dropout is None:
        return {}
    return {key: dropout for key, value in config.items() if _DROPOUT_KEY.search(key)
            and (value is None or (isinstance(value, int | float) and not isinstance(value, bool)))}


def worker_rows(rows: int, world: int) -> int:
    """Rows each worker trains on an epoch: an equal share, rounded up, so every worker
    takes the same number of steps (their gradients meet in an all-reduce at each one) and
    no row is left out; the last shares wrap around to the first rows (fewer than ``world``
    rows train twice an epoch), as torch's DistributedSampler pads."""
    return -(-rows // world)


def optimizer_steps(train_rows: int, micro_batch_size: int, world_size: int, accumulation: int,
                    epochs: int, max_steps: int | None) -> tuple[int, int]:
    """(accumulation to use, total optimizer steps). Each worker gets an equal share of the
    rows and takes ceil(share / batch) micro-batches an epoch; DeepSpeed steps the optimizer
    at every ``accumulation``-th micro-batch across epochs, and never for a partial group at
    the end, so a job with fewer micro-batches than ``accumulation`` accumulates them all
    (else it would never step)."""
    micro = max(1, math.ceil(worker_rows(train_rows, world_size) / micro_batch_size)) * epochs
    accumulation = min(accumulation, micro)
    total = micro // accumulation
    return accumulation, min(total, max_steps) if max_steps else total


def head_order(checkpoint_labels: list[str] | None, head: list[str]) -> list[int] | None:
    """The rows of a checkpoint's output layer in ``head``'s order, when the checkpoint already
    has a head for the same labels in another order (names compared case-insensitively: a
    hub model's ``B-PER`` is tuneloop's ``B-PER``); None when its rows already line up, or when
    its labels are not these (generic ``LABEL_0``, another label set: the head is new)."""
    if not checkpoint_labels or len(checkpoint_labels) != len(head):
        return None
    index = {str(label).lower(): i for i, label in enumerate(checkpoint_labels)}
    if len(index) != len(head) or any(label.lower() not in index for label in head):
        return None
    order = [index[label.lower()] for label in head]
    return None if order == list(range(len(head))) else order


def inherited_rows(checkpoint_labels: list[str] | None, head: list[str]) -> list[int | None] | None:
    """For a head with labels the checkpoint's lacks (labels added to a model that has
    versions): each head label's row in the checkpoint's output layer, None for a new one;
    None when the checkpoint's labels are not all in the head (a base encoder's LABEL_0,
    another label set), or when they are all of it (``head_order``'s case). Names compared
    case-insensitively, as there."""
    if not checkpoint_labels or len(checkpoint_labels) >= len(head):
        return None
    index = {str(label).lower(): i for i, label in enumerate(checkpoint_labels)}
    wanted = {label.lower() for label in head}
    if len(index) != len(checkpoint_labels) or not index.keys() <= wanted:
        return None
    return [index.get(label.lower()) for label in head]


def student_layers(teacher_layers: int, keep: int) -> list[int]:
    """Which of a teacher's encoder layers a student made from it keeps: ``keep`` of them,
    spread evenly from the first to the last (the last feeds the head the teacher was
    fine-tuned with). DistilBERT initialised its student the same way, one layer of two."""
    if not 1 <= keep <= teacher_layers:
        raise ValueError(f"distill.student_layers {keep} must be between 1 and the teacher's {teacher_layers} layers")
    if keep == 1:
        return [teacher_layers - 1]
    return sorted({round(i * (teacher_layers - 1) / (keep - 1)) for i in range(keep)})


def eta(elapsed_s: float, steps_done: int, total_steps: int) -> str:
    """``", ETA 1m05s"`` for the steps left at the pace so far (evaluations included), or
    ``""`` before the first step or after the last."""
    if steps_done <= 0 or steps_done >= total_steps:
        return ""
    left = round(elapsed_s / steps_done * (total_steps - steps_done))
    return f", ETA {left // 60}m{left % 60:02d}s" if left >= 60 else f", ETA {left}s"


@dataclass
class EarlyStopping:
    """Stop when the monitored loss has not fallen by more than ``min_delta`` for
    ``patience`` epochs in a row; ``best_epoch`` is the one whose weights to keep.
    A ``patience`` of None never stops (but still tracks the best epoch)."""

    patience: int | None
    min_delta: float = 0.0
    best: float = math.inf
    best_epoch: int = -1
    epochs_without_gain: int = 0

    def update(self, epoch: int, loss: float) -> bool:
        """Record an epoch's loss; True when it is the best so far. A non-finite loss is
        never best."""
        if math.isfinite(loss) and loss < self.best - self.min_delta:
            self.best, self.best_epoch, self.epochs_without_gain = loss, epoch, 0
            return True
        self.epochs_without_gain += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.epochs_without_gain >= self.patience


STARTUP_MARKS = ("loop_started", "model_loaded", "engine_ready", "first_batch")
STARTUP_PARTS = ("workers", "model_load", "deepspeed", "first_batch")


def startup_parts(run_started: float, marks: dict[str, float | None]) -> dict[str, float] | None:
    """A run's start-up split at the marks its rank-0 worker took (wall clocks, seconds):
    ``workers`` from the run's start to the loop's first line (Ray Train's controller, the
    placement group, the worker processes, the process group), ``model_load`` (imports,
    tokenizer and weights), ``deepspeed`` (``deepspeed.initialize``, and the layers frozen)
    and ``first_batch`` (the job's tables read from the object store, and cut in windows where
    the task reads texts so; the evaluation sets tokenized; the first batch cut). None when a
    mark is missing: no batch came."""
    times = [run_started, *(marks.get(m) for m in STARTUP_MARKS)]
    if any(t is None for t in times):
        return None
    return {part: round(max(0.0, end - start), 2) for part, start, end in zip(STARTUP_PARTS, times, times[1:])}


def training_speed(epochs: list[tuple[int, float]], startup: dict[str, float] | None) -> dict[str, Any]:
    """A job's speed, for its manifest: samples/s of each epoch (its rows, all workers', and
    its seconds), the steady state over the epochs after the first (which pays the warm-up:
    first allocations, the data pipeline's start), or the only epoch's, and the start-up
    (the run's start to its first batch) whole and in the parts of ``startup_parts``."""
    rates = [round(rows / seconds, 2) if seconds > 0 else None for rows, seconds in epochs]
    steady = epochs[1:] or epochs
    seconds = sum(s for _, s in steady)
    return {
        "startup_s": None if startup is None else round(sum(startup.values()), 2),
        "startup_parts": startup,
        "epoch_samples_per_s": rates,
        "steady_samples_per_s": round(sum(r for r, _ in steady) / seconds, 2) if seconds > 0 else None,
    }
