"""Acknowledging feedback: the journal (append + fsync) against the baseline it replaced,
one fsynced Parquet file per record, measured in the same run on the same disk.

    .venv/bin/python benchmarks/feedback_bench.py [--records 500] [--threads 1,4]

Both are durable on return. Prints records/s, p50/p99 latency per acknowledgement, the ratio
to the baseline, and how long compacting the journal into Parquet took.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.percentiles import percentile  # noqa: E402
from tuneloop.core.tasks import make_task  # noqa: E402
from tuneloop.store.feedback_store import FeedbackStore  # noqa: E402
from tuneloop.store.records import feedback_schema
from tuneloop.store.storage import Storage  # noqa: E402


TASKS = {"bench": make_task("text-classification", ["negative", "positive"])}


def _row(i: int) -> dict:
    return {"feedback_id": uuid.uuid4().hex, "prediction_id": None, "model": "bench", "version": None,
            "text": f"feedback text number {i}, about as long as a review sentence", "predicted_label": None,
            "label": "positive", "predicted_at": None, "created_at": datetime.now(UTC), "key_id": None}


def _per_record_parquet(storage: Storage):
    def write(i: int) -> None:
        row = _row(i)
        storage.write_parquet_atomic(f"feedback/bench/date=x/{row['feedback_id']}.parquet",
                                     pa.Table.from_pylist([row], schema=feedback_schema(TASKS["bench"])))
    return write


def _journal(store: FeedbackStore):
    def write(i: int) -> None:
        store.append(model="bench", text=f"feedback text number {i}, about as long as a review sentence",
                     label="positive")
    return write


def measure(write, records: int, threads: int) -> tuple[float, float, float]:
    """Records/s, p50 and p99 of ``records`` writes over ``threads``, after one untimed write
    per thread (the folder and the journal segment made). A write that raises stops the
    benchmark: a dead worker's records were left out of the rate, and the table printed."""
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    per_thread = records // threads
    for k in range(threads):
        write(records + k)  # warm-up: ids past the timed ones

    def worker(k: int) -> None:
        mine = []
        try:
            for i in range(per_thread):
                t0 = time.perf_counter()
                write(k * per_thread + i)
                mine.append(time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - reported after the join, in the main thread
            errors.append(e)
        with lock:
            latencies.extend(mine)

    start = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise SystemExit(f"{len(errors)} of {threads} writers failed: {errors[0]!r}")
    latencies.sort()
    return len(latencies) / elapsed, percentile(latencies, 0.5), percentile(latencies, 0.99)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=500)
    ap.add_argument("--threads", default="1,4")
    args = ap.parse_args()
    # Beside the default storage (./.tuneloop), on the disk it would use, not a tmpfs.
    work = Path(tempfile.mkdtemp(prefix=".feedback-bench-", dir=ROOT))
    try:
        run(work, args.records, [int(t) for t in args.threads.split(",")])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path, records: int, thread_counts: list[int]) -> None:
    print("| writer | threads | records/s | p50 ms | p99 ms | × baseline |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for threads in thread_counts:
        base = measure(_per_record_parquet(Storage(str(work / f"parquet-{threads}"))), records, threads)
        store = FeedbackStore(Storage(str(work / f"journal-{threads}")), str(work / f"journal-{threads}/wal"), TASKS)
        store.open_writer()
        journal = measure(_journal(store), records, threads)
        t0 = time.perf_counter()
        compacted = store.compact()
        compact_s = time.perf_counter() - t0
        store.close()
        for name, (rate, p50, p99) in (("one Parquet file per record (baseline)", base), ("journal", journal)):
            print(f"| {name} | {threads} | {rate:.0f} | {p50 * 1e3:.2f} | {p99 * 1e3:.2f} | {rate / base[0]:.2f} |")
        print(f"|   (compacting {compacted} journal records into Parquet: {compact_s * 1e3:.0f} ms) | | | | | |")


if __name__ == "__main__":
    main()
