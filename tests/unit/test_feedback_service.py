"""Taking feedback, with fakes in place of the journal and the prediction log: the join to
the prediction, the wait for a young id, the checks, the statistics and the trigger.
Milliseconds, no Serve, no Ray, no files."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from tuneloop.core.config import parse_config
from tuneloop.core.errors import InvalidBody, InvalidLabel, InvalidValue, Overloaded, PayloadTooLarge, UnknownModel, UnknownPrediction
from tuneloop.serving import feedback_service
from tuneloop.serving.feedback_service import FeedbackService
from tuneloop.store.records import new_prediction_id

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


class FakeStore:
    def __init__(self, service_box):
        self.appended, self.box = [], service_box

    def read_all(self, model, without_text=False):
        return []

    def append(self, **record):
        record = {"feedback_id": f"f{len(self.appended)}", "created_at": NOW, **record}
        self.appended.append(record)
        self.box[0].stored(record)  # what the real store's on_stored hook does
        return record["feedback_id"]


class FakeLog:
    """Finds an id only from the ``visible_after``-th lookup on (a replica's flush)."""

    def __init__(self, rows, visible_after=0):
        self.rows, self.visible_after, self.lookups = rows, visible_after, 0

    def lookup(self, models, prediction_id):
        self.lookups += 1
        return self.rows.get(prediction_id) if self.lookups > self.visible_after else None


def _service(rows=None, visible_after=0):
    cfg = parse_config({"models": [{"name": "m", "base_model": "x", "labels": ["neg", "pos"]}],
                        "serving": {"max_chars_per_input": 20}, "predictions": {"flush_interval_s": 1.0}})
    box, triggered, slept = [None], [], []

    async def fake_sleep(seconds):
        slept.append(seconds)

    store = FakeStore(box)
    service = FeedbackService(cfg, store, FakeLog(rows or {}, visible_after), trigger=lambda *a: triggered.append(a),
                              clock=NOW.timestamp, sleep=fake_sleep)
    box[0] = service
    return service, store, triggered, slept


def _served(pid, label="pos"):
    return {"prediction_id": pid, "model": "m", "version": "v3", "text": "the served text", "label": label,
            "created_at": NOW}


def test_feedback_on_a_prediction_is_joined_to_what_was_served_counted_and_triggers():
    pid = new_prediction_id(NOW)
    service, store, triggered, _ = _service({pid: _served(pid)})
    assert asyncio.run(service.submit({"label": "neg"}, prediction_id=pid, key_id="k1")) == "f0"
    [record] = store.appended
    assert record["text"] == "the served text" and record["version"] == "v3" and record["predicted_label"] == "pos"
    assert record["key_id"] == "k1" and record["label"] == "neg"
    assert triggered == [("m", "v3", False, pid, "k1")]  # the user disagreed with v3's "pos" (prediction pid)
    stats = service.stats("m")
    assert stats["total"] == 1 and stats["by_version"]["v3"]["online_accuracy"] == 0.0


def test_a_young_id_waits_for_the_flush_without_a_thread_then_is_found():
    pid = new_prediction_id(NOW)
    service, store, _, slept = _service({pid: _served(pid)}, visible_after=1)
    asyncio.run(service.submit({"label": "pos"}, prediction_id=pid))
    assert slept == [pytest.approx(2.0, abs=0.01)]  # flush interval + slack, asked of the fake sleep
    assert len(store.appended) == 1


def test_a_young_id_is_looked_for_once_more_a_flush_later():
    """A row that came just after a flush began is written an interval and two writes later:
    on a bucket one look answered a real id 404."""
    pid = new_prediction_id(NOW)
    service, store, _, slept = _service({pid: _served(pid)}, visible_after=2)
    asyncio.run(service.submit({"label": "pos"}, prediction_id=pid))
    assert slept == [pytest.approx(2.0, abs=0.01)] * 2 and len(store.appended) == 1
    aged = new_prediction_id(NOW - timedelta(seconds=3))  # past one flush's look, not the second's
    service, store, _, slept = _service({aged: _served(aged)}, visible_after=1)
    asyncio.run(service.submit({"label": "pos"}, prediction_id=aged))
    assert slept == [pytest.approx(1.0, abs=0.01)] and len(store.appended) == 1
    unknown = new_prediction_id(NOW)
    service, store, _, slept = _service()
    with pytest.raises(UnknownPrediction):
        asyncio.run(service.submit({"label": "pos"}, prediction_id=unknown))
    assert slept == [pytest.approx(2.0, abs=0.01)] * 2 and store.appended == []
    gone = new_prediction_id(NOW - timedelta(seconds=5))  # two flushes old: 404 at once
    with pytest.raises(UnknownPrediction):
        asyncio.run(service.submit({"label": "pos"}, prediction_id=gone))
    assert len(slept) == 2


def test_an_id_from_a_replica_whose_clock_runs_a_little_ahead_is_young_not_unknown():
    """A replica on another node stamps ids with its own clock: 5 ms ahead of the ingress's,
    feedback a moment after its prediction was answered 404 at once, and lost."""
    ahead = new_prediction_id(NOW + timedelta(milliseconds=5))
    service, store, _, slept = _service({ahead: _served(ahead)}, visible_after=1)
    asyncio.run(service.submit({"label": "pos"}, prediction_id=ahead))
    assert slept == [pytest.approx(2.0, abs=0.01)] and len(store.appended) == 1  # a flush's wait, no more
    further = new_prediction_id(NOW + timedelta(seconds=4))
    service, store, _, slept = _service({further: _served(further)}, visible_after=2)
    asyncio.run(service.submit({"label": "pos"}, prediction_id=further))
    assert slept == [pytest.approx(2.0, abs=0.01)] * 2 and len(store.appended) == 1
    forged = new_prediction_id(NOW + timedelta(minutes=5))  # further ahead than any clock: 404 at once
    service, store, _, slept = _service()
    with pytest.raises(UnknownPrediction):
        asyncio.run(service.submit({"label": "pos"}, prediction_id=forged))
    assert slept == [] and store.appended == []


def test_an_old_unknown_id_is_404_at_once_and_a_forged_id_too():
    service, store, _, slept = _service()
    old = new_prediction_id(datetime(2026, 11, 1, tzinfo=UTC))
    for pid in (old, "not-one-of-ours"):
        with pytest.raises(UnknownPrediction):
            asyncio.run(service.submit({"label": "pos"}, prediction_id=pid))
    assert slept == [] and store.appended == []


def test_too_many_young_id_waits_at_once_are_refused(monkeypatch):
    monkeypatch.setattr(feedback_service, "MAX_YOUNG_ID_WAITS", 0)
    service, _, _, _ = _service()
    with pytest.raises(Overloaded):
        asyncio.run(service.submit({"label": "pos"}, prediction_id=new_prediction_id(NOW)))


def test_bad_feedback_stores_nothing():
    service, store, triggered, _ = _service()
    with pytest.raises(InvalidLabel):
        asyncio.run(service.submit({"label": "neutral"}, model="m", text="ok"))
    with pytest.raises(UnknownModel):
        asyncio.run(service.submit({"label": "pos"}, model="nope", text="ok"))
    with pytest.raises(PayloadTooLarge):
        asyncio.run(service.submit({"label": "pos"}, model="m", text="x" * 21))
    with pytest.raises(InvalidBody, match="unknown field"):
        asyncio.run(service.submit({"label": "pos", "labels": ["pos"]}, model="m", text="ok"))
    with pytest.raises(InvalidBody, match="missing"):
        asyncio.run(service.submit({}, model="m", text="ok"))
    with pytest.raises(InvalidBody, match='"label" must be a string'):
        asyncio.run(service.submit({"label": 3}, model="m", text="ok"))
    for blank in ("", " \n\t", "\x00\x01", "\u200b", "\u2028\ufeff"):  # control and format characters too
        with pytest.raises(InvalidValue, match="no visible character") as e:
            asyncio.run(service.submit({"label": "pos"}, model="m", text=blank))
        assert e.value.status == 422
    assert store.appended == [] and triggered == []


def test_a_body_no_task_takes_is_refused_before_the_prediction_is_looked_up():
    service, store, _, slept = _service()
    with pytest.raises(InvalidBody):
        asyncio.run(service.submit({"entities": []}, prediction_id=new_prediction_id(NOW)))
    assert service.predictions.lookups == 0 and slept == [] and store.appended == []


def test_an_unknown_model_is_404_whatever_the_body_and_an_empty_served_text_is_nothing_to_learn():
    pid = new_prediction_id(NOW)
    invisible = new_prediction_id(NOW)
    service, store, _, _ = _service({pid: {**_served(pid), "text": "  "},
                                     invisible: {**_served(invisible), "text": "\x00\u200b"}})
    with pytest.raises(UnknownModel):  # was a 422 for the body's shape
        asyncio.run(service.submit({"labels": ["a"]}, model="nope", text="hi"))
    for served in (pid, invisible):  # predict answers "", but a training row of it is not
        with pytest.raises(InvalidValue, match="no visible character"):
            asyncio.run(service.submit({"label": "pos"}, prediction_id=served))
    assert store.appended == []


def test_with_several_tasks_a_bad_body_is_told_what_its_own_task_says():
    cfg = parse_config({"models": [{"name": "m", "base_model": "x", "labels": ["neg", "pos"]},
                                   {"name": "ner", "base_model": "x", "task": "token-classification",
                                    "labels": ["PER"]}]})
    service = FeedbackService(cfg, FakeStore([None]), FakeLog({}), trigger=lambda *a: None, clock=NOW.timestamp)
    with pytest.raises(InvalidBody) as e:
        asyncio.run(service.submit({"entities": "PER"}, prediction_id=new_prediction_id(NOW)))
    assert '"entities" must be a list of {"start", "end", "label"}, not a string' in str(e.value)  # not "unknown field"


def test_feedback_on_a_prediction_while_the_log_is_unreachable_is_503_and_stores_nothing(tmp_path):
    """An object store's outage during the lookup was a 500 without Retry-After: clients that
    retry only 429 and 503 dropped the feedback."""
    from tuneloop.core.errors import StorageUnavailable
    from tuneloop.core.tasks import model_tasks
    from tuneloop.store.records import PredictionLog
    from tuneloop.store.storage import Storage

    class Unreachable(Storage):
        def list_dir(self, rel):
            raise OSError("When listing objects under key 'predictions/m': AWS Error NETWORK_CONNECTION")

    service, store, _, _ = _service()
    service.predictions = PredictionLog(Unreachable(str(tmp_path)), model_tasks(service.cfg.models))
    with pytest.raises(StorageUnavailable, match="the prediction log cannot be read") as e:
        asyncio.run(service.submit({"label": "pos"}, prediction_id=new_prediction_id(datetime(2026, 11, 1, tzinfo=UTC))))
    assert e.value.status == 503 and e.value.headers["Retry-After"] and store.appended == []
    assert "AWS" not in e.value.message and "predictions/m" not in e.value.message  # the log has it, not the client
