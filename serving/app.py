"""Build tuneloop's Serve application from the config: one ingress, one deployment per model."""

from __future__ import annotations

from ray import serve
from ray.serve import Application

from cluster.config import TuneloopConfig
from serving.ingress import Ingress
from serving.metrics import MULTIPROC_ENV
from serving.model_server import ModelServer

APP_NAME = "tuneloop"


def build_app(cfg: TuneloopConfig, metrics_dir: str | None = None) -> Application:
    s = cfg.serving
    env = {"runtime_env": {"env_vars": {MULTIPROC_ENV: metrics_dir}}} if metrics_dir else {}
    handles = {}
    for m in cfg.models:
        options = {
            "name": f"model-{m.name}",
            "ray_actor_options": {"num_cpus": s.num_cpus_per_replica, "num_gpus": s.num_gpus_per_replica, **env},
            # Enough in flight per replica to fill several batches.
            "max_ongoing_requests": s.max_batch_size * 4,
            # Bounded queue: past it the ingress answers 503 + Retry-After at once.
            "max_queued_requests": s.max_queued_requests,
        }
        if s.autoscaling:
            options["autoscaling_config"] = s.autoscaling.model_dump()
        else:
            options["num_replicas"] = s.num_replicas
        deployment = serve.deployment(ModelServer).options(**options)
        handles[m.name] = deployment.bind(m.model_dump(), s.model_dump(), cfg.storage.root)
    # The ingress only awaits: let it hold every request the model queues may take, or it
    # becomes the bottleneck (Serve's default is 5 in flight) and starves the batches.
    in_flight = len(cfg.models) * (s.max_batch_size * 4 + s.max_queued_requests)
    ingress = Ingress.options(ray_actor_options={"num_cpus": 0, **env}, max_ongoing_requests=in_flight)
    return ingress.bind(cfg.model_dump(), handles)
