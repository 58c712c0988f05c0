"""A replica during a rollout, with a tiny real model and no Ray: canary traffic goes to the
challenger by client, shadow answers are logged under production's ids, at most two
versions are resident, and a promoted challenger is not loaded again."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from tuneloop.core.config import parse_config
from tuneloop.core.rollout import canary_bucket
from tuneloop.core.tasks import make_task
from tuneloop.store.records import SHADOW_ROOT, PredictionLog
from tuneloop.store.manifest import Manifest
from tuneloop.store.registry import Registry
from tuneloop.store.storage import Storage
from tuneloop.serving.model_server import ModelServer
from tests.tiny_models import build_tiny_model

LABELS = ["negative", "positive"]


@pytest.fixture
def rollout(tmp_path):
    weights = build_tiny_model(tmp_path / "tiny", LABELS)
    cfg = parse_config({
        "models": [{"name": "sentiment", "base_model": weights, "labels": LABELS}],
        "storage": {"root": str(tmp_path / "store")},
        "serving": {"max_batch_size": 32, "reload_interval_s": 600, "num_cpus_per_replica": 1},
        "predictions": {"flush_interval_s": 0.05},
    })
    registry = Registry(Storage(cfg.storage.root))
    for _ in range(3):
        registry.publish("sentiment", weights, Manifest(version="pending", model="sentiment", parent=None,
                                                        base_model=weights, task="text-classification", labels=LABELS))
    registry.promote("sentiment", "v1")
    replica = ModelServer(cfg.model_dump(), "sentiment")
    yield replica, registry, cfg
    replica.__del__()


def test_canary_answers_the_clients_below_its_share_and_keeps_each_on_one_version(rollout):
    replica, registry, _ = rollout
    registry.start_rollout("sentiment", "v2", "canary", 30.0)
    replica._sync_with_registry()
    clients = [f"client-{i}" for i in range(40)]

    async def main():
        return [(await replica.predict(["a text"], client=c))[0]["version"] for c in clients * 2]

    versions = asyncio.run(main())
    expected = ["v2" if canary_bucket(c) < 30 else "v1" for c in clients]
    assert versions == expected * 2  # sticky: the same client, the same version
    assert {"v1", "v2"} == set(versions)


def test_one_api_key_without_a_client_id_is_spread_over_the_canary_not_stuck_to_one_side(tmp_path):
    """An application's one service key, no X-Client-Id: each request is drawn anew. Hashed
    by the key, all of them went to one side: 0% or 100% of traffic at any percent."""
    import json

    from starlette.requests import Request

    from tuneloop.core.auth import new_key

    weights = build_tiny_model(tmp_path / "tiny", LABELS)
    secret, key = new_key("predict")
    cfg = parse_config({"models": [{"name": "sentiment", "base_model": weights, "labels": LABELS}],
                        "storage": {"root": str(tmp_path / "store")}, "serving": {"num_cpus_per_replica": 1},
                        "auth": {"keys": [{"id": key.id, "role": key.role, "sha256": key.sha256}]}})
    registry = Registry(Storage(cfg.storage.root))
    for _ in range(2):
        registry.publish("sentiment", weights, Manifest(version="pending", model="sentiment", parent=None,
                                                        base_model=weights, task="text-classification", labels=LABELS))
    registry.promote("sentiment", "v1")
    registry.start_rollout("sentiment", "v2", "canary", 50.0)
    replica = ModelServer(cfg.model_dump(), "sentiment")
    replica._sync_with_registry()

    async def call(headers: dict[str, str]) -> str:
        body = json.dumps({"inputs": ["a text"]}).encode()

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        scope = {"type": "http", "method": "POST", "path": "/", "root_path": "", "query_string": b"",
                 "headers": [(k.lower().encode(), v.encode()) for k, v in
                             {"authorization": f"Bearer {secret}", "content-type": "application/json",
                              "content-length": str(len(body)), **headers}.items()]}
        answer = await replica(Request(scope, receive))
        assert answer.status_code == 200, answer.body
        return json.loads(answer.body)["predictions"][0]["version"]

    async def main():
        return ([await call({}) for _ in range(40)], [await call({"x-client-id": "c1"}) for _ in range(10)])

    try:
        keyed, sticky = asyncio.run(main())
    finally:
        replica.__del__()
    assert set(keyed) == {"v1", "v2"}  # spread: P(40 draws at 50% all one side) = 2^-39
    assert len(set(sticky)) == 1  # a client that sends its id stays on one version


def test_a_challenger_swapped_before_its_rollout_answers_no_user(rollout):
    """The watcher thread loads the next challenger before it publishes the next rollout: a
    new shadow read beside the old canary's percent answered users in that moment."""
    replica, registry, _ = rollout
    registry.start_rollout("sentiment", "v2", "canary", 100.0)
    replica._sync_with_registry()
    registry.abort_rollout("sentiment", "v2", "by hand")
    registry.start_rollout("sentiment", "v3", "shadow", 0.0)
    canary_at_100 = replica._rollout
    replica._sync_with_registry()
    replica._rollout = canary_at_100  # the moment between the two assignments

    async def main():
        return [(await replica.predict(["a text"], client=f"c{i}"))[0]["version"] for i in range(10)]

    assert set(asyncio.run(main())) == {"v1"}


