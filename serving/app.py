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
from ray.serve import Application

from tuneloop.core.config import TuneloopConfig, cluster_to_join
from tuneloop.serving.ingress import Ingress
from tuneloop.serving.metrics import MULTIPROC_ENV
from tuneloop.serving.model_server import ModelServer, in_flight_limit
from tuneloop.core.names import (CONTROLLER_APP, INGRESS_APP, JOURNAL_RESOURCE, model_app_name, model_deployment_name,
                                 predict_route)
from tuneloop.store.storage import private_temp_dir


def default_metrics_dir() -> str:
    return os.path.join(private_temp_dir("tuneloop-metrics"), "serve")


def _on_a_cluster(cfg: TuneloopConfig) -> bool:
    return ray.is_initialized() and bool(cluster_to_join(cfg.ray.address, os.environ.get("RAY_ADDRESS"))
                                         or not ray_is_local())


def _cores(cfg: TuneloopConfig) -> int:
    """Cores the replicas may spread over: the cluster's when part of one, else this
    machine's (a local Ray's logical CPUs are set above the cores, for Ray Data's tasks), or
    that local Ray's CPUs where they are fewer: replicas beyond them would wait unplaced."""
    if _on_a_cluster(cfg):
        return int(ray.cluster_resources().get("CPU", 1))
    return min(os.cpu_count() or 1, cfg.ray.num_cpus or os.cpu_count() or 1)


def _training_cpus(cfg: TuneloopConfig) -> float:
    """The CPUs a training job of this config takes from the replicas' cores: on one machine,
    the largest job's. A cluster's jobs run on nodes (or a RayJob cluster) of their own."""
    if _on_a_cluster(cfg):
        return 0.0
    return cfg.largest_job_cpus()


def _gpu_ceiling(cfg: TuneloopConfig) -> dict[str, float]:
    """On one machine, its GPUs and those the largest training job takes from the replicas:
    ``serve_config``'s GPU arguments. On a cluster none: GPU nodes an autoscaler adds later
    are not up yet when the application is built (0 GPUs held the ceiling at 1 replica)."""
    if _on_a_cluster(cfg) or not ray.is_initialized():
        return {}
    return {"num_gpus_per_replica": cfg.serving.num_gpus_per_replica,
            "gpus": float(ray.cluster_resources().get("GPU", 0.0)), "reserved_gpus": cfg.largest_job_gpus()}


SHUTDOWN_SLACK_S = 20.0  # Serve's draining before a replica's requests end, and the log flush after


def ray_is_local() -> bool:
    """Whether Ray is this one machine (one node)."""
    return len([n for n in ray.nodes() if n.get("Alive")]) <= 1


def _env(metrics_dir: str | None) -> dict:
    return {"runtime_env": {"env_vars": {MULTIPROC_ENV: metrics_dir}}} if metrics_dir else {}


def model_app(cfg: TuneloopConfig, model: str, metrics_dir: str | None) -> Application:
    s = cfg.serving
    options = {
        "name": model_deployment_name(model),
        "ray_actor_options": {"num_cpus": s.num_cpus_per_replica, "num_gpus": s.num_gpus_per_replica,
                              **({"resources": dict(s.resources_per_replica)} if s.resources_per_replica else {}),
                              **_env(metrics_dir)},
        # The replica bounds what it holds itself (in_flight_limit) and answers 503 in
        # JSON past it; Serve's own limit sits above so that it never answers first.
        "max_ongoing_requests": in_flight_limit(s) + s.max_batch_size,
        # Long enough for what a replica holds when Serve stops it (a config change, a scale
        # down): its requests, each its body's read then up to request_timeout_s, then the
        # prediction logs' flush. Serve's 20 s default cut requests of its 30 s timeout off
        # as resets, and could kill the replica before the flush.
        "graceful_shutdown_timeout_s": s.body_timeout_s + s.request_timeout_s + SHUTDOWN_SLACK_S,
    }
    if s.num_replicas is not None:
        options["num_replicas"] = s.num_replicas
    else:
        options["autoscaling_config"] = s.autoscaling.serve_config(
            s.num_cpus_per_replica, _cores(cfg), len(cfg.models), _training_cpus(cfg), **_gpu_ceiling(cfg))
    return serve.deployment(ModelServer).options(**options).bind(cfg.model_dump(), model)


def ingress_app(cfg: TuneloopConfig, metrics_dir: str | None) -> Application:
    return Ingress.options(ray_actor_options={"num_cpus": 0, **on_journal_node(), **_env(metrics_dir)}
                           ).bind(cfg.model_dump())


def on_journal_node() -> dict:
    """Actor options that pin to the journal's node (``JOURNAL_RESOURCE``) where one offers it."""
    offered = ray.is_initialized() and JOURNAL_RESOURCE in ray.cluster_resources()
    return {"resources": {JOURNAL_RESOURCE: 0.01}} if offered else {}


def deploy(cfg: TuneloopConfig, metrics_dir: str | None = None) -> None:
    """Deploy (or update) every model application, then the ingress, each once the one
    before runs (Serve raises RuntimeError for one it could not deploy). Serving only:
    ``tuneloop.control.apps.deploy`` adds the retrain controller. Deployed together
    (serve.run_many), restart to ready fell from 30-34 s to 20-26 s, but two fresh-clone CI
    runs then failed the first hardening test right after ready (a 64 MiB chunked body read
    past 16 MiB before its 413): one after another, until that is understood. The ingress
    first (its routes answering during a start, where Serve's plain-text 404 answers until it
    is up) failed that test in one of three fresh-clone runs too: not done, for that reason."""
    for m in cfg.models:
        serve.run(model_app(cfg, m.name, metrics_dir), name=model_app_name(m.name), route_prefix=predict_route(m.name),
                  blocking=False)
    serve.run(ingress_app(cfg, metrics_dir), name=INGRESS_APP, route_prefix="/", blocking=False)


def application_names(cfg: TuneloopConfig) -> list[str]:
    """Every Serve application of ``cfg``, the retrain controller's keeper included."""
    return [INGRESS_APP, CONTROLLER_APP, *(model_app_name(m.name) for m in cfg.models)]


def undeploy(cfg: TuneloopConfig, timeout_s: float = 120.0) -> None:
    """Delete every application at once (each replica drains for a while), then wait."""
    names = application_names(cfg)
    for name in names:
        serve.delete(name, _blocking=False)
    deadline = time.monotonic() + timeout_s
    while set(serve.status().applications) & set(names):
        if time.monotonic() > deadline:
            raise TimeoutError(f"applications {names} still present after {timeout_s:.0f}s")
        time.sleep(0.5)
