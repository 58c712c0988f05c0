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
from tuneloop.core.names import CONTROLLER_NAME, CONTROLLER_NAMESPACE
from tests.integration.conftest import PREDICT_KEY, bearer, make_config, publish_version


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
                ray.get_actor(CONTROLLER_NAME, namespace=CONTROLLER_NAMESPACE)
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
