"""The Serve config file that `tuneloop deploy render` writes, deployed the way `serve deploy`
and a KubeRay RayService deploy it: handed to Serve's controller, which calls the builder
(``tuneloop.control.apps:build``) with each application's args. Then real HTTP."""

from __future__ import annotations

import time

import httpx
import pytest
import yaml

from tuneloop.control.manifests import serve_config
from tuneloop.control.server import wait_ready
from tuneloop.core.names import CONTROLLER_NAMESPACE, controller_name
from tests.integration.conftest import PREDICT_KEY, bearer, make_config, publish_version, wait_controller_gone


def test_the_rendered_serve_config_deploys_every_application(ray_session, serve_port, tiny_model, tmp_path):
    import ray
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from tuneloop.serving.app import undeploy

    cfg = make_config(tmp_path / "store", tiny_model, None)
    publish_version(cfg, tiny_model)
    config_file = tmp_path / "tuneloop.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    rendered = serve_config(cfg, str(config_file))
    # The proxy of this test session is already up on its own port: deploy the applications.
    schema = ServeDeploySchema.model_validate({"applications": rendered["applications"]})
    # What Serve's REST API does with `serve deploy` and KubeRay's serveConfigV2 (private API:
    # the public entry is HTTP to the dashboard, which these tests do not run).
    _get_global_client().deploy_apps(schema)
    url = f"http://127.0.0.1:{serve_port}"
    try:
        wait_ready(url, timeout_s=180)
        answer = httpx.post(f"{url}/v1/models/sentiment/predict", json={"inputs": ["a fine film"]},
                            headers=bearer(PREDICT_KEY), timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"][0]["version"] == "v1"
        deadline = time.monotonic() + 60
        while True:  # the controller's keeper started it: retraining works without a driver
            try:
                ray.get_actor(controller_name(cfg.digest()), namespace=CONTROLLER_NAMESPACE)
                break
            except ValueError:
                assert time.monotonic() < deadline, "no retrain controller after the config deploy"
                time.sleep(1)
    finally:
        undeploy(cfg)


def test_the_builder_refuses_bad_args_before_any_replica_starts(tmp_path):
    from tuneloop.control.apps import build

    cfg = make_config(tmp_path / "store", "some-model", None)
    config_file = tmp_path / "tuneloop.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    with pytest.raises(ValueError, match="unknown args \\['modell'\\]"):
        build({"config": str(config_file), "modell": "x"})
    with pytest.raises(ValueError, match="neither ingress, controller nor a model"):
        build({"config": str(config_file), "app": "nope"})


@pytest.mark.cluster  # `make cluster-test`: a real training job, ~2.5 min, past make test's budget
def test_a_changed_config_hands_the_controller_over_and_its_job_finishes(ray_session, serve_port, metrics_dir,
                                                                        tiny_model, seed_tsv, tmp_path):
    """A config change rolls the controller's keeper: the old controller, detached, finishes
    the job it started (a job is its controller's task and would die with it), starts no
    other, and leaves; the new config's controller takes over."""
    import ray
    from ray import serve

    from tuneloop.control.apps import controller_app, deploy
    from tuneloop.core.names import CONTROLLER_APP
    from tuneloop.serving.app import undeploy
    from tuneloop.store.jobs import JobStore
    from tuneloop.store.storage import Storage

    def controller(c, timeout_s=60):
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return ray.get_actor(controller_name(c.digest()), namespace=CONTROLLER_NAMESPACE)
            except ValueError:
                assert time.monotonic() < deadline, "no retrain controller"
                time.sleep(0.5)

    cfg = make_config(tmp_path / "store", tiny_model, seed_tsv, training={"max_steps": 2, "learning_rate": 1e-7},
                      gate={"golden_margin": 0.2, "class_recall_margin": 0.5})
    publish_version(cfg, tiny_model)
    deploy(cfg, metrics_dir)
    try:
        wait_ready(f"http://127.0.0.1:{serve_port}", timeout_s=180)
        job_id = ray.get(controller(cfg).start.remote("sentiment"))
        assert job_id is not None
        changed = cfg.model_copy(update={"trigger": cfg.trigger.model_copy(update={"every_n_feedback": 7})})
        serve.run(controller_app(changed), name=CONTROLLER_APP, route_prefix=None, blocking=False)
        assert ray.get(controller(changed).status.remote())["running"] == ["sentiment"]  # the old one's job
        jobs = JobStore(Storage(cfg.storage.root))
        deadline = time.monotonic() + 300
        while (job := jobs.get(job_id)).state == "running":
            assert time.monotonic() < deadline, f"job {job_id} still running"
            time.sleep(2)
        assert job.state in {"succeeded", "rejected"}, job.error  # ran to its end: not lost
        wait_controller_gone(cfg, "the old controller outlived its job")  # retired once its job ended
        assert ray.get(controller(changed).status.remote())["running"] == []
    finally:
        undeploy(cfg)
