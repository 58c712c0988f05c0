"""Taking feedback: join it to the prediction it is about, check it, store it once, count it.

The ingress's HTTP handlers call this; it knows nothing of HTTP. It takes its stores, the
retrain trigger and its clock through the constructor (``from_config`` builds the real ones),
so its decisions are unit-tested with fakes in milliseconds, without Serve or Ray.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from tuneloop.core.config import TuneloopConfig
from tuneloop.core.errors import (InvalidBody, InvalidValue, Overloaded, StorageUnavailable, UnknownModel,
                                  UnknownPrediction)
from tuneloop.core.feedback_stats import FeedbackTally
from tuneloop.core.tasks import check_text_length, has_visible_text, model_tasks
from tuneloop.serving import metrics
from tuneloop.store.feedback_store import FeedbackStore
from tuneloop.store.records import PredictionLog, prediction_time
from tuneloop.store.storage import Storage

log = logging.getLogger("tuneloop")

PREDICTION_LOG_SLACK_S = 1.0  # a flush's own time, beyond the replicas' flush interval
# Feedback on ids younger than two flushes waits for the log (asynchronously); past this many
# such waits at once, more answer 503 at once: forged fresh ids cannot pile up. Half of the
# ingress's requests at once (ingress.py's 256): at 256 it could never refuse, and waits
# could hold every slot, /readyz's and /metrics' too.
MAX_YOUNG_ID_WAITS = 128
# A replica on another node whose clock runs ahead of the ingress's stamps ids a little in the
# future: young ids too, not unknown ones (feedback a few ms after its prediction, with the
# replica 5 ms ahead, answered 404 at once, which clients do not retry). NTP keeps nodes far
# closer than this; an id further ahead is forged, and 404 at once.
MAX_CLOCK_AHEAD_S = 5.0


class FeedbackService:
    def __init__(self, cfg: TuneloopConfig, store: FeedbackStore, predictions: PredictionLog, *,
                 trigger: Callable[[str, str | None, bool | None, str | None], None] | None = None,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self.cfg, self.store, self.predictions = cfg, store, predictions
        self.tasks = model_tasks(cfg.models)
        self._trigger, self._clock, self._sleep = trigger, clock, sleep
        # The statistics, counted once from what is stored, then kept up to date by each new
        # record (``stored``): reading them costs the same whatever the amount of feedback.
        self._tally_lock = threading.Lock()
        self._tallies = {name: FeedbackTally(name, task).add_all(store.read_all(name, without_text=True))
                         for name, task in self.tasks.items()}
        self._young_id_waits = 0

    @classmethod
    def from_config(cls, cfg: TuneloopConfig,
                    trigger: Callable[[str, str | None, bool | None, str | None], None] | None = None) -> FeedbackService:
        """The one feedback writer of a deployment: it recovers what a killed predecessor
        journalled, then compacts the journal into Parquet in the background."""
        storage = Storage(cfg.storage.root)
        tasks = model_tasks(cfg.models)
        store = FeedbackStore(storage, cfg.storage.journal_path(), tasks)
        service = cls(cfg, store, PredictionLog(storage, tasks), trigger=trigger)
        store.open_writer(cfg.feedback.compact_interval_s, cfg.feedback.idempotency_ttl_s, on_stored=service.stored)
        return service

    def _model(self, name: str):
        try:
            return self.cfg.model(name)
        except KeyError:
            raise UnknownModel(name) from None

    # -- taking feedback -----------------------------------------------------------------
    async def submit(self, said: dict[str, Any], *, prediction_id: str | None = None, model: str | None = None,
                     text: str | None = None, key_id: str | None = None,
                     idempotency_key: str | None = None) -> str:
        """Store one feedback record (durable on return) and return its id; a repeated
        Idempotency-Key returns the first id and stores nothing. ``said``: the task's
        feedback fields as the user sent them (a classifier's ``{"label": ...}``)."""
        if model is not None:
            self._model(model)  # 404 for a model that is not served, whatever the body says
        self._check_shape(said, model)
        if prediction_id is not None:
            served = await self.served(prediction_id)
            name = self._model(served["model"]).name
            task = self.tasks[name]
            if not has_visible_text(served["text"] or ""):  # served, but nothing to learn: as for a text given blank
                raise InvalidValue(f"prediction {prediction_id} was of a text with no visible character (empty, or "
                                   "only whitespace, control or format characters): there is nothing to learn")
            fields = {"model": name, "text": served["text"], "prediction_id": served["prediction_id"],
                      "version": served["version"], "predicted_at": served["created_at"], **task.predicted(served)}
        else:
            name = self._model(model).name
            task = self.tasks[name]
            check_text_length(text, "text", self.cfg.serving.max_chars_per_input)
            if not has_visible_text(text):  # nothing to learn, and quarantine would see every key share one text
                raise InvalidValue("text has no visible character (it is empty, or only whitespace, control or format "
                                   "characters): feedback on a text needs the text")
            fields = {"model": name, "text": text}
        task.check_feedback_fields(said)
        fields.update(task.feedback_target(name, said, fields["text"]))
        return await asyncio.to_thread(self.store.append, key_id=key_id, idempotency_key=idempotency_key, **fields)

    def _check_shape(self, said: dict[str, Any], model: str | None) -> None:
        """Fields that no configured task takes are refused before a prediction is looked
        up (422, not a 404 for a body that could never be right)."""
        # The tasks whose fields the body names first: an NER body with a bad span is told
        # about its span, not that "entities" is no classifier's field.
        tasks = [self.tasks[model]] if model in self.tasks else \
            sorted(self.tasks.values(), key=lambda t: not set(said) & set(t.feedback_fields))
        errors = []
        for task in tasks:
            try:
                task.check_feedback_fields(said)
                return
            except InvalidBody as e:
                errors.append(e)
        raise errors[0]

    async def served(self, prediction_id: str) -> dict[str, Any]:
        """The logged prediction. Replicas write their log once per flush interval, so an
        id younger than that may not be on disk yet: wait out the interval (without holding
        a thread), look again; and once more a flush later. A replica sleeps the interval
        after its flush ends, so a row that came just after a flush began is written an
        interval and two writes later: on a bucket, where a write takes a second, one look
        answered a real id 404, which clients do not retry."""
        models = [m.name for m in self.cfg.models]
        found = await self._lookup(models, prediction_id)
        born = prediction_time(prediction_id)
        if found is None and born is not None:
            settle = self.cfg.predictions.flush_interval_s + PREDICTION_LOG_SLACK_S
            wait = born.timestamp() + settle - self._clock()
            if -settle < wait <= settle + MAX_CLOCK_AHEAD_S:  # younger than two flushes: a look at each
                wait = min(wait, settle)  # born "ahead" of this clock: logged within a flush from now
                if self._young_id_waits >= MAX_YOUNG_ID_WAITS:
                    raise Overloaded("too many feedback requests on predictions not yet logged; retry shortly")
                self._young_id_waits += 1
                try:
                    for pause in (wait, settle) if wait > 0 else (wait + settle,):
                        await self._sleep(pause)
                        found = await self._lookup(models, prediction_id)
                        if found is not None:
                            break
                finally:
                    self._young_id_waits -= 1
        if found is None:
            hint = "" if self.cfg.predictions.sample_rate >= 1 else " (or it was not sampled into the log)"
            raise UnknownPrediction(prediction_id, hint)
        return found

    async def _lookup(self, models: list[str], prediction_id: str) -> dict[str, Any] | None:
        """The prediction log's row of ``prediction_id``. The log unreachable (an object
        store's outage) answers 503 with Retry-After, not 500: clients retry a 503, and
        dropped the feedback on a 500."""
        try:
            return await asyncio.to_thread(self.predictions.lookup, models, prediction_id)
        except OSError as e:  # the detail names buckets and paths: the log's, not the client's
            log.warning("feedback on %s: the prediction log cannot be read: %s: %s", prediction_id, type(e).__name__, e)
            raise StorageUnavailable("the prediction log cannot be read now; nothing was stored, retry later") from None

    def stored(self, record: dict[str, Any]) -> None:
        """Each newly stored record (never a repeated Idempotency-Key): statistics, the
        counter, and the retrain trigger."""
        with self._tally_lock:
            self._tallies[record["model"]].add(record)
        metrics.FEEDBACK.labels(record["model"]).inc()
        if self._trigger is not None:
            # The model, the version that predicted, whether the user agreed with it, which
            # prediction it was (a second answer on it replaces the first), and whose key.
            on_prediction = record.get("prediction_id") is not None
            self._trigger(record["model"], record.get("version"),
                          self.tasks[record["model"]].agrees(record) if on_prediction else None,
                          record.get("prediction_id"), record.get("key_id"))

    # -- reading -------------------------------------------------------------------------
    def stats(self, model: str) -> dict[str, Any]:
        self._model(model)
        with self._tally_lock:
            return self._tallies[model].stats()

    def all_stats(self) -> list[dict[str, Any]]:
        with self._tally_lock:
            return [tally.stats() for tally in self._tallies.values()]

    def compact(self) -> int:
        return self.store.compact()

    def close(self) -> None:
        self.store.close()