def test_a_canary_that_does_not_answer_in_time_counts_the_timeout_as_its_error(rollout):
    """A canary too slow to answer within request_timeout_s left only its fast answers in
    its rollout's health: its timeouts counted against no version."""
    import time

    from tuneloop.core.errors import Overloaded

    replica, registry, _ = rollout
    registry.start_rollout("sentiment", "v2", "canary", 50.0)
    replica._sync_with_registry()
    replica.serving = replica.serving.model_copy(update={"request_timeout_s": 0.2})
    challenger, real = replica._challenger, replica._challenger.predict

    def slow(texts):
        time.sleep(0.5)
        return real(texts)

    challenger.predict = slow
    canary_client = next(c for c in (f"client-{i}" for i in range(100)) if canary_bucket(c) < 50)
    production_client = next(c for c in (f"client-{i}" for i in range(100)) if canary_bucket(c) >= 50)

    def errors(version: str) -> float:
        return REGISTRY.get_sample_value("tuneloop_predict_errors_total", {"model": "sentiment", "version": version}) or 0

    before = errors("v1"), errors("v2")
    with pytest.raises(Overloaded) as e:
        asyncio.run(replica.predict(["too slow"], client=canary_client))
    assert e.value.status == 503 and "did not answer within 0.2s" in e.value.message
    replica.serving = replica.serving.model_copy(update={"request_timeout_s": 30.0})  # past the slow batch
    [answer] = asyncio.run(replica.predict(["in time"], client=production_client))
    assert answer["version"] == "v1"
    assert (errors("v1"), errors("v2")) == (before[0], before[1] + 1)


def test_canary_texts_still_queued_when_the_rollout_turns_shadow_are_answered_by_production(rollout):
    """Routed to the canary on arrival, a text whose batch ran after the rollout became a
    shadow (of the same version, restarted; or the next one) was answered to its user by the
    shadow, logged and counted under it."""
    import time

    replica, registry, _ = rollout
    registry.start_rollout("sentiment", "v2", "canary", 100.0)
    replica._sync_with_registry()
    challenger, real = replica._challenger, replica._challenger.predict
    challenger.predict = lambda texts: time.sleep(0.3) or real(texts)

    async def main():
        running = asyncio.create_task(replica.predict(["the canary's batch"], client="c"))
        await asyncio.sleep(0.1)
        queued = asyncio.create_task(replica.predict(["queued behind it"], client="c"))
        await asyncio.sleep(0.05)
        registry.abort_rollout("sentiment", "v2", reason="test")
        registry.start_rollout("sentiment", "v2", "shadow", 0.0)
        replica._sync_with_registry()  # the watch thread's tick: the same version, no load
        return await running, await queued

    [first], [second] = asyncio.run(main())
    assert replica._rollout.stage == "shadow"
    assert (first["version"], second["version"]) == ("v2", "v1")  # the batch already running was the canary's


def test_shadow_answers_are_logged_under_production_ids_and_never_returned(rollout):
    replica, registry, cfg = rollout
    registry.start_rollout("sentiment", "v2", "shadow", 0)
    replica._sync_with_registry()

    async def main():
        answers = []
        for i in range(5):
            answers += await replica.predict([f"text {i}"])
            await asyncio.sleep(0.05)  # the shadow runs after the answer, when production is idle
        return answers

    answers = asyncio.run(main())
    assert {a["version"] for a in answers} == {"v1"}
    replica.shadow_recorder.close()  # flush
    replica.recorder.close()
    storage, tasks = Storage(cfg.storage.root), {"sentiment": make_task("text-classification", LABELS)}
    shadow, served = PredictionLog(storage, tasks, root=SHADOW_ROOT), PredictionLog(storage, tasks)
    for a in answers:
        assert shadow.lookup(["sentiment"], a["id"])["version"] == "v2"
        assert served.lookup(["sentiment"], a["id"])["version"] == "v1"


def test_shadow_work_is_shed_while_one_runs(rollout):
    replica, registry, _ = rollout
    registry.start_rollout("sentiment", "v2", "shadow", 0)
    replica._sync_with_registry()
    replica._shadowing = 1  # a shadow batch is running
    labels = {"model": "sentiment", "version": "v2"}

    def count(outcome):
        return REGISTRY.get_sample_value("tuneloop_shadow_runs_total", {**labels, "outcome": outcome}) or 0

    before = count("shed"), count("ok")
    asyncio.run(replica.predict(["text"]))
    assert (count("shed"), count("ok")) == (before[0] + 1, before[1])  # none started beside it


