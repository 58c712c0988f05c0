"""The whole loop over HTTP: predict, send feedback, the trigger retrains through the
controller actor, and predictions then report the new version, without a restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tuneloop.store.jobs import JobStore
from tuneloop.store.server_file import remove_server_file, write_server_file
from tuneloop.store.storage import Storage
from tests.integration.conftest import ADMIN_KEY, FEEDBACK_KEY, bearer, make_config, wait_controller_gone

TRIGGER_EVERY = 4


@pytest.fixture
def loop(ray_session, serve_port, metrics_dir, tiny_model, seed_tsv, tmp_path):
    import ray

    from tuneloop.core.names import CONTROLLER_NAMESPACE, controller_name
    from tuneloop.control.server import bootstrap_versions, start_serving, wait_ready
    from tuneloop.serving.app import application_names, undeploy

    # No background compaction: the job itself must ask the ingress to compact its journal.
    # A learning rate this small leaves the candidate's answers production's, and the margins
    # absorb any one golden row's flip: the gate accepts v2 every run, so the test can insist
    # on it (the gate's own decisions are unit-tested in tests/unit/test_gate.py).
    cfg = make_config(tmp_path / "store", tiny_model, seed_tsv, training={"max_steps": 2, "learning_rate": 1e-7},
                      gate={"golden_margin": 0.2, "class_recall_margin": 0.5},
                      trigger={"every_n_feedback": TRIGGER_EVERY}, feedback={"compact_interval_s": 3600})
    bootstrap_versions(cfg)  # trains v1, as `tuneloop run` does on an empty registry
    start_serving(cfg, metrics_dir)
    url = f"http://127.0.0.1:{serve_port}"
    wait_ready(url, apps=application_names(cfg))  # the controller too: it counts the feedback below
    yield {"url": url, "cfg": cfg}
    # The controller is the keeper application's (control/apps.py): it goes with it.
    assert ray.get_actor(controller_name(cfg.digest()), namespace=CONTROLLER_NAMESPACE) is not None
    undeploy(cfg)
    wait_controller_gone(cfg, "the retrain controller outlived its keeper")


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

        assert job.state == "succeeded" and job.version == "v2" and job.promoted, job.model_dump()
        registry = Registry(Storage(cfg.storage.root))
        manifest = registry.manifest("sentiment", "v2")
        fb = manifest.data["feedback"]
        assert fb["fresh_rows"] + fb["on_golden_texts"] == 4  # feedback on golden texts never trains
        assert manifest.gate.accepted and [c.name for c in manifest.gate.checks if c.passed] == ["golden", "fresh",
                                                                                                "sanity"]
        # Replicas picked the new production up within their reload interval, and the job
        # waited for that to time the version's way from feedback to serving.
        r = c.post("/v1/models/sentiment/predict", json={"inputs": ["is it v2 yet"]})
        assert r.json()["predictions"][0]["version"] == "v2"
        timing = manifest.serving_time
        assert timing == job.serving_time and timing.total_s is not None
        assert all(timing.phases[p] is not None for p in ("waiting_for_trigger", "queueing", "training",
                                                          "evaluation", "publishing", "rollout"))
        assert timing.phases["optimizing"] is None  # optimize.enabled false: no artifacts
        assert timing.total_s >= sum(s for s in timing.phases.values() if s is not None) - 0.01  # the phases tile it
        assert timing.serving_all_at >= manifest.created_at
        assert c.get(f"/v1/jobs/{job.job_id}").status_code == 401  # job records are for admins
        status = c.get(f"/v1/jobs/{job.job_id}", headers=bearer(ADMIN_KEY)).json()
        assert status["state"] == "succeeded" and status["version"] == "v2" and status["promoted"] is True
        detail = c.get("/v1/models/sentiment", headers=bearer(ADMIN_KEY)).json()
        assert detail["production"] == "v2"
        v2 = next(v for v in detail["versions"] if v["version"] == "v2")
        assert v2["gate"]["accepted"] is True
        metrics = c.get("/metrics").text
        assert 'tuneloop_training_runs_total{model="sentiment",outcome="succeeded"}' in metrics
        assert f'tuneloop_feedback_to_serving_seconds{{model="sentiment",phase="total",version="v2"}} {timing.total_s}' \
            in metrics

    # Lineage: the first prediction was served by v1; its feedback trained v2 unless its text
    # is in the golden set.
    from tuneloop.control.lineage import prediction_lineage
    from tuneloop.core.tasks import model_tasks
    from tuneloop.store.records import PredictionLog

    log = PredictionLog(Storage(cfg.storage.root), model_tasks(cfg.models))
    found = prediction_lineage(registry, log, ["sentiment"], first["id"])
    assert found["prediction"]["version"] == "v1" and [v["version"] for v in found["ancestry"]] == ["v1"]
    on_golden = "the meal was superb" in registry.golden("sentiment").column("text").to_pylist()
    assert found["feedback_trained_by"] == ([] if on_golden else ["v2"])
    v2_lineage = registry.table("sentiment", "v2", "trained_on").to_pylist()
    assert sum(r["source"] == "feedback" for r in v2_lineage) == fb["trained_rows"]

    # An operator's `tuneloop train` in another terminal joins the running server's Ray (the
    # address its server file names, with Ray's token), trains beside the replicas and
    # promotes v3, which they then serve.
    import ray

    config_path = Path(cfg.storage.root).parent / "tuneloop.yaml"
    config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    write_server_file(Storage(cfg.storage.root), ray.get_runtime_context().gcs_address)
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
        trained = subprocess.run([str(Path(sys.executable).with_name("tuneloop")), "train", "sentiment", "--config",
                                  str(config_path)], capture_output=True, text=True, timeout=300, env=env)
    finally:
        remove_server_file(Storage(cfg.storage.root))
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "joining the Ray cluster of the running `tuneloop run`" in trained.stderr
    for noise in ("PlacementGroupCleaner", "LongPollClient"):  # Ray's: every second of a job, at its end
        assert noise not in trained.stderr, trained.stderr[-3000:]
    assert '"version": "v3"' in trained.stdout and '"promoted": true' in trained.stdout, trained.stdout[-2000:]
    assert json.loads(trained.stdout)["state"] == "succeeded"  # stdout is one JSON document (`> job.json`, jq)
    assert "gate: " in trained.stderr
    deadline = time.monotonic() + 30
    version = None
    while time.monotonic() < deadline and version != "v3":
        version = httpx.post(f"{url}/v1/models/sentiment/predict", json={"inputs": ["v3?"]},
                             timeout=30).json()["predictions"][0]["version"]
        time.sleep(0.5)
    assert version == "v3"

    # The keeper replaces a retrain controller that died. The ingress's handle to the dead
    # one is looked up again, and a retrain request reaches the new controller: a job record
    # (as a `tuneloop train` beside the server writes) holds the model, so it answers 409.
    # Kept for good, the handle made it a 500, and the triggers went nowhere.
    from tuneloop.core.names import CONTROLLER_NAMESPACE, controller_name

    name = controller_name(cfg.digest())
    dead = ray.get_actor(name, namespace=CONTROLLER_NAMESPACE)
    holder = jobs.create("sentiment", "manual")
    try:
        with httpx.Client(base_url=url, timeout=30, headers=bearer(ADMIN_KEY)) as c:
            assert c.post("/v1/models/sentiment/retrain", json={}).status_code == 409
            ray.kill(dead, no_restart=True)
            deadline, new = time.monotonic() + 120, None
            while time.monotonic() < deadline:
                try:
                    new = ray.get_actor(name, namespace=CONTROLLER_NAMESPACE)
                    if new._actor_id != dead._actor_id:
                        break
                except ValueError:
                    pass  # between the two
                time.sleep(1)
            assert new is not None and new._actor_id != dead._actor_id, "the keeper started no new controller"
            again = c.post("/v1/models/sentiment/retrain", json={})
            assert again.status_code == 409 and "already running" in again.json()["error"]["message"], again.text
    finally:
        jobs.fail_running(holder, "held the model for the test")
