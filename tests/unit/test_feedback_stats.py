from datetime import UTC, datetime

from tuneloop.core.feedback_stats import feedback_stats, superseded
from tuneloop.core.tasks import make_task

TASK = make_task("text-classification", ["negative", "positive"])


def _row(fid, label, *, pid=None, version=None, predicted=None, day=22, minute=0):
    return {"feedback_id": fid, "prediction_id": pid, "version": version, "predicted_label": predicted,
            "label": label, "created_at": datetime(2026, 11, day, 12, minute, tzinfo=UTC)}


def test_latest_feedback_per_prediction_wins():
    rows = [
        _row("a", "positive", pid="p1", minute=1),
        _row("b", "negative", pid="p1", minute=5),  # the user changed their mind
        _row("c", "negative", pid="p1", minute=3),  # arrived late but older: loses too
        _row("d", "positive", pid="p2"),
        _row("e", "positive"),  # model + text: nothing to collide with
        _row("f", "positive"),
    ]
    assert superseded(rows) == {"a", "c"}
    assert superseded(list(reversed(rows))) == {"a", "c"}  # order of arrival does not matter


def test_stats_count_labels_days_and_online_accuracy_per_version():
    rows = [
        _row("1", "positive", pid="p1", version="v1", predicted="positive", day=21),
        _row("2", "negative", pid="p2", version="v1", predicted="positive", day=21),
        _row("3", "negative", pid="p3", version="v2", predicted="negative"),
        _row("4", "positive", pid="p3", version="v2", predicted="negative", minute=9),  # replaces 3
        _row("5", "positive"),
    ]
    stats = feedback_stats("sentiment", TASK, rows)
    assert stats["total"] == 4 and stats["superseded"] == 1
    assert stats["by_label"] == {"negative": 1, "positive": 3}
    assert stats["by_day"] == {"2026-11-21": 2, "2026-11-22": 2}
    pos = {"right": 1, "wrong": 1, "missed": 0, "precision": 0.5, "recall": 1.0}
    neg = {"right": 0, "wrong": 0, "missed": 1, "precision": None, "recall": 0.0}
    assert stats["by_version"] == {
        "v1": {"feedback": 2, "agreed": 1, "online_accuracy": 0.5, "by_label": {"negative": neg, "positive": pos}},
        "v2": {"feedback": 1, "agreed": 0, "online_accuracy": 0.0, "by_label": {
            "negative": {"right": 0, "wrong": 1, "missed": 0, "precision": 0.0, "recall": None},
            "positive": {"right": 0, "wrong": 0, "missed": 1, "precision": None, "recall": 0.0}}},
    }


def test_no_feedback_gives_zeros_not_errors():
    assert feedback_stats("m", TASK, []) == {"model": "m", "total": 0, "superseded": 0, "by_label": {},
                                       "by_version": {}, "by_day": {}}


def test_the_running_tally_matches_a_full_recount_in_any_arrival_order():
    import random

    from tuneloop.core.feedback_stats import FeedbackTally

    rng = random.Random(7)
    rows = []
    for i in range(300):
        pid = f"p{rng.randrange(60)}" if rng.random() < 0.8 else None
        version = rng.choice(["v1", "v2"]) if pid else None
        rows.append(_row(str(i), rng.choice(["negative", "positive"]), pid=pid, version=version,
                         predicted=rng.choice(["negative", "positive"]), day=rng.choice([21, 22]),
                         minute=rng.randrange(60)))
    expected = feedback_stats("m", TASK, rows)
    # Recounted here apart from the module's tally (feedback_stats is that tally too).
    from collections import Counter

    gone = superseded(rows)
    kept = [r for r in rows if r["feedback_id"] not in gone]
    assert (expected["total"], expected["superseded"]) == (len(kept), len(gone))
    assert expected["by_label"] == dict(Counter(r["label"] for r in kept))
    assert expected["by_day"] == dict(Counter(f"{r['created_at']:%Y-%m-%d}" for r in kept))
    for version in ("v1", "v2"):
        served = [r for r in kept if r["version"] == version]
        agreed = sum(r["label"] == r["predicted_label"] for r in served)
        got = expected["by_version"][version]
        assert (got["feedback"], got["agreed"]) == (len(served), agreed)
        assert got["online_accuracy"] == agreed / len(served)
    for _ in range(5):
        rng.shuffle(rows)
        tally = FeedbackTally("m", TASK)
        for row in rows:
            tally.add(row)
        assert tally.stats() == expected
    assert expected["superseded"] == len(superseded(rows))
