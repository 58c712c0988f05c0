"""Two Ray nodes on one machine, as on a cluster: `ray start --head` (the journal, hence the
ingress and the controller, and training) and `ray start --address=…` (the model replicas),
each with its own resources; storage in a bucket on the local S3 endpoint. The rendered Serve
config goes in with `serve deploy` (the RayService path); predictions are served from the
second node, feedback arrives, a retrain runs its workers on the head's node, and the new
version is served. The ingress's /metrics has the other node's replica's counts, labelled with
that node, and both
nodes' Ray exporters answer.

Its own pytest run (`make cluster-test`; kept out of `make test` for time): it starts
Ray clusters of its own, which cannot share a process with the test session's local Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tuneloop.control.manifests import serve_config
from tuneloop.serving.fast_path import free_port
from tests.integration.conftest import (ADMIN_KEY, FEEDBACK_KEY, PREDICT_KEY, bearer, make_config,
                                        publish_version)

pytestmark = pytest.mark.cluster
RAY = str(Path(sys.executable).with_name("ray"))
SERVE = str(Path(sys.executable).with_name("serve"))


def _run(*argv: str, timeout: float = 180) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # Ray's token authentication, as on a real cluster: `ray start --head` makes the token
    # (~/.ray/auth_token); the second node and this driver opt in to present it. Ray reads the
    # setting when it is imported, so this module imports nothing that imports ray: set at
    # collection, it would reach the test session's own local Ray in `make test`'s main run.
    assert "ray" not in sys.modules, "ray was imported before the two-node cluster could set RAY_AUTH_MODE"
    os.environ["RAY_AUTH_MODE"] = "token"
    ports = {name: free_port() for name in ("gcs", "dashboard", "head_metrics", "node_metrics", "agent", "agent_grpc",
                                            "runtime_env")}
    # The head: the journal (ingress, controller) and training; the other node: the replicas.
    _run(RAY, "start", "--head", f"--port={ports['gcs']}", "--node-ip-address=127.0.0.1", "--num-cpus=4",
         f"--resources={json.dumps({'tuneloop-journal': 1, 'training-node': 10})}",
         f"--metrics-export-port={ports['head_metrics']}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={ports['dashboard']}", "--disable-usage-stats")
    try:
        # A second node of the same machine: every port of its own.
        _run(RAY, "start", f"--address=127.0.0.1:{ports['gcs']}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
             f"--resources={json.dumps({'serving-node': 10})}", f"--metrics-export-port={ports['node_metrics']}",
             f"--dashboard-agent-listen-port={ports['agent']}", f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
             f"--runtime-env-agent-port={ports['runtime_env']}", "--disable-usage-stats")
        import ray

        ray.init(address=f"127.0.0.1:{ports['gcs']}", _node_ip_address="127.0.0.1")
        nodes = {name: next(n["NodeID"] for n in ray.nodes() if n["Alive"] and name in n["Resources"])
                 for name in ("serving-node", "training-node")}
        assert nodes["serving-node"] != nodes["training-node"]
        yield {"ports": ports, "nodes": nodes}
    finally:
        try:
            from ray import serve

            serve.shutdown()
        finally:
            import ray

            ray.shutdown()
            _stop_cluster(ports["gcs"])


def _stop_cluster(gcs_port: int) -> None:
    """Stop this cluster's processes only (`ray stop` would stop every Ray of the machine,
    a `tuneloop run` included): each one names the cluster's GCS address or port on its
    command line."""
    import psutil

    mine = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(arg.endswith((f":{gcs_port}", f"={gcs_port}")) for arg in proc.info["cmdline"] or ()):
                mine += [proc, *proc.children(recursive=True)]  # agents rename themselves: found as children
        except psutil.Error:
            continue
    for proc in mine:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(mine, timeout=15)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    # As `ray stop` does: the next ray.init() on this machine would otherwise try to join
    # the cluster `ray start` recorded here, long gone (and fail when given num_cpus).
    current = Path(tempfile.gettempdir(), "ray", "ray_current_cluster")
    if current.exists() and current.read_text().strip().endswith(f":{gcs_port}"):
        current.unlink()


def _actors(cluster, prefix: str) -> list:
    from ray.util.state import list_actors

    address = f"http://127.0.0.1:{cluster['ports']['dashboard']}"
    return [a for a in list_actors(address=address, limit=1000, detail=True) if a.class_name.startswith(prefix)]


def test_serving_on_one_node_training_on_the_other(cluster, s3_root, tiny_model, seed_tsv, tmp_path):
    from ray import serve

    from tuneloop.control.server import wait_ready

    from tuneloop.store.registry import Registry
    from tuneloop.store.storage import Storage

    storage = Storage(s3_root)
    storage.write_bytes_atomic("seed/seed.tsv", Path(seed_tsv).read_bytes())
    base, query = s3_root.split("?")
    cfg = make_config(tmp_path, tiny_model, f"{base}/seed/seed.tsv?{query}",
                      storage={"root": s3_root, "journal_dir": str(tmp_path / "journal")},
                      serving={"resources_per_replica": {"serving-node": 1}, "num_replicas": 1},
                      training={"max_steps": 2, "learning_rate": 1e-7, "resources_per_worker": {"training-node": 1}},
                      gate={"golden_margin": 0.2, "class_recall_margin": 0.5})
    publish_version(cfg, tiny_model)
    config_file = tmp_path / "tuneloop.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    rendered = {**serve_config(cfg, str(config_file)), "http_options": {"host": "127.0.0.1", "port": port}}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(rendered))
    _run(SERVE, "deploy", str(tmp_path / "serve.yaml"), "--address", f"http://127.0.0.1:{cluster['ports']['dashboard']}")
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, timeout_s=240)

    with httpx.Client(base_url=url, timeout=60) as client:
        answer = client.post("/v1/models/sentiment/predict", json={"inputs": [f"the film was {w}" for w in
                                                                             ("great", "awful", "fine")]},
                             headers=bearer(PREDICT_KEY))
        assert answer.status_code == 200, answer.text
        predictions = answer.json()["predictions"]
        assert {p["version"] for p in predictions} == {"v1"}
        replicas = [a for a in _actors(cluster, "ServeReplica:tuneloop-model-sentiment") if a.state == "ALIVE"]
        assert replicas and {a.node_id for a in replicas} == {cluster["nodes"]["serving-node"]}
        for p in predictions:
            stored = client.post("/v1/feedback", json={"prediction_id": p["id"], "label": "positive"},
                                 headers=bearer(FEEDBACK_KEY))
            assert stored.status_code == 202, stored.text
        started = client.post("/v1/models/sentiment/retrain", headers=bearer(ADMIN_KEY))
        assert started.status_code == 202, started.text
        job_id = started.json()["job_id"]
        deadline = time.monotonic() + 420
        while (job := client.get(f"/v1/jobs/{job_id}", headers=bearer(ADMIN_KEY)).json())["state"] == "running":
            assert time.monotonic() < deadline, f"job {job_id} still running"
            time.sleep(2)
        assert job["state"] == "succeeded" and job["version"] == "v2" and job["promoted"], job
        workers = _actors(cluster, "RayTrainWorker")
        assert workers and {a.node_id for a in workers} == {cluster["nodes"]["training-node"]}
        deadline = time.monotonic() + 60
        while client.post("/v1/models/sentiment/predict", json={"inputs": ["again"]},
                          headers=bearer(PREDICT_KEY)).json()["predictions"][0]["version"] != "v2":
            assert time.monotonic() < deadline, "v2 never served"
            time.sleep(1)
        tuneloop_metrics = client.get("/metrics").text
    # The job read its seed from the bucket and left everything there, Ray Train's run folder too.
    assert Registry(storage).manifest("sentiment", "v2").data["seed"]["sha256"]
    assert storage.list_files("registry/sentiment/v2", ".safetensors") and storage.list_files("train_runs")
    # Counted by the replica on the other node, gathered by the ingress (serving/metric_files.py).
    # One series per node (serving/metrics.py, FilesCollector): these are the serving node's.
    requests = {(s.labels["node"], s.labels["version"], s.labels["outcome"])
                for f in text_string_to_metric_families(tuneloop_metrics) if f.name == "tuneloop_requests"
                for s in f.samples if s.name == "tuneloop_requests_total"}
    assert (cluster["nodes"]["serving-node"][:12], "v2", "ok") in requests, requests
    assert 'tuneloop_training_runs_total{model="sentiment",outcome="succeeded"}' in tuneloop_metrics
    for node in ("head_metrics", "node_metrics"):  # Ray's exporter on each node
        scraped = httpx.get(f"http://127.0.0.1:{cluster['ports'][node]}/metrics", timeout=30)
        assert scraped.status_code == 200 and "ray_node_cpu_count" in scraped.text, node
