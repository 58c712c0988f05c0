"""An intent model with 77 labels (BANKING77's count) end to end on a tiny random-init model:
v1 trains through Ray Train on a seed that holds every label, the golden set is stratified
(every label in it), the metrics carry 77 classes and a 77 x 77 confusion matrix, a replica
answers with 77 scores, and v2 trains on feedback and is gated with its recall test shared
among the 77 classes. Then the multi-label mode: trained, served over HTTP with a threshold
per label, its feedback (the full label list) checked and stored, and v2 trained on it."""

from __future__ import annotations

import httpx
import pytest

from tuneloop.core.tasks import model_tasks
from tuneloop.store.feedback_store import FeedbackStore
from tuneloop.store.registry import Registry
from tuneloop.store.storage import Storage
from tests.integration.conftest import ADMIN_KEY, FEEDBACK_KEY, bearer, make_config, trained_and_served
from tests.tiny_models import build_tiny_model, predict_with_replica

INTENTS = [f"intent_{k:02d}" for k in range(77)]
WORDS = ["card", "cash", "transfer", "balance", "fee", "rate", "pin", "top up", "refund", "account", "limit"]


def _text(k: int, j: int) -> str:
    return f"question {j} about {WORDS[k % len(WORDS)]} and {WORDS[(k // len(WORDS)) % len(WORDS)]} number {k}"


@pytest.fixture(scope="module")
def intents(ray_session, tmp_path_factory):
    from tuneloop.training.launcher import run_training

    seed = tmp_path_factory.mktemp("intent-seed") / "seed.tsv"
    seed.write_text("text\tlabel\n" + "".join(f"{_text(k, j)}\t{label}\n" for k, label in enumerate(INTENTS)
                                              for j in range(5)))
    base = build_tiny_model(tmp_path_factory.mktemp("tiny-intent"), INTENTS)
    root = tmp_path_factory.mktemp("intent-store")
    # One worker: these jobs are about labels, not sharding (test_training.py trains 2 workers at
    # ZeRO-2 and 3); a second worker process cost each job about 12 s here.
    cfg = make_config(root, base, str(seed), model={"name": "intent", "labels": INTENTS},
                      training={"max_steps": 2, "early_stopping_patience": None, "num_workers": 1},
                      gate={"golden_margin": 1.0})  # a random tiny model: reach the per-class test whatever it scores
    first = run_training(cfg, "intent", trigger="bootstrap")
    feedback = FeedbackStore(Storage(cfg.storage.root), cfg.storage.journal_path(), model_tasks(cfg.models))
    feedback.open_writer()
    for k in range(0, 77, 2):  # corrections on 39 of the intents, one new phrasing each
        feedback.append(model="intent", text=f"another way to ask {_text(k, 9)}", label=INTENTS[k])
    feedback.close()
    second = run_training(cfg, "intent", trigger="manual")
    return {"cfg": cfg, "root": root, "first": first, "second": second}


def test_v1_learns_77_labels_with_a_stratified_golden_set(intents):
    first = intents["first"]
    assert first.job.state == "succeeded" and first.job.version == "v1", first.job.error
    m = first.manifest
    assert m.labels == INTENTS and m.data["golden"]["rows"] == 77  # 20% of 385, every intent in it
    assert set(m.metrics.per_class) == set(INTENTS) and all(c.support == 1 for c in m.metrics.per_class.values())
    assert len(m.metrics.confusion) == 77 and all(len(row) == 77 for row in m.metrics.confusion)
    assert sum(map(sum, m.metrics.confusion)) == m.metrics.eval_rows == 77


def test_a_replica_answers_with_77_scores(intents, tmp_path):
    weights = Registry(Storage(str(intents["root"]))).local_path("intent", "v1")
    answers = predict_with_replica({"name": "intent", "labels": INTENTS}, weights, tmp_path, [_text(3, 0), "hello"])
    for a in answers:
        assert a["label"] in INTENTS and set(a["scores"]) == set(INTENTS)
        assert sum(a["scores"].values()) == pytest.approx(1.0, abs=1e-3)
        assert a["score"] == max(a["scores"].values())


def test_v2_adapts_on_feedback_and_is_gated_over_77_classes(intents):
    second = intents["second"]
    assert second.job.state in ("succeeded", "rejected"), second.job.error
    m = second.manifest
    assert m.version == "v2" and m.parent == "v1"
    assert m.data["feedback"]["fresh_rows"] == 39
    golden = next(c for c in m.gate.checks if c.name == "golden")
    # The recall test's level is alpha shared among the 77 classes.
    assert golden.numbers["recall_test_level"] == pytest.approx(0.05 / 77)
    assert len(m.metrics.confusion) == 77


