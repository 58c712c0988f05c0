"""The prediction log's writer, off the response path.

A replica hands each served batch's rows to ``record`` (a list append under a lock) and
answers at once; a background thread writes what gathered as one Parquet file every
``flush_interval_s`` and drops date partitions older than ``retention_days``. A fraction
``sample_rate`` of predictions is kept (all by default). Feedback by prediction id may
arrive before the row is written: the ingress waits out one flush interval for ids that
young (a prediction id carries its time), see ``Ingress._served``.

Rows buffered at the instant a replica is killed are lost; that costs feedback on those
predictions their join (it answers 404), never an acknowledged feedback record.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from cluster.records import PredictionLog

log = logging.getLogger("tuneloop")

PRUNE_EVERY_S = 3600.0


class PredictionRecorder:
    def __init__(
        self,
        prediction_log: PredictionLog,
        model: str,
        sample_rate: float = 1.0,
        flush_interval_s: float = 1.0,
        retention_days: int | None = None,
        sample: Callable[[], float] = random.random,
    ):
        self.log, self.model = prediction_log, model
        self.sample_rate, self.flush_interval_s, self.retention_days = sample_rate, flush_interval_s, retention_days
        self._sample = sample
        self._rows: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._last_prune = 0.0
        self._thread = threading.Thread(target=self._run, name=f"prediction-log-{model}", daemon=True)
        self._thread.start()

    def record(self, rows: list[dict[str, Any]]) -> None:
        if self.sample_rate < 1.0:
            rows = [r for r in rows if self._sample() < self.sample_rate]
        if rows:
            with self._lock:
                self._rows.extend(rows)

    def flush(self) -> int:
        with self._lock:
            rows, self._rows = self._rows, []
        if not rows:
            return 0
        try:
            self.log.append(self.model, rows)
        except Exception:
            with self._lock:
                self._rows[:0] = rows  # first in line for the next flush
            raise
        return len(rows)

    def prune(self, now: datetime | None = None) -> list[str]:
        if self.retention_days is None:
            return []
        cutoff = (now or datetime.now(UTC)) - timedelta(days=self.retention_days)
        return self.log.drop_days_before(self.model, cutoff.date())

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            try:
                self.flush()
                if time.monotonic() - self._last_prune > PRUNE_EVERY_S:
                    self._last_prune = time.monotonic()
                    dropped = self.prune()
                    if dropped:
                        log.info("prediction log %s: dropped %s (retention)", self.model, dropped)
            except Exception:  # noqa: BLE001 - keep the rows for the next try
                log.exception("prediction log %s: write failed; will retry", self.model)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.flush()
