"""What one retrain costs as the feedback history grows: the same fresh batch on top of 1k,
10k and 100k stored records, under tuneloop's replay policy and under training on everything
(the behaviour before replay), measured in the same run.

    .venv/bin/python benchmarks/retrain_cost.py [--sizes 1000 10000 100000] [--fresh 200]

For each history size, a fresh storage root holds that many feedback records already trained
on by production (v1): Parquet files in the feedback layout, spread over the 30 days before
today, and a v1 whose manifest's watermark is the newest of them and whose reservoir is a
uniform sample of them (``reservoir_size``; all of them for the everything policy). Then
``--fresh`` new records arrive through the feedback journal and one job runs through
``run_training`` (Ray Train + DeepSpeed, the gate, the registry), timed end to end. The
closed days' small files are merged into one per day before it, timed apart: a real history
was merged by earlier jobs, one day at a time (``FeedbackStore.merge_closed_days``). The
model is a tiny random-init BERT (tests/tiny_models.py), so the time is what the data costs:
reading, sampling, shipping rows to the workers and training on them.

Prints a markdown table: job seconds per size and policy, and each as a ratio to the 1k
job of the same policy. The issue's target: replay's job at 100k within 1.2x its job at 1k.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import shutil
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402
import ray  # noqa: E402

from tests.tiny_models import build_tiny_model  # noqa: E402
from tuneloop.core.config import TuneloopConfig, parse_config  # noqa: E402
from tuneloop.core.tasks import model_tasks  # noqa: E402
from tuneloop.store.feedback_store import FeedbackStore  # noqa: E402
from tuneloop.store.records import feedback_schema
from tuneloop.store.manifest import Manifest  # noqa: E402
from tuneloop.store.registry import Registry  # noqa: E402
from tuneloop.store.storage import Storage  # noqa: E402
from tuneloop.training.job_data import row_schema  # noqa: E402
from tuneloop.training.launcher import run_training  # noqa: E402

MODEL = "sentiment"
LABELS = ["negative", "positive"]
POLICIES = {
    "replay": {"replay_ratio": 1.0},
    "everything": {"replay_ratio": 10**9, "max_rows_per_job": 10**7, "reservoir_size": 10**7},
}
_started = time.perf_counter()


def progress(message: str) -> None:
    print(f"[{time.perf_counter() - _started:7.1f}s] {message}", file=sys.stderr, flush=True)


def config(root: Path, weights: str, seed: Path, **training) -> TuneloopConfig:
    return parse_config({
        "models": [{"name": MODEL, "base_model": weights, "labels": LABELS, "seed_dataset": str(seed)}],
        "storage": {"root": str(root)},
        "auth": {"create_admin_key": False},
        "training": {"epochs": 1, "num_workers": 2, "batch_size": 32, "max_length": 32, "seed": 0, **training},
    })


def history(cfg: TuneloopConfig, size: int, reservoir_size: int, weights: str) -> None:
    """``size`` records trained on by v1, in daily Parquet files over the last 30 days, and v1."""
    storage = Storage(cfg.storage.root)
    task = model_tasks(cfg.models)[MODEL]
    rng = random.Random(size)
    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(days=30)
    rows = []
    for i in range(size):
        at = start + timedelta(seconds=i * (29 * 86_400 / size))  # all before today
        label = LABELS[rng.randrange(2)]
        rows.append({"feedback_id": uuid.uuid4().hex, "prediction_id": None, "model": MODEL, "version": None,
                     "text": f"stored feedback number {i} which was {'great' if label == 'positive' else 'awful'}",
                     "predicted_at": None, "created_at": at, "key_id": None, "idempotency_key": None,
                     "predicted_label": None, "label": label})
    by_day: dict[str, list[dict]] = {}
    for r in rows:
        by_day.setdefault(r["created_at"].date().isoformat(), []).append(r)
    for day, part in by_day.items():  # compaction writes one file per journal segment: ~50 a day
        for k in range(0, len(part), max(1, len(part) // 50)):
            chunk = part[k:k + max(1, len(part) // 50)]
            storage.write_parquet_atomic(f"feedback/{MODEL}/date={day}/{uuid.uuid4().hex}.parquet",
                                         pa.Table.from_pylist(chunk, schema=feedback_schema(task)))
    kept = rng.sample(rows, min(reservoir_size, len(rows)))
    reservoir = pa.Table.from_pylist([{**r, "source": "feedback"} for r in kept], schema=row_schema(task))
    newest = rows[-1]
    registry = Registry(storage)
    manifest = Manifest(version="pending", model=MODEL, parent=None, base_model=weights, task=task.name,
                        labels=LABELS, data={"watermark": {"created_at": newest["created_at"].isoformat(),
                                                           "feedback_id": newest["feedback_id"]},
                                             "reservoir": {"rows": len(kept), "seen": size}})
    registry.promote(MODEL, registry.publish(MODEL, weights, manifest, tables={"reservoir": reservoir}).version,
                     reason="benchmark")


def fresh_batch(cfg: TuneloopConfig, n: int) -> None:
    store = FeedbackStore(Storage(cfg.storage.root), cfg.storage.journal_path(), model_tasks(cfg.models))
    store.open_writer()
    try:
        for i in range(n):
            label = LABELS[i % 2]
            store.append(model=MODEL, text=f"fresh feedback {i}: it was {'lovely' if i % 2 else 'dreadful'}",
                         label=label)
        store.compact()
    finally:
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    ap.add_argument("--fresh", type=int, default=200)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix=".retrain-cost-", dir=ROOT))
    results: dict[tuple[str, int], tuple[float, int]] = {}
    merges: dict[tuple[str, int], tuple[float, int, int]] = {}  # seconds, files before, files after
    try:
        weights = build_tiny_model(work / "tiny", LABELS)
        seed = work / "seed.tsv"
        seed.write_text("text\tlabel\n" + "".join(f"seed sentence {i} was {'good' if i % 2 else 'bad'}\t"
                                                  f"{LABELS[i % 2]}\n" for i in range(200)))
        ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        # A first job pays for starting Ray Train and importing DeepSpeed in the workers:
        # run one, untimed, so that the 1k job is not the only one that pays.
        progress("warm-up job (not timed)…")
        warm = config(work / "warm-up", weights, seed)
        with contextlib.redirect_stdout(sys.stderr):
            run_training(warm, MODEL, trigger="benchmark")
        for size in args.sizes:
            for policy, keys in POLICIES.items():
                cfg = config(work / f"{policy}-{size}", weights, seed, **keys)
                history(cfg, size, cfg.training.reservoir_size, weights)
                # The closed days' small files are merged once, by the first job after each day
                # closes; the earlier jobs of a real history did that: merge here, timed apart.
                t0 = time.perf_counter()
                store = FeedbackStore(Storage(cfg.storage.root), cfg.storage.journal_path(), model_tasks(cfg.models))
                files_before = len(store.files(MODEL))
                store.merge_closed_days(MODEL)
                merges[(policy, size)] = (time.perf_counter() - t0, files_before, len(store.files(MODEL)))
                fresh_batch(cfg, args.fresh)
                progress(f"{policy}, {size:,} stored records: training on {args.fresh} fresh…")
                t0 = time.perf_counter()
                with contextlib.redirect_stdout(sys.stderr):
                    outcome = run_training(cfg, MODEL, trigger="benchmark")
                seconds = time.perf_counter() - t0
                if outcome.manifest is None:
                    raise SystemExit(f"{policy} at {size}: the job failed: {outcome.job.error}")
                results[(policy, size)] = (seconds, outcome.manifest.data["train_rows"])
                progress(f"{policy}, {size:,}: {seconds:.1f} s, {outcome.manifest.data['train_rows']:,} rows")
                shutil.rmtree(work / f"{policy}-{size}", ignore_errors=True)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    print("| stored records | policy | rows trained | job s | × its 1k job |")
    print("| ---: | --- | ---: | ---: | ---: |")
    first = args.sizes[0]
    for size in args.sizes:
        for policy in POLICIES:
            seconds, rows = results[(policy, size)]
            print(f"| {size:,} | {policy} | {rows:,} | {seconds:.1f} | {seconds / results[(policy, first)][0]:.2f} |")
    print("\nMerging the closed days' small files, once per day (not in the job times above):\n")
    print("| stored records | files | after merging | merge s |")
    print("| ---: | ---: | ---: | ---: |")
    for size in args.sizes:
        seconds, before, after = merges[("replay", size)]
        print(f"| {size:,} | {before:,} | {after:,} | {seconds:.2f} |")
    ratio = results[("replay", args.sizes[-1])][0] / results[("replay", first)][0]
    print(f"\nreplay at {args.sizes[-1]:,} / at {first:,}: {ratio:.2f}x (target <= 1.2x): "
          f"{'met' if ratio <= 1.2 else 'NOT met'}")


if __name__ == "__main__":
    main()
