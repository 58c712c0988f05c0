"""The prediction log's writer, off the response path.

A replica hands each served batch's rows to ``record`` (a list append under a lock) and
answers at once; a background thread writes what gathered as one Parquet file every
``flush_interval_s`` and drops date partitions older than ``retention_days``. A fraction
``sample_rate`` of predictions is kept (all by default). Feedback by prediction id may
arrive before the row is written: the ingress waits out one flush interval for ids that
young (a prediction id carries its time), see ``Ingress._served``.

Rows buffered at the instant a replica is killed are lost; that costs feedback on those
predictions their join (it answers 404), never an acknowledged feedback record.

While writes fail (or one hangs past two flush intervals), rows wait for the next flush, but
at most ``max_buffered_rows`` of them: past that the oldest are dropped (counted in
``dropped`` and reported to ``on_drop``), so a store that is down for hours costs part of the
log, not the replica's memory. While writes keep up, a flush interval's rows are kept however
many they are: capped on every record, a cap below the rows of one interval dropped rows of a
healthy log, and feedback on them answered 404.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from tuneloop.store.records import PredictionLog

log = logging.getLogger("tuneloop")

PRUNE_EVERY_S = 3600.0
DROP_WARNING_EVERY_S = 60.0  # a failing store drops rows on every request; one line a minute says it


class PredictionRecorder:
    def __init__(
        self,
        prediction_log: PredictionLog,
        model: str,
        sample_rate: float = 1.0,
        flush_interval_s: float = 1.0,
        retention_days: int | None = None,
        sample: Callable[[], float] = random.random,
        *,
        max_buffered_rows: int = 100_000,
        on_drop: Callable[[int], None] | None = None,
    ):
        self.log, self.model = prediction_log, model
        self.sample_rate, self.flush_interval_s, self.retention_days = sample_rate, flush_interval_s, retention_days
        self._sample = sample
        self.max_buffered_rows, self._on_drop = max_buffered_rows, on_drop
        self.dropped = 0  # rows dropped unwritten since the start, to keep the buffer bounded
        self._unreported_drops, self._warned_at = 0, float("-inf")
        self._rows: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # At the first tick: 0.0 waited for an hour of the host's uptime, so a node booted
        # less than PRUNE_EVERY_S ago kept every expired day until then.
        self._last_prune = -math.inf
        self._failing = False  # the last flush's write failed
        self._flushed_at = time.monotonic()  # when the last flush ended without failing
        self._thread = threading.Thread(target=self._run, name=f"prediction-log-{model}", daemon=True)
        self._thread.start()

    def record(self, rows: list[dict[str, Any]]) -> None:
        if self.sample_rate < 1.0:
            rows = [r for r in rows if self._sample() < self.sample_rate]
        if rows:
            with self._lock:
                self._rows.extend(rows)
                dropped = self._drop_oldest() if self._behind() else 0
            self._report_drops(dropped)

    def flush(self) -> int:
        with self._lock:
            rows, self._rows = self._rows, []
        if rows:
            try:
                self.log.append(self.model, rows)
            except Exception:
                with self._lock:
                    self._failing = True
                    self._rows[:0] = rows  # first in line for the next flush
                    dropped = self._drop_oldest()
                self._report_drops(dropped)
                raise
        with self._lock:
            self._failing, self._flushed_at = False, time.monotonic()
        return len(rows)

    def _behind(self) -> bool:
        """With the lock held: whether writes are failing, or the last flush ended more than
        two intervals ago (a write hangs): the buffer is then held to ``max_buffered_rows``."""
        return self._failing or time.monotonic() - self._flushed_at > 2 * self.flush_interval_s

    def _drop_oldest(self) -> int:
        """With the lock held: cut the buffer back to ``max_buffered_rows``, oldest first (the
        newest rows are the ones feedback is still likely to name). Returns how many went."""
        excess = len(self._rows) - self.max_buffered_rows
        if excess <= 0:
            return 0
        del self._rows[:excess]
        self.dropped += excess
        return excess

    def _report_drops(self, n: int) -> None:
        """Tell the caller's counter at once; tell the log at most once a minute, with the
        count since the last warning."""
        if n == 0:
            return
        if self._on_drop is not None:
            self._on_drop(n)
        now = time.monotonic()
        with self._lock:
            self._unreported_drops += n
            if now - self._warned_at < DROP_WARNING_EVERY_S:
                return
            n, self._unreported_drops, self._warned_at = self._unreported_drops, 0, now
        log.warning("prediction log %s: buffer full (%d rows) while writes fail; dropped the oldest %d rows "
                    "since the last warning (%d in all)", self.model, self.max_buffered_rows, n, self.dropped)

    def prune(self, now: datetime | None = None) -> list[str]:
        if self.retention_days is None:
            return []
        cutoff = (now or datetime.now(UTC)) - timedelta(days=self.retention_days)
        return self.log.drop_days_before(self.model, cutoff.date())

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            # Retention first and apart: on a full disk every flush fails, and pruning is
            # what frees the space the flushes (and the feedback journal beside them) wait for.
            if time.monotonic() - self._last_prune > PRUNE_EVERY_S:
                self._last_prune = time.monotonic()
                try:
                    dropped = self.prune()
                    if dropped:
                        log.info("prediction log %s: dropped %s (retention)", self.model, dropped)
                except Exception:  # noqa: BLE001 - tried again at the next period
                    log.exception("prediction log %s: retention failed; will retry", self.model)
                with self._lock:  # a long prune is no hung write: the rows of its time are kept
                    self._flushed_at = max(self._flushed_at, time.monotonic() - self.flush_interval_s)
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - keep the rows for the next try
                log.exception("prediction log %s: write failed; will retry", self.model)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.flush()
