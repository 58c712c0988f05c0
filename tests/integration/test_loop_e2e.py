"""The whole loop over HTTP: predict, send feedback, the trigger retrains through the
controller actor, and predictions then report the new version, without a restart."""

from __future__ import annotations

import time

import httpx
import pytest

from tuneloop.store.jobs import JobStore
from tuneloop.store.storage import Storage
from tests.integration.conftest import ADMIN_KEY, FEEDBACK_KEY, bearer, make_config

TRIGGER_EVERY = 4


@pytest.fixture
def loop(ray_session, serve_port, metrics_dir, tiny_model, seed_tsv, tmp_path):
    import ray

    from tuneloop.core.names import CONTROLLER_NAME, CONTROLLER_NAMESPACE
    from tuneloop.control.server import bootstrap_versions, start_serving, wait_ready
    from tuneloop.serving.app import undeploy

    # No background compaction: the job itself must ask the ingress to compact its journal.
    cfg = make_config(tmp_path / "store", tiny_model, seed_tsv, training={"max_steps": 2},
                      trigger={"every_n_feedback": TRIGGER_EVERY}, feedback={"compact_interval_s": 3600})
    bootstrap_versions(cfg)  # trains v1, as `tuneloop run` does on an empty registry
    controller = start_serving(cfg, metrics_dir)
    url = f"http://127.0.0.1:{serve_port}"
    wait_ready(url)
    yield {"url": url, "cfg": cfg}
    undeploy(cfg)
    assert ray.get_actor(CONTROLLER_NAME, namespace=CONTROLLER_NAMESPACE) is not None
    ray.kill(controller)


def test_feedback_triggers_a_new_version_that_takes_over(loop):
    url, cfg = loop["url"], loop["cfg"]
    with httpx.Client(base_url=url, timeout=30) as c:
        preds = c.post("/v1/models/sentiment/predict", json={"inputs": ["the meal was superb", "the game was poor"]})
        assert preds.status_code == 200
        first, second = preds.json()["predictions"]
        assert first["version"] == second["version"] == "v1"
        answers = [
            {"prediction_id": first["id"], "label": "positive"},
            {"prediction_id": second["id"], "label": "negative"},
            {"model": "sentiment", "text": "the song was lovely", "label": "positive"},
        ]
        for body in answers:
            assert c.post("/v1/feedback", json=body, headers=bearer(FEEDBACK_KEY)).status_code == 202
        time.sleep(1)
        assert JobStore(Storage(cfg.storage.root)).all()[-1].trigger == "bootstrap"  # 3 < 4: no job yet
        last = c.post("/v1/feedback", json={"model": "sentiment", "text": "the book was dreadful", "label": "negative"},
                      headers=bearer(FEEDBACK_KEY))
        assert last.status_code == 202

        jobs = JobStore(Storage(cfg.storage.root))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(j.trigger == "feedback" for j in jobs.all()):
            time.sleep(0.2)
        # A manual retrain while the triggered job runs: refused, one job per model at a time.
        busy = c.post("/v1/models/sentiment/retrain", json={}, headers=bearer(ADMIN_KEY))
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "conflict"
        deadline = time.monotonic() + 300
        triggered = []
        while time.monotonic() < deadline:
            time.sleep(1)
            r = c.post("/v1/models/sentiment/predict", json={"inputs": ["still serving?"]})
            assert r.status_code == 200  # serving never stops while training runs
            triggered = [j for j in jobs.all() if j.trigger == "feedback"]
            if triggered and triggered[0].state != "running":
                break
        assert len(triggered) == 1, [j.model_dump() for j in jobs.all()]
        job = triggered[0]
        # The job trained on all four records, though none was compacted by the clock: the
        # job asked the ingress (through a Serve handle) to compact first.
        from tuneloop.store.registry import Registry

        if job.version:
            manifest = Registry(Storage(cfg.storage.root)).manifest("sentiment", job.version)
            fb = manifest.data["feedback"]
            assert fb["fresh_rows"] + fb["on_golden_texts"] == 4  # feedback on golden texts never trains
            # The verdict is the one its recorded checks give.
            assert manifest.gate.accepted == all(c.passed for c in manifest.gate.checks)
            assert job.state == ("succeeded" if manifest.gate.accepted else "rejected")
        # Replicas pick the new production up within their reload interval.
        version = "v1"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and version == "v1":
            r = c.post("/v1/models/sentiment/predict", json={"inputs": ["is it v2 yet"]})
            version = r.json()["predictions"][0]["version"]
            if job.state != "succeeded":
                break
            time.sleep(0.5)
        if job.state == "rejected":  # a tiny random model may fail the gate: then v1 must stay
            assert version == "v1" and job.version == "v2"
            return
        assert job.state == "succeeded", job.error
        assert version == "v2"
        assert c.get(f"/v1/jobs/{job.job_id}").status_code == 401  # job records are for admins
        status = c.get(f"/v1/jobs/{job.job_id}", headers=bearer(ADMIN_KEY)).json()
        assert status["state"] == "succeeded" and status["version"] == "v2" and status["promoted"] is True
        detail = c.get("/v1/models/sentiment", headers=bearer(ADMIN_KEY)).json()
        assert detail["production"] == "v2"
        v2 = next(v for v in detail["versions"] if v["version"] == "v2")
        assert v2["gate"]["accepted"] is True
        metrics = c.get("/metrics").text
        assert 'tuneloop_training_runs_total{model="sentiment",outcome="succeeded"}' in metrics
