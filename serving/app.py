"""tuneloop's Serve applications, from the config: one per model, and the ingress.

Each model is an application of its own, routed at exactly ``/v1/models/<model>/predict``:
HAProxy matches the longest route prefix, so predict requests go straight to the model's
replicas, one process hop, and every other path falls through to the FastAPI ingress at
``/`` (feedback, jobs, model listings, health, metrics, and a 404 for unknown models).
"""

from __future__ import annotations

import os
import time

import ray
from ray import serve

from tuneloop.core.config import TuneloopConfig
from tuneloop.serving.ingress import Ingress
from tuneloop.serving.metrics import MULTIPROC_ENV
from tuneloop.serving.model_server import ModelServer, in_flight_limit
from tuneloop.core.names import INGRESS_APP, model_app_name, model_deployment_name, predict_route


def _cores(cfg: TuneloopConfig) -> int:
    """Cores the replicas may spread over: the cluster's when joining one, else this
    machine's (a local Ray's logical CPUs are set above the cores, for Ray Data's tasks)."""
    if cfg.ray.address:
        return int(ray.cluster_resources().get("CPU", 1))
    return os.cpu_count() or 1


def deploy(cfg: TuneloopConfig, metrics_dir: str | None = None) -> None:
    """Deploy (or update) every model application, then the ingress; returns at once."""
    s = cfg.serving
    env = {"runtime_env": {"env_vars": {MULTIPROC_ENV: metrics_dir}}} if metrics_dir else {}
    for m in cfg.models:
        options = {
            "name": model_deployment_name(m.name),
            "ray_actor_options": {"num_cpus": s.num_cpus_per_replica, "num_gpus": s.num_gpus_per_replica, **env},
            # The replica bounds what it holds itself (in_flight_limit) and answers 503 in
            # JSON past it; Serve's own limit sits above so that it never answers first.
            "max_ongoing_requests": in_flight_limit(s) + s.max_batch_size,
        }
        if s.num_replicas is not None:
            options["num_replicas"] = s.num_replicas
        else:
            options["autoscaling_config"] = s.autoscaling.serve_config(s.num_cpus_per_replica, _cores(cfg))
        app = serve.deployment(ModelServer).options(**options).bind(cfg.model_dump(), m.name)
        serve.run(app, name=model_app_name(m.name), route_prefix=predict_route(m.name), blocking=False)
    ingress = Ingress.options(ray_actor_options={"num_cpus": 0, **env})
    serve.run(ingress.bind(cfg.model_dump()), name=INGRESS_APP, route_prefix="/", blocking=False)


def undeploy(cfg: TuneloopConfig, timeout_s: float = 120.0) -> None:
    """Delete every application at once (each replica drains for a while), then wait."""
    names = [INGRESS_APP, *(model_app_name(m.name) for m in cfg.models)]
    for name in names:
        serve.delete(name, _blocking=False)
    deadline = time.monotonic() + timeout_s
    while set(serve.status().applications) & set(names):
        if time.monotonic() > deadline:
            raise TimeoutError(f"applications {names} still present after {timeout_s:.0f}s")
        time.sleep(0.5)
