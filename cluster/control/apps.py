"""The Serve applications of a tuneloop deployment, and the builder that makes them.

``build`` is Serve's application builder, ``import_path: tuneloop.control.apps:build``:
what `serve run`, `serve deploy` and a KubeRay RayService's ``serveConfigV2`` deploy
(``tuneloop deploy render`` writes those files from the config: ``manifests.serve_config``),
and what `tuneloop run` deploys too. The applications: one per model (its replicas, routed
at its predict path), the ingress at ``/``, and the retrain controller (no route).
"""

from __future__ import annotations

import logging
import os
import uuid

import ray
from ray import serve
from ray.serve import Application

from tuneloop.control.controller import RetrainController
from tuneloop.control.manifests import IMPORT_PATH
from tuneloop.core.config import TuneloopConfig, load_config
from tuneloop.core.names import CONTROLLER_APP, CONTROLLER_DEPLOYMENT, CONTROLLER_NAMESPACE, controller_name
from tuneloop.serving.app import default_metrics_dir, ingress_app, model_app, on_journal_node
from tuneloop.serving.app import deploy as deploy_serving
from tuneloop.serving.metrics import MULTIPROC_ENV

# config_sha256: the config's digest, which the rendered Serve config carries so that a
# changed config is a changed application (Serve rebuilds an app only when its args change).
log = logging.getLogger(__name__)
ARGS = ("config", "app", "metrics_dir", "config_sha256")


def build(args: dict[str, str]) -> Application:
    """``args``: ``config`` (the tuneloop.yaml path on the cluster's nodes; default
    $TUNELOOP_CONFIG, then ./tuneloop.yaml), ``app`` (a model's name, ``ingress`` or
    ``controller``) and ``metrics_dir`` (where replicas write their metrics; default
    $PROMETHEUS_MULTIPROC_DIR, else a private folder on each node). A bad config or
    argument fails the deploy with the reason, before any replica starts."""
    unknown = sorted(set(args) - set(ARGS))
    if unknown:
        raise ValueError(f"unknown args {unknown}; {IMPORT_PATH} takes {list(ARGS)}")
    cfg = load_config(args.get("config"))
    metrics_dir = args.get("metrics_dir") or os.environ.get(MULTIPROC_ENV) or default_metrics_dir()
    app = args.get("app", "ingress")
    if app == "ingress":
        return ingress_app(cfg, metrics_dir)
    if app == "controller":
        return controller_app(cfg, metrics_dir)
    if app not in {m.name for m in cfg.models}:
        raise ValueError(f"app {app!r} is neither ingress, controller nor a model of the config "
                         f"({[m.name for m in cfg.models]})")
    return model_app(cfg, app, metrics_dir)


@serve.deployment(name=CONTROLLER_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 0},
                  health_check_period_s=10, health_check_timeout_s=60)
class ControllerKeeper:
    """Keeps the retrain controller of its config, the named actor the ingress finds, so a
    Serve-deployed tuneloop retrains without a driver process. The controller is detached
    and this replica only its owner of the moment (``RetrainController.adopt``):

    - the replica crashes: Serve starts another, which adopts the same controller; a
      running job goes on;
    - the controller dies: the health check fails, and the new replica starts a new one
      (which rebuilds its state from the job records and the feedback files);
    - the application is deleted, or updated with a changed config (a new controller name):
      ``__del__`` retires the controller, which finishes its running job first. Meanwhile
      the new config's controller sees that job's record and starts none beside it."""

    def __init__(self, config: dict, name: str, metrics_dir: str | None):
        self._owner = uuid.uuid4().hex
        self._controller = RetrainController.options(
            name=name, namespace=CONTROLLER_NAMESPACE, get_if_exists=True, lifetime="detached", **on_journal_node()
        ).remote(config, metrics_dir)
        ray.get(self._controller.adopt.remote(self._owner))  # up before the replica says it is

    def check_health(self) -> None:
        ray.get(self._controller.status.remote(), timeout=30)

    def __del__(self):
        try:
            ray.get(self._controller.retire.remote(self._owner), timeout=10)
        except ray.exceptions.RayActorError:
            # Retiring ends the controller's process (it kills itself, its job done): the call
            # then never returns, and the error's nine lines alarmed every clean stop.
            log.debug("retrain controller gone while retiring, as it exits")
        except Exception as e:  # noqa: BLE001 - storage or Ray trouble: the next keeper's controller takes over
            log.info("retrain controller not retired: %s: %s", type(e).__name__, str(e).splitlines()[0] if str(e) else "")


def controller_app(cfg: TuneloopConfig, metrics_dir: str | None = None) -> Application:
    """``metrics_dir``: where the replicas write their metrics, which a rollout's health is
    read from (None: no rollout health, as in a process without multiprocess metrics)."""
    return ControllerKeeper.options(ray_actor_options={"num_cpus": 0, **on_journal_node()}).bind(
        cfg.model_dump(), controller_name(cfg.digest()), metrics_dir)


def deploy(cfg: TuneloopConfig, metrics_dir: str | None = None) -> None:
    """Deploy (or update) every application of ``cfg``, the ones ``build`` makes for a Serve
    config file, one after another (serving.app.deploy says why)."""
    serve.run(controller_app(cfg, metrics_dir), name=CONTROLLER_APP, route_prefix=None, blocking=False)
    deploy_serving(cfg, metrics_dir)