TOPICS = ["billing", "refund", "urgent"]


@pytest.fixture(scope="module")
def multi_label(ray_session, serve_port, metrics_dir, tmp_path_factory):
    """A multi-label model (sigmoid per label): v1 through a real job on a seed whose rows
    hold zero, one or several labels, then served over HTTP."""
    combos = [[], ["billing"], ["refund"], ["urgent"], ["billing", "refund"], ["refund", "urgent"],
              ["billing", "refund", "urgent"]]
    seed = tmp_path_factory.mktemp("ml-seed") / "seed.tsv"
    seed.write_text("text\tlabels\n" + "".join(f"message {j} on {' and '.join(c) or 'nothing'}\t{'|'.join(c)}\n"
                                              for j in range(8) for c in combos))
    base = build_tiny_model(tmp_path_factory.mktemp("tiny-ml"), TOPICS, task="multi-label-classification")
    cfg = make_config(tmp_path_factory.mktemp("ml-store"), base, str(seed),
                      model={"name": "tickets", "task": "multi-label-classification", "labels": TOPICS,
                             "threshold": {"urgent": 0.9}},
                      training={"max_steps": 2, "early_stopping_patience": None, "num_workers": 1},
                      gate={"golden_margin": 1.0})
    with trained_and_served(cfg, "tickets", metrics_dir, serve_port) as (url, first):
        yield url, cfg, first


def test_multi_label_v1_trains_with_per_label_metrics(multi_label):
    _, _, first = multi_label
    assert first.job.state == "succeeded" and first.job.version == "v1", first.job.error
    m = first.manifest
    assert m.data["golden"]["rows"] > 0 and set(m.metrics.per_class) == set(TOPICS)
    assert m.metrics.eval_rows == m.data["golden"]["rows"]
    assert all(0.0 <= getattr(m.metrics, k) <= 1.0 for k in ("accuracy", "precision", "recall", "f1"))


def test_multi_label_answers_and_feedback_over_http(multi_label):
    url, _, _ = multi_label
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/models/tickets/predict", json={"inputs": ["charged twice, refund me now"]})
        assert r.status_code == 200, r.text
        [answer] = r.json()["predictions"]
        assert set(answer) == {"id", "version", "labels", "scores"} and set(answer["scores"]) == set(TOPICS)
        # Sigmoids, one per label, each against its own threshold.
        assert answer["labels"] == [t for t in TOPICS if answer["scores"][t] >= (0.9 if t == "urgent" else 0.5)]
        before = c.get("/v1/models/tickets/feedback/stats", headers=bearer(ADMIN_KEY)).json()
        for body, why in [({"prediction_id": answer["id"], "labels": ["billing", "spam"]}, "spam"),
                          ({"prediction_id": answer["id"], "labels": "billing"}, "list of label names"),
                          ({"prediction_id": answer["id"], "label": "billing"}, "labels")]:
            refused = c.post("/v1/feedback", json=body, headers=bearer(FEEDBACK_KEY))
            assert refused.status_code == 422 and why in refused.json()["error"]["message"], refused.text
        assert c.get("/v1/models/tickets/feedback/stats", headers=bearer(ADMIN_KEY)).json() == before
        stored = [c.post("/v1/feedback", json={"prediction_id": answer["id"], "labels": ["refund", "billing"]},
                         headers=bearer(FEEDBACK_KEY))]
        for j in range(5):
            stored.append(c.post("/v1/feedback", json={"model": "tickets", "text": f"charged twice, refund me {j}",
                                                       "labels": ["billing", "refund", "urgent"]},
                                 headers=bearer(FEEDBACK_KEY)))
            stored.append(c.post("/v1/feedback", json={"model": "tickets", "text": f"thanks for the help {j}",
                                                       "labels": []}, headers=bearer(FEEDBACK_KEY)))
    assert [s.status_code for s in stored] == [202] * 11, [s.text for s in stored]


def test_multi_label_v2_adapts_on_that_feedback(multi_label):
    from tuneloop.training.launcher import run_training

    _, cfg, _ = multi_label
    second = run_training(cfg, "tickets", trigger="manual")
    assert second.job.state in ("succeeded", "rejected"), second.job.error
    m = second.manifest
    assert (m.version, m.parent) == ("v2", "v1") and m.data["feedback"]["fresh_rows"] == 11
    assert "golden" in [c.name for c in m.gate.checks] and set(m.metrics.per_class) == set(TOPICS)
