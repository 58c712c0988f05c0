"""One local Ray for the whole integration session, one Serve HTTP proxy on a free port,
and tiny random-init BERT models built here (no downloads)."""

from __future__ import annotations

import contextlib
import os
import random
import uuid
from pathlib import Path

import pytest

from tuneloop.serving.fast_path import enable_fast_path, free_port

enable_fast_path(private_haproxy_ports=True)  # the data path users get; before ray is imported
# The local S3 endpoint (s3_root) takes any keys; set before Ray starts so that its workers
# inherit them, and so that no client goes looking for an instance role.
os.environ.update(AWS_ACCESS_KEY_ID="tuneloop-test", AWS_SECRET_ACCESS_KEY="tuneloop-test",
                  AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")

from dataclasses import asdict

from tuneloop.core.auth import new_key
from tuneloop.core.config import TuneloopConfig, parse_config
from tuneloop.store.manifest import Manifest
from tuneloop.store.registry import Registry
from tuneloop.store.storage import Storage
from tests.tiny_models import build_tiny_model

LABELS = ["negative", "positive"]
S3_BUCKET = "tuneloop-test"
RAY_NUM_CPUS = 6  # more logical CPUs than training workers + replicas, or Ray Data starves

# One key per role for the session; configs carry only their hashes.
ADMIN_KEY, _ADMIN = new_key("admin")
FEEDBACK_KEY, _FEEDBACK = new_key("feedback")
PREDICT_KEY, _PREDICT = new_key("predict")
METRICS_KEY, _METRICS = new_key("metrics")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=RAY_NUM_CPUS, include_dashboard=False, log_to_driver=True)
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_port(ray_session) -> int:
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint on loopback (moto's server: the S3 REST API, conditional writes
    included), with a bucket; yields ``host:port``."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket=S3_BUCKET)
    yield f"{host}:{port}"
    server.stop()


@pytest.fixture
def s3_root(s3_endpoint) -> str:
    """A fresh storage root on the local S3 endpoint, as a user would write it."""
    return f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:12]}?endpoint_override={s3_endpoint}&scheme=http"


@pytest.fixture(scope="session")
def metrics_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("prom"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path  # the test process renders /metrics-like output too
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-bert"), LABELS)


@pytest.fixture(scope="session")
def seed_tsv(tmp_path_factory) -> str:
    rng = random.Random(0)
    good = ["great", "wonderful", "excellent", "lovely", "superb"]
    bad = ["awful", "terrible", "boring", "dreadful", "poor"]
    things = ["film", "phone", "hotel", "meal", "book", "show", "game", "song"]
    rows = [(f"the {t} was {a}", "positive") for t in things for a in good]
    rows += [(f"the {t} was {a}", "negative") for t in things for a in bad]
    rng.shuffle(rows)
    path = tmp_path_factory.mktemp("seed") / "seed.tsv"
    path.write_text("text\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in rows))
    return str(path)


def make_config(root: Path, base_model: str, seed: str | None, model: dict | None = None,
                **sections) -> TuneloopConfig:
    """The tests' config: one model (``sentiment`` unless ``model`` says otherwise), and
    ``sections`` merged over the defaults here."""
    doc = {
        "models": [{"name": "sentiment", "base_model": base_model, "labels": LABELS, "seed_dataset": seed,
                    **(model or {})}],
        "storage": {"root": str(root)},
        "serving": {"max_batch_size": 8, "max_inputs_per_request": 8,
                    "max_chars_per_input": 200, "reload_interval_s": 0.5, "num_cpus_per_replica": 1},
        "training": {"epochs": 1, "batch_size": 8, "max_length": 32, "num_workers": 2, "zero_stage": 2},
        "auth": {"keys": [asdict(k) for k in (_ADMIN, _FEEDBACK, _PREDICT, _METRICS)], "create_admin_key": False},
        "feedback": {"compact_interval_s": 0.5},
        "predictions": {"flush_interval_s": 0.2},
        # Jobs' ONNX export and speed runs: ~10 s each; tests/integration/test_optimize.py has them.
        "optimize": {"enabled": False},
    }
    for key, value in sections.items():
        doc[key] = {**doc.get(key, {}), **value}
    return parse_config(doc)


def publish_version(cfg: TuneloopConfig, weights: str, promote: bool = True, tables: dict | None = None) -> str:
    """Put a saved model into the registry directly (serving tests need no training);
    ``tables`` as a job publishes them beside it (``trained_on``: its training rows)."""
    registry = Registry(Storage(cfg.storage.root))
    m = cfg.models[0]
    manifest = registry.publish(m.name, weights, Manifest(version="pending", model=m.name, parent=registry.production(m.name),
                                                          base_model=m.base_model, task=m.task, labels=m.labels),
                                tables=tables)
    if promote:
        registry.promote(m.name, manifest.version, reason="test")
    return manifest.version


def wait_controller_gone(cfg: TuneloopConfig, why: str, timeout_s: float = 30.0) -> None:
    """Until the retrain controller of ``cfg`` has left (control/apps.py retires it)."""
    import time

    import ray

    from tuneloop.core.names import CONTROLLER_NAMESPACE, controller_name

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get_actor(controller_name(cfg.digest()), namespace=CONTROLLER_NAMESPACE)
        except ValueError:
            return
        assert time.monotonic() < deadline, why
        time.sleep(0.5)


@contextlib.contextmanager
def served(cfg: TuneloopConfig, metrics_dir: str, serve_port: int, with_controller: bool = False,
           timeout_s: float = 180):
    """The config's applications deployed (its published versions; the retrain controller
    too when ``with_controller``) and ready; yields the base URL, and undeploys after."""
    from tuneloop.control.apps import deploy as deploy_with_controller
    from tuneloop.control.server import wait_ready
    from tuneloop.core.names import CONTROLLER_APP
    from tuneloop.serving.app import application_names, deploy, undeploy

    (deploy_with_controller if with_controller else deploy)(cfg, metrics_dir)
    url = f"http://127.0.0.1:{serve_port}"
    apps = [name for name in application_names(cfg) if with_controller or name != CONTROLLER_APP]
    try:
        wait_ready(url, timeout_s=timeout_s, apps=apps)
        yield url
    finally:
        undeploy(cfg)


@contextlib.contextmanager
def trained_and_served(cfg: TuneloopConfig, model: str, metrics_dir: str, serve_port: int):
    """v1 of ``model`` trained by a real job, then served (``served``); yields the base URL
    and the job's outcome."""
    from tuneloop.training.launcher import run_training

    outcome = run_training(cfg, model, trigger="bootstrap")
    with served(cfg, metrics_dir, serve_port) as url:
        yield url, outcome