def test_a_long_shadow_request_runs_in_the_challengers_batches_and_yields_to_production(rollout):
    """A 64-text request ran in pieces of the configured max_batch_size, all in one call on
    the compute thread, while production's queue waited behind it."""
    replica, registry, _ = rollout
    registry.start_rollout("sentiment", "v2", "shadow", 0)
    replica._sync_with_registry()
    challenger = replica._challenger
    sizes, real = [], challenger.predict

    def counted(texts):
        sizes.append(len(texts))
        return real(texts)

    challenger.predict = counted
    replica._batcher.max_batch_size = 4  # production's adaptive limit, down from 32 (a shadow changes none)
    ids = [f"{i:032x}" for i in range(10)]
    replica._run_shadow(challenger, [f"t{i}" for i in range(10)], ids)
    assert sizes == [4, 4, 2]
    labels = {"model": "sentiment", "version": "v2", "outcome": "shed"}
    shed = REGISTRY.get_sample_value("tuneloop_shadow_runs_total", labels) or 0
    for waiting in ("a batch", "texts"):
        sizes.clear()
        if waiting == "a batch":  # production's batch, chosen, waits for the compute thread
            replica._computing = 1
        else:  # production's texts wait for a batch
            replica._batcher._queue.append(object())
        replica._run_shadow(challenger, [f"t{i}" for i in range(10)], ids)
        replica._computing = 0
        replica._batcher._queue.clear()
        assert sizes == [4]
    assert REGISTRY.get_sample_value("tuneloop_shadow_runs_total", labels) == shed + 2


def _resident_bytes(version: str) -> float | None:
    return REGISTRY.get_sample_value("tuneloop_resident_weight_bytes", {"model": "sentiment", "version": version})


def test_two_versions_resident_at_most_and_a_promoted_challenger_is_not_reloaded(rollout):
    from tuneloop.serving import metrics

    replica, registry, _ = rollout
    for version in ("v2", "v3"):  # the gauge is the process's: an earlier test's replica left these rows set
        metrics.RESIDENT_WEIGHT_BYTES.labels("sentiment", version).set(0)
    registry.start_rollout("sentiment", "v2", "canary", 5.0)
    replica._sync_with_registry()
    challenger = replica._challenger
    assert challenger.version == "v2" and replica.status()["challenger"] == "v2"
    size = sum(p.numel() * 4 for p in challenger.model.parameters())  # fp32 on CPU; buffers on top
    assert size <= challenger.weight_bytes < size * 1.1
    assert replica.status()["resident_weight_bytes"] == {"v1": challenger.weight_bytes, "v2": challenger.weight_bytes}
    assert _resident_bytes("v1") == _resident_bytes("v2") == challenger.weight_bytes
    registry.advance_rollout("sentiment", "v2", [5.0])  # the last step: production
    replica._sync_with_registry()
    assert replica._loaded is challenger and replica._challenger is None
    registry.start_rollout("sentiment", "v3", "shadow", 0)
    replica._sync_with_registry()
    assert (replica._loaded.version, replica._challenger.version) == ("v2", "v3")
    assert _resident_bytes("v1") == 0 and _resident_bytes("v3") == challenger.weight_bytes  # v1 let go
    registry.rollback("sentiment")  # ends v3's rollout
    replica._sync_with_registry()
    assert replica._challenger is None and replica._loaded.version == "v2"
    assert replica.status()["resident_weight_bytes"] == {"v2": challenger.weight_bytes} and _resident_bytes("v3") == 0


def test_a_challenger_whose_files_are_cut_does_not_stop_a_replica_and_is_tried_again(rollout, tmp_path):
    """Its load failure was raised: a new replica's constructor failed (Serve restarts it,
    a crash loop beside a good production), and running ones never took the rollout's
    next state."""
    from pathlib import Path

    from tuneloop.serving import model_server

    replica, registry, cfg = rollout
    weights = Path(registry.local_path("sentiment", "v2"))
    for f in weights.glob("*.safetensors"):
        f.write_bytes(b"cut")
    registry.start_rollout("sentiment", "v2", "canary", 50.0)
    labels = {"model": "sentiment", "version": "v2"}
    failed_loads = REGISTRY.get_sample_value("tuneloop_version_load_failures_total", labels) or 0
    fresh = ModelServer(cfg.model_dump(), "sentiment")  # raised before
    try:
        assert fresh.status()["version"] == "v1" and fresh.status()["challenger"] is None
        assert fresh.status()["rollout"]["version"] == "v2" and "v2" in fresh.status()["failed"]
        answers = asyncio.run(fresh.predict(["a text"], client="anyone"))
        assert answers[0]["version"] == "v1"  # a canary without its challenger: production answers
        fresh._sync_with_registry()
        assert fresh._versions.failed["v2"][2] == 1  # not tried again before its wait is over
        fresh._versions.failed["v2"] = (0.0, *fresh._versions.failed["v2"][1:])
        fresh._sync_with_registry()
        assert fresh._versions.failed["v2"][2] == 2 and fresh._versions.failed["v2"][0] - model_server.time.monotonic() > 15
        registry.abort_rollout("sentiment", "v2")
        fresh._sync_with_registry()
        assert "v2" not in fresh.status()["failed"]  # rolled back: no longer reported as not loaded (/readyz)
        # each failed load counted, for the rollout's health (a challenger that never loads is rolled back)
        assert REGISTRY.get_sample_value("tuneloop_version_load_failures_total", labels) == failed_loads + 2
    finally:
        fresh.__del__()
