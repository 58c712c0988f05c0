"""The Ray Train worker: fine-tune with DeepSpeed, evaluate, export one consolidated HF checkpoint.

Runs once per worker inside a TorchTrainer, which has already set up torch.distributed
(gloo on CPU, nccl on GPU); deepspeed.initialize joins that process group.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from tuneloop.core.tasks import make_task
from tuneloop.store.jobs import JobLost, JobStore
from tuneloop.store.storage import Storage
from tuneloop.training.collectives import consolidated_state_dict, from_rank_zero, on_every_rank, without_shm_all_reduce
from tuneloop.training.deepspeed_config import build_deepspeed_config, lr_multiplier, warmup_steps
from tuneloop.training.distill import TEACHER_COLUMN, distillation_loss, keep_layers
from tuneloop.training.evaluation import Evaluator, summary
from tuneloop.training.job_data import LABELLED_COLUMN
from tuneloop.training.length_passes import batch_loss, passes_of, targets_counted
from tuneloop.training.model_files import ModelFiles, load_for_training
from tuneloop.training.model_inputs import encode_batch, fit_to_positions, target_tensor, token_lengths, with_pad_token
from tuneloop.training.recipe import (
    EarlyStopping,
    eta,
    frozen_parameters,
    optimizer_steps,
    resolve_precision,
    student_layers,
    worker_rows,
    zero_stage_to_run,
)
from tuneloop.training.shards import epoch_batches

PROGRESS_EVERY_S = 30.0  # a line within an epoch this often: a one-epoch job showed none until it ended


def _log(rank: int, msg: str) -> None:
    # Not print(): Ray Train sends a worker's print() both to its logger and to the stream
    # it wraps, so every line reached the console twice.
    if rank == 0:
        sys.stdout.write(f"[tuneloop train] {msg}\n")
        sys.stdout.flush()


def _param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and LayerNorm weights, as in BERT's recipe."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or name.endswith(".bias") else decay).append(p)
    # An empty group is left out: DeepSpeed's ZeRO 1/2 read each group's first parameter, and a
    # frozen GPT-2 (its score head has no bias) had no parameter without decay.
    return [group for group in ({"params": decay, "weight_decay": weight_decay},
                                {"params": no_decay, "weight_decay": 0.0}) if group["params"]]


def _training_loss(out, target):
    """The head's own loss of a micro-batch, or a zero through its logits where no token of
    the batch is tagged (token windows of texts whose tokens are all special: combining marks
    an uncased tokenizer strips). The head's mean over no token is NaN; its gradients are
    zeros, but the epoch's logged loss read NaN from that batch on."""
    untagged = not target.dtype.is_floating_point and target.dim() > 1 and bool((target == -100).all())
    return out.logits.sum() * 0.0 if untagged else out.loss


