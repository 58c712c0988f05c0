"""Feedback by prediction id: ``PredictionLog.lookup`` against the scan it replaced (read every
file of the id's date folder with a filter), on a quiet day's log and a busy one, measured in
the same run on the same files.

    .venv/bin/python benchmarks/lookup_bench.py [--small 10] [--large 1000000] [--rows-per-file 100]

The logs are written by ``PredictionLog.append`` (so in the layout production writes) into a
temporary folder beside the default storage, on the disk it would use. A quiet day's rows come
one per flush file; a busy day's come ``--rows-per-file`` to a file, spread evenly over the
day. Replicas flush every second, so a million predictions a day really make ~86,400 files of
~12 rows: ``--rows-per-file 12`` builds that (slower to build, and the old scan takes seconds
per lookup), the default 100 builds an eighth of the files. Prints a markdown table of p50/p99
per method; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import math
import os
import posixpath
import random
import secrets
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.percentiles import percentile  # noqa: E402
from tuneloop.core.tasks import make_task  # noqa: E402
from tuneloop.store.records import PredictionLog, prediction_schema, prediction_time  # noqa: E402
from tuneloop.store.storage import Storage  # noqa: E402

MODEL = "bench"
DAY = datetime(2026, 6, 15, tzinfo=UTC)
ROW_SPACING = timedelta(milliseconds=10)  # rows within one flush file: a ~1 s flush at 100 rows
_started = time.perf_counter()


TASKS = {MODEL: make_task("text-classification", ["negative", "positive"])}

def progress(message: str) -> None:
    print(f"[{time.perf_counter() - _started:7.1f}s] {message}", file=sys.stderr, flush=True)


class _UnsyncedStorage(Storage):
    """Builds the test log: the same files in the same places, without an fsync per file
    (they only need to exist; fsyncing 10,000 files would be most of the build)."""

    def write_parquet_atomic(self, rel: str, table: pa.Table) -> None:
        self.fs.create_dir(posixpath.dirname(self.path(rel)), recursive=True)
        pq.write_table(table, self.path(rel), filesystem=self.fs, compression="zstd")


def build(root: Path, rows: int, rows_per_file: int, sample: int, rng: random.Random) -> tuple[int, list[str]]:
    """Write a day of ``rows`` predictions; returns the number of files and ``sample`` of the ids."""
    log = PredictionLog(_UnsyncedStorage(str(root)), TASKS)
    files = math.ceil(rows / rows_per_file)
    wanted = set(rng.sample(range(rows), min(sample, rows)))
    ids: list[str] = []
    written, step = 0, max(1, files // 10)
    for k in range(files):
        start = DAY + timedelta(seconds=(k + 0.5) * 86_400 / files)
        batch = []
        for i in range(min(rows_per_file, rows - written)):
            at = start + i * ROW_SPACING
            pid = f"{int(at.timestamp() * 1000):012x}{secrets.token_hex(10)}"  # as new_prediction_id(at)
            if written + i in wanted:
                ids.append(pid)
            batch.append({"prediction_id": pid, "model": MODEL, "version": "v1",
                          "text": f"served text number {written + i}, about as long as a short review",
                          "label": "positive", "score": 0.9, "scores": {"negative": 0.1, "positive": 0.9},
                          "created_at": at})
        log.append(MODEL, batch)
        written += len(batch)
        if (k + 1) % step == 0 or k + 1 == files:
            progress(f"  {rows:,} rows: {k + 1:,}/{files:,} files written")
    on_disk = len(Storage(str(root)).list_files(f"predictions/{MODEL}", ".parquet"))
    return on_disk, ids


def unknown_ids(n: int, rng: random.Random) -> list[str]:
    """Ids of the same day that were never logged (a typo, or a prediction sampled out)."""
    out = []
    for _ in range(n):
        ms = int(DAY.timestamp() * 1000) + rng.randrange(86_400_000)
        out.append(f"{ms:012x}{rng.getrandbits(80):020x}")
    return out


def old_scan(storage: Storage, prediction_id: str) -> dict | None:
    """The lookup before hour and minute folders: every file below the id's date folder, read
    with a filter."""
    when = prediction_time(prediction_id)
    files = storage.list_files(f"predictions/{MODEL}/date={when:%Y-%m-%d}", ".parquet")
    table = pads.dataset([storage.path(f) for f in files], schema=prediction_schema(TASKS[MODEL]), format="parquet",
                         filesystem=storage.fs).to_table(filter=pc.field("prediction_id") == prediction_id)
    return table.slice(0, 1).to_pylist()[0] if table.num_rows else None


def measure(lookup, ids: list[str], expect_found: bool) -> tuple[float, float]:
    """p50 and p99 in ms; checks every answer, so a fast wrong lookup cannot pass."""
    times = []
    for pid in ids:
        t0 = time.perf_counter()
        row = lookup(pid)
        times.append(time.perf_counter() - t0)
        if expect_found and (row is None or row["prediction_id"] != pid):
            raise SystemExit(f"lookup missed {pid}")
        if not expect_found and row is not None:
            raise SystemExit(f"lookup found the unknown id {pid}")
    times.sort()
    return percentile(times, 0.5) * 1e3, percentile(times, 0.99) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--small", type=int, default=10, help="predictions on the quiet day (one per file)")
    ap.add_argument("--large", type=int, default=1_000_000, help="predictions on the busy day")
    ap.add_argument("--rows-per-file", type=int, default=100, help="rows per flush file on the busy day")
    ap.add_argument("--lookups", type=int, default=500, help="timed lookups of logged ids, per case")
    ap.add_argument("--unknown", type=int, default=100, help="timed lookups of ids never logged, per case")
    ap.add_argument("--old-lookups", type=int, default=5,
                    help="timed lookups with the old scan on the busy day (each reads the whole day)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix=".lookup-bench-", dir=ROOT))
    try:
        results = run(work, args, rng)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(results, args)


def run(work: Path, args, rng: random.Random) -> dict:
    results = {"load before": os.getloadavg()[0]}
    for case, rows, per_file in (("small", args.small, 1), ("large", args.large, args.rows_per_file)):
        progress(f"building the {case} day: {rows:,} predictions, {per_file} per file")
        files, ids = build(work / case, rows, per_file, args.lookups, rng)
        os.sync()  # the build's write-back would otherwise land in the first timings
        progress(f"built {files:,} files (synced to disk)")
        storage = Storage(str(work / case))
        log = PredictionLog(storage, TASKS)
        known = [rng.choice(ids) for _ in range(args.lookups)]
        unknown = unknown_ids(args.unknown, rng)
        old_n = args.lookups if case == "small" else args.old_lookups
        new_lookup = lambda pid: log.lookup([MODEL], pid)  # noqa: E731
        old_lookup = lambda pid: old_scan(storage, pid)  # noqa: E731
        for method, fn, limit in (("lookup", new_lookup, None), ("old scan", old_lookup, max(1, old_n))):
            # Each warmed up just before its own timings: an old scan's big reads would leave
            # the allocator returning memory during the next method's first lookups.
            fn(known[0])
            for kind, pool, found in (("logged id", known, True), ("unknown id", unknown, False)):
                sample = pool[:limit]
                progress(f"  {case}: {method}, {len(sample)} {kind}s")
                p50, p99 = measure(fn, sample, found)
                results[(case, method, kind)] = (rows, files, len(sample), p50, p99)
    results["load after"] = os.getloadavg()[0]
    return results


def report(results: dict, args) -> None:
    per_second = max(1, round(args.large / 86_400))
    print(f"Busy day: {args.large:,} predictions in files of {args.rows_per_file} rows; one replica flushing "
          f"every second at that traffic writes files of ~{per_second} rows.")
    print("Ratios (p50 / p99) compare with the same method and id kind on the quiet day, and with the old "
          "scan on the same day; with under 100 lookups p99 is the slowest one.")
    print(f"Load average (1 min) on this machine: {results['load before']:.2f} before, "
          f"{results['load after']:.2f} after ({os.cpu_count()} CPUs).\n")
    print("| rows logged | files | method | ids | lookups | p50 ms | p99 ms | × quiet day | × old scan |")
    print("| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for case in ("small", "large"):
        for method in ("lookup", "old scan"):
            for kind in ("logged id", "unknown id"):
                rows, files, n, p50, p99 = results[(case, method, kind)]
                quiet, old = results[("small", method, kind)], results[(case, "old scan", kind)]
                print(f"| {rows:,} | {files:,} | {method} | {kind} | {n} | {p50:.2f} | {p99:.2f} "
                      f"| {p50 / quiet[3]:.2f} / {p99 / quiet[4]:.2f} | {p50 / old[3]:.4f} / {p99 / old[4]:.4f} |")


if __name__ == "__main__":
    main()