def _freeze(model, tcfg: dict[str, Any], rank: int, keep_fp32_copy: bool) -> tuple[set[str], dict[str, Any]]:
    """Freeze what the config asks (``recipe.frozen_parameters``); returns the frozen names,
    and their fp32 weights on rank 0 when half-precision training will round them."""
    names = frozen_parameters([n for n, _ in model.named_parameters()], model.base_model_prefix,
                              tcfg["freeze_layers"], tcfg["feature_extraction"])
    copies: dict[str, Any] = {}
    for name, param in model.named_parameters():
        if name in names:
            param.requires_grad_(False)
            if keep_fp32_copy and rank == 0:
                copies[name] = param.detach().to("cpu", copy=True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if names:
        _log(rank, f"froze {len(names)} parameter tensors: training {trainable:,} of {total:,} weights")
    return names, copies


def _job_check(job: dict[str, Any], rank: int) -> Callable[[], None]:
    """What a worker calls after every step: it raises JobLost once the job's record no
    longer says running (marked lost: its heartbeats stopped reaching storage, and the model's
    next job may be waiting for these workers' GPUs). A thread reads the record every
    ``check_every_s``, so a slow read (an object store's retries) never holds a step; each
    worker reads for itself, and the others, waiting at the next collective, end with the
    run when Ray Train stops the group. A record that cannot be read, or is not there, is
    said once and trains on: only one that says otherwise stops the job."""
    jobs, job_id = JobStore(Storage(job["storage"])), job["job_id"]
    lost: list[JobLost] = []
    said: set[str] = set()

    def read() -> None:
        while not lost:
            time.sleep(job["check_every_s"])
            try:
                record = jobs.stored(job_id)  # staleness is the driver's and controller's to judge, on their clocks
                if record is None:
                    raise FileNotFoundError(f"no record of job {job_id} under {job['storage']}")
                if record.state != "running":
                    jobs.check_still_running(job_id)  # raises JobLost, saying what the record says
            except JobLost as e:
                lost.append(e)
            except Exception as e:  # noqa: BLE001 - storage out of reach a moment: read again next time
                if type(e).__name__ not in said:
                    said.add(type(e).__name__)
                    _log(rank, f"could not read the job's record ({type(e).__name__}: {e}); training goes on")

    threading.Thread(target=read, name="tuneloop-job-check", daemon=True).start()

    def check() -> None:
        if lost:
            raise lost[0]

    return check


def train_loop_per_worker(config: dict[str, Any]) -> None:
    marks = {"loop_started": time.time()}  # the start-up's parts (recipe.startup_parts), wall clocks
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if config["use_gpu"] else "cpu")
    import deepspeed
    import pyarrow as pa
    import ray.train
    import ray.train.torch
    import torch
    import transformers

    if not config["use_gpu"]:
        without_shm_all_reduce()
    # Its info lines (the engine's set-up, step by step) are not an operator's; warnings go too.
    deepspeed.utils.logger.setLevel(logging.ERROR)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"])
    task = make_task(config["task"], config["labels"], **config.get("task_options", {}))
    max_length: int = config["max_length"]
    batch_size: int = config["batch_size"]
    bf16 = config["use_gpu"] and torch.cuda.is_bf16_supported(including_emulation=False)
    precision = resolve_precision(config["precision"], config["use_gpu"],
                                  on_every_rank(bf16, ray.train.torch.get_device()))

    init_path = ModelFiles(**config["init_files"]).local_path()  # on this worker's node
    tokenizer = transformers.AutoTokenizer.from_pretrained(init_path)
    model, new_rows = load_for_training(init_path, task, config["dropout"])
    if padded := with_pad_token(tokenizer, model):
        _log(rank, padded)
    max_length, capped = fit_to_positions(tokenizer, model, max_length)
    if capped:
        _log(rank, capped)
    distill = config.get("distill")
    if distill and distill["student_layers"]:  # a student's v1, made from its teacher
        total = model.config.num_hidden_layers
        kept = student_layers(total, distill["student_layers"])
        keep_layers(model, kept)
        _log(rank, f"student: layers {kept} of the teacher's {total}")
    marks["model_loaded"] = time.time()
    frozen, frozen_fp32 = _freeze(model, config, rank, keep_fp32_copy=precision != "fp32")
    zero_stage = zero_stage_to_run(config["zero_stage"], world, precision)
    if zero_stage != config["zero_stage"]:
        why = ("partitions nothing on one worker" if zero_stage == 0 else
               f"keeps no fp32 master weights to export in {precision}")
        _log(rank, f"ZeRO-{config['zero_stage']} {why}: training at stage {zero_stage}")
    # The job's tables, from the object store (zero-copy): train is split, each worker scores
    # all of every evaluation set (shards.py says why not Ray Data). A long text trains in
    # serving's windows, a row each (the same rows on every worker: they split them evenly).
    data_started = time.time()
    tables = {name: ray.get(ref) for name, ref in config["tables"].items()}
    train = tables.pop("train")
    rows = train.to_pydict()
    windowed = task.window_rows(tokenizer, rows, max_length)
    if windowed is not rows:
        _log(rank, f"{train.num_rows} texts train in {len(windowed['text'])} windows of {max_length} tokens")
        train = pa.Table.from_pydict(windowed, schema=train.schema)
    data_s = time.time() - data_started  # start-up's first_batch, not deepspeed (recipe.startup_parts)
    accumulation, total_steps = optimizer_steps(train.num_rows, batch_size, world,
                                                config["gradient_accumulation_steps"], config["epochs"],
                                                config.get("max_steps"))
    ds_config = build_deepspeed_config(
        zero_stage=zero_stage,
        micro_batch_size=batch_size,
        world_size=world,
        learning_rate=config["learning_rate"],
        weight_decay=config["weight_decay"],
        use_gpu=config["use_gpu"],
        precision=precision,
        gradient_accumulation_steps=accumulation,
    )
    warmup = warmup_steps(total_steps, config["warmup_ratio"])
    # DeepSpeed steps the scheduler after each optimizer step it applied, and the loop after
    # one it skipped; LambdaLR sets step k's rate to the configured one x lr_multiplier(k).
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=_param_groups(model, config["weight_decay"]), config=ds_config,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_multiplier(step, total_steps, warmup)),
    )
    marks["engine_ready"] = time.time() - data_s
    # Each micro-batch in passes by length (length_passes.py): on a CPU, right padding only
    # (cutting a left-padded pass would cut real tokens), and not where ZeRO-3 partitions the
    # weights among workers: each forward gathers them from every worker, and workers whose
    # micro-batches cut into different numbers of passes would wait on each other's gathers.
    by_length = config.get("passes_by_length", True) and torch.device(engine.device).type == "cpu" \
        and tokenizer.padding_side == "right" and not (zero_stage == 3 and world > 1)
    # Of the rows there are: a job of 4 rows said "steps of 32 rows", the configured batch. A
    # worker's micro-batch holds at most its share (rounded up: shares wrap round).
    per_step = min(batch_size, worker_rows(train.num_rows, world)) * world * accumulation
    _log(rank, f"{precision} on {engine.device}, {world} worker(s) of {torch.get_num_threads()} thread(s), "
               f"{total_steps} optimizer steps of {per_step} rows"
               + (", each micro-batch in passes by length" if by_length else "")
               + (f" (gradient_accumulation_steps {config['gradient_accumulation_steps']} held to the "
                  f"{accumulation} micro-batches a worker has over all epochs)"
                  if accumulation < config["gradient_accumulation_steps"] else ""))
    lengths = token_lengths(tokenizer, train, max_length) if config["group_by_length"] else None
    # The evaluation sets are scored at the serving length (training.max_length may differ:
    # the shipped config trains at 64 and serves at 128), within what the model takes.
    eval_length = min(config.get("eval_max_length", max_length), tokenizer.model_max_length)
    evaluate = Evaluator(engine, tokenizer, tables, eval_length, task)

    parent_eval = None
    if config["has_parent"]:
        # The starting weights are production's: score them on the same evaluation rows, as
        # production answers (never a label added since: it has no such row).
        if new_rows:
            _log(rank, f"labels added since production: {[task.head_labels()[i] for i in new_rows]} "
                       "(production's rows for the others are kept)")
        parent_eval = evaluate(masked=new_rows)
        _log(rank, "production baseline: " + summary(parent_eval))

    # Early stopping watches the loss on its validation rows (fresh feedback just before the
    # gate's, never the gate's own; at v1 a share of the seed), or, at a v1 whose seed was too
    # small to spare one, on the golden set (v1 has no production for the gate to compare with).
    monitor = "validation" if "validation" in tables else None
    stops_early = config["early_stopping_patience"] is not None and config["epochs"] > 1
    if monitor is None and not config["has_parent"] and "golden" in tables:
        monitor = "golden"
        if stops_early:  # said: the gate reads the golden set too
            _log(rank, "early stopping watches the golden set's loss: no validation rows (eval_fraction 0, or a "
                       "seed too small to spare them)")
    stopping = EarlyStopping(config["early_stopping_patience"], config["early_stopping_min_delta"])
    per_epoch = monitor is not None and stops_early
    if monitor is None and stops_early:
        _log(rank, "early stopping is off for this job: no validation rows (too little fresh feedback"
                   + ("; the golden set is the gate's)" if config["has_parent"] else ", and no golden set)"))
    still_running = _job_check(config["job"], rank)
    best: tuple[dict[str, Any], dict[str, Any]] | None = None  # (evaluation, weights) of the best epoch
    epochs_run, applied, applied_at_last_check, started = 0, 0, 0, time.perf_counter()
    last_line = started
    epoch_times: list[list[float]] = []  # [rows of all workers, seconds] per epoch
    # from_pretrained leaves a model in eval mode and deepspeed.initialize keeps it so: a job
    # that scored nothing first (v1 without early stopping) trained with dropout off, and one
    # with early stopping had it off for its first epoch only.
    engine.train()
    for epoch in range(config["epochs"]):
        t0, seen, loss_sum, batches = time.perf_counter(), 0, 0.0, 0
        for batch in epoch_batches(train, epoch, batch_size, config["seed"], rank, world, lengths):
            if "first_batch" not in marks:  # less production's baseline scoring: evaluation, not start-up
                marks["first_batch"] = time.time() - evaluate.seconds
            # A long text in windows where its task reads it so: cut at max_length, the
            # entities past the cut (a correction late in a feedback text) never trained.
            inputs, encoding, windows = encode_batch(tokenizer, batch, max_length, engine.device, task)
            target = target_tensor(task.batch_targets(windows, encoding), task, engine.device)
            if distill:  # its loss takes the hard loss per row: transfer rows have none
                teacher_logits = torch.tensor(windows[TEACHER_COLUMN], dtype=torch.float32, device=engine.device)
                labelled = windows.get(LABELLED_COLUMN)
                labelled = None if labelled is None else torch.tensor(labelled, device=engine.device)

                def loss_of(part, part_target, index):  # the mean over the pass's rows
                    rows = slice(None) if index is None else index
                    return (distillation_loss(engine(**part).logits, teacher_logits[rows], part_target,
                                              None if labelled is None else labelled[rows], task,
                                              distill["temperature"], distill["alpha"]), len(part_target))
            else:
                def loss_of(part, part_target, index):
                    return _training_loss(engine(**part, labels=part_target), part_target), targets_counted(part_target)
            loss = batch_loss(inputs, target, passes_of(inputs, by_length), loss_of)
            engine.backward(loss)
            steps_before = engine.global_steps
            engine.step()  # an optimizer step at every accumulation boundary
            if engine.global_steps > steps_before:
                if engine.was_step_applied():
                    applied += 1
                elif engine.lr_scheduler is not None:
                    # Skipped by the loss scale (fp16 overflow; bf16 inf or NaN): DeepSpeed counts it
                    # in global_steps, which end the job, but does not step the schedule, whose
                    # warmup then shifted and whose last rate stayed above 0. The schedule follows.
                    engine.lr_scheduler.step()
            seen += len(batch["text"])
            loss_sum += loss.detach().item()
            batches += 1
            if engine.global_steps >= total_steps:
                break
            still_running()
            if time.perf_counter() - last_line >= PROGRESS_EVERY_S:
                last_line = time.perf_counter()
                _log(rank, f"epoch {epoch + 1}/{config['epochs']} step {engine.global_steps}/{total_steps} "
                           f"loss {loss_sum / batches:.4f}" + eta(last_line - started, engine.global_steps, total_steps))
        epochs_run += 1
        dt = time.perf_counter() - t0
        epoch_times.append([seen * world, dt])
        line = (f"epoch {epoch + 1}/{config['epochs']} step {engine.global_steps}/{total_steps} "
                f"loss {loss_sum / max(1, batches):.4f} {seen * world / max(dt, 1e-9):.1f} samples/s")
        if per_epoch and applied > applied_at_last_check:  # an epoch that updated the weights
            applied_at_last_check = applied
            evaluation = evaluate()
            # Every rank must take the same branch (the weights' gather is collective): rank 0's loss decides.
            loss = from_rank_zero(evaluation[monitor]["loss"], engine.device)
            if stopping.update(epoch, loss):
                best = evaluation, consolidated_state_dict(engine.module, rank, precision, frozen_fp32)
            line += f", {monitor} loss {loss:.4f} (best: " + (
                f"epoch {stopping.best_epoch + 1})" if stopping.best_epoch >= 0 else "none finite yet)")
        _log(rank, line + eta(time.perf_counter() - started, engine.global_steps, total_steps))
        last_line = time.perf_counter()
        if engine.global_steps >= total_steps:
            break
        if per_epoch and stopping.should_stop:
            kept = (f"epoch {stopping.best_epoch + 1}" if stopping.best_epoch >= 0 else
                    "the last epoch's weights (no epoch's loss was finite)")
            _log(rank, f"early stop: no lower {monitor} loss for {stopping.epochs_without_gain} epoch(s); keeping {kept}")
            break

    if best is None:  # not watching epochs (or every loss diverged): the last weights
        best = (evaluate(),
                consolidated_state_dict(engine.module, rank, precision, frozen_fp32))
        stopping.best_epoch = epochs_run - 1
    candidate_eval, state = best
    _log(rank, "candidate: " + summary(candidate_eval))
    report = {
        "candidate": candidate_eval, "parent": parent_eval, "steps": engine.global_steps,
        "evaluation_s": evaluate.seconds, "epochs": epoch_times, "startup_marks": marks,
        "recipe": {"precision": precision, "epochs_run": epochs_run, "best_epoch": stopping.best_epoch + 1,
                   "early_stopped": epochs_run < config["epochs"] and engine.global_steps < total_steps,
                   "monitor": monitor if per_epoch else None, "zero_stage_run": zero_stage,
                   "frozen_tensors": len(frozen), "accumulation": accumulation,
                   "skipped_steps": engine.global_steps - applied},
    }
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            engine.module.save_pretrained(tmp, state_dict=state)
            engine.module.config.dtype = "float32"  # save_pretrained wrote the module's (bf16) dtype
            engine.module.config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(report, checkpoint=checkpoint)
