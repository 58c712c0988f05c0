"""Everything deploy/ holds, rendered from the config: pure functions from a validated
config (and the operator's own document of it) to the dicts written as YAML.

- ``serve_config``: a Serve config file (`serve deploy`, `serve run`, a RayService's
  ``serveConfigV2``): one application per model, the retrain controller, the ingress.
- ``kuberay``: a ConfigMap with the cluster's tuneloop.yaml, the RayService that serves
  (GPU workers, autoscaling, a head that runs no replicas and keeps the feedback journal on
  a persistent volume), one RayJob per model for training, a PodMonitor, and a
  NetworkPolicy; every container runs as a user that is not root.
- ``launcher_yaml.launcher``: Ray cluster launcher YAMLs for AWS and GCP.

The cluster's config is the operator's document with the keys a cluster needs set (the
journal on the head's volume, Serve on every address, Ray joined, not started); nothing
else is rewritten.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shlex
from typing import Any

import yaml

from tuneloop.core.config import TuneloopConfig
from tuneloop.core.names import CONTROLLER_APP, INGRESS_APP, JOURNAL_RESOURCE, model_app_name, predict_route
# Serve's fast data path for the nodes too: `ray start` there never runs tuneloop's CLI,
# which sets these variables on one machine.
from tuneloop.serving.fast_path import FAST_PATH_ENV

IMPORT_PATH = "tuneloop.control.apps:build"
RAY_VERSION = "2.60.0"
CONFIG_FILE = "tuneloop.yaml"
SERVE_FILE = "serve.yaml"
LAUNCHER_ETC = "etc"  # beside a launcher YAML: the folder mounted at deploy.config_dir on every node
SERVE_PORT = 8000
METRICS_PORT = 8080  # Ray's metrics export port on every node (rayStartParams)
DASHBOARD_PORT = 8265  # Ray's dashboard on the head: the jobs API KubeRay submits through
HOME = "/home/tuneloop"  # the images' tuneloop user's home; a writable volume when run_as_user is set
SERVING_HEAD = "serving-head"  # the component label of the RayService's head pod
METRICS_KEY = "TUNELOOP_METRICS_KEY"  # the Secret's key Prometheus scrapes /metrics with


class NotClusterable(ValueError):
    """The config names something only this machine has."""


def cluster_problems(cfg: TuneloopConfig) -> list[str]:
    """What in ``cfg`` cannot work on a cluster's nodes: a local storage root (pods and
    instances share no disk) and seed or golden files at relative paths."""
    problems = []
    if "://" not in cfg.storage.root:
        problems.append(f"storage.root {cfg.storage.root!r} is a local path, which the cluster's nodes do not share: "
                        "use an s3:// or gs:// root")
    problems += _unplaceable(cfg)
    for m in cfg.models:
        for key, path in m.dataset_files():
            if path and "://" not in path and not path.startswith(_IMAGE_ROOT):
                problems.append(f"models.{m.name}.{key} {path!r} is a file of this machine: put it in the bucket "
                                f"(s3://…, gs://…) or give a path inside the image (under {_IMAGE_ROOT})")
        base = m.base_model
        if base and not base.startswith(_IMAGE_ROOT) and (base.startswith(("/", "./", "../", "~"))
                                                          or os.path.exists(base)):
            # A hub id ("org/name") is fetched on every node; this folder is on no node.
            problems.append(f"models.{m.name}.base_model {base!r} is a folder of this machine: give a Hugging Face "
                            f"hub id, or bake the weights into the image (under {_IMAGE_ROOT})")
    return problems


def _unplaceable(cfg: TuneloopConfig) -> list[str]:
    """Replicas or training workers that no rendered worker node can hold: they would wait
    unplaced (a job for resource_wait_s, then fail) on a cluster that started fine."""
    w, s = cfg.deploy.workers, cfg.serving
    asks = [("serving", "num_cpus_per_replica", s.num_cpus_per_replica, "cpus_per_worker", w.cpus_per_worker),
            ("serving", "num_gpus_per_replica", s.num_gpus_per_replica, "gpus_per_worker", w.gpus_per_worker)]
    custom = [("serving.resources_per_replica", s.resources_per_replica)]
    for m in cfg.models:
        t = cfg.training_for(m.name)

        def where(key: str, m=m) -> str:  # the section that set it: a model overriding epochs set no cpus_per_worker
            return f"models.{m.name}.training" if key in m.training else "training"

        asks.append((where("cpus_per_worker"), "cpus_per_worker", t.cpus_per_worker, "cpus_per_worker",
                     w.cpus_per_worker))
        if t.use_gpu:
            asks.append((where("gpus_per_worker"), "gpus_per_worker", t.gpus_per_worker, "gpus_per_worker",
                         w.gpus_per_worker))
        custom.append((f"{where('resources_per_worker')}.resources_per_worker", t.resources_per_worker))
    problems = []
    # Left out, max_replicas is the room shared by the models, but never below one replica
    # each (or min_replicas): more models than the room holds are refused as a set value is.
    key = "num_replicas" if s.num_replicas else "autoscaling.max_replicas" if s.autoscaling.max_replicas else \
        "autoscaling.min_replicas, max_replicas left out"
    ceiling = s.num_replicas or s.autoscaling.max_replicas or max(1, s.autoscaling.min_replicas)
    room, n = _replicas_beside_training(cfg), len(cfg.models)
    if ceiling * n > room and _replicas_a_worker_holds(cfg):
        each = f"{n} models' {ceiling} replicas each" if n > 1 else f"a model's {ceiling} replicas"
        problems.append(f"{each} (serving.{key}) "
                        f"and the largest retraining job ({_training_nodes(cfg)} worker node(s)) need more than "
                        f"deploy.workers.max_workers {w.max_workers} nodes hold ({room} replicas beside the job): "
                        "under load a retrain would wait for resources until it failed; lower the replicas or raise "
                        "max_workers")
    for section, key, need, node_key, node_has in dict.fromkeys(asks):
        if need > node_has:
            problems.append(f"{section}.{key} is {need:g} but a worker node has {node_has:g} (deploy.workers."
                            f"{node_key}): lower it or give the workers more")
    for key, resources in dict.fromkeys((k, tuple(sorted(r.items()))) for k, r in custom):
        if resources:
            problems.append(f"{key} asks for {dict(resources)}, which no rendered node offers (its nodes offer "
                            "CPUs and GPUs): leave it out on a rendered cluster")
    return problems


_IMAGE_ROOT = "/app/"  # where deploy/docker's images hold tuneloop's tree (the shipped seed files)


def cluster_config_doc(doc: dict[str, Any], cfg: TuneloopConfig) -> dict[str, Any]:
    """The operator's config document as the cluster's nodes read it."""
    problems = cluster_problems(cfg)
    if problems:
        raise NotClusterable("this config cannot run on a cluster:\n  " + "\n  ".join(problems))
    out = copy.deepcopy(doc)
    for section in ("storage", "serving", "ray"):
        out[section] = out.get(section) or {}  # left out, or every key commented out (null)
    out["storage"]["journal_dir"] = cfg.deploy.journal_dir
    out["serving"]["host"] = "0.0.0.0"
    out["serving"]["port"] = SERVE_PORT
    # Join the cluster the process runs in (a Ray Job's entrypoint, `tuneloop train` in a pod),
    # which may autoscale: a training job asks the autoscaler for what it lacks and waits.
    out["ray"]["address"] = "auto"
    if cfg.serving.num_replicas is None:  # a fixed count turns autoscaling off: no block beside it
        autoscaling = out["serving"]["autoscaling"] = out["serving"].get("autoscaling") or {}
        if autoscaling.get("max_replicas") is None:  # else the builder counts the CPUs up at deploy time
            autoscaling["max_replicas"] = replicas_the_workers_hold(cfg)
    return out


def _training_nodes(cfg: TuneloopConfig) -> int:
    """Worker nodes the largest retraining job fills (its GPUs, or else its CPUs): a job the
    controller starts runs on the serving cluster, beside the replicas."""
    w = cfg.deploy.workers
    gpus, cpus = cfg.largest_job_gpus(), cfg.largest_job_cpus()
    if gpus and w.gpus_per_worker:
        return math.ceil(gpus / w.gpus_per_worker)
    return math.ceil(cpus / w.cpus_per_worker)


def _replicas_a_worker_holds(cfg: TuneloopConfig) -> int:
    s, w = cfg.serving, cfg.deploy.workers
    per_worker = int(w.cpus_per_worker // s.num_cpus_per_replica)
    if s.num_gpus_per_replica:
        per_worker = min(per_worker, int(w.gpus_per_worker // s.num_gpus_per_replica))
    return per_worker


def _replicas_beside_training(cfg: TuneloopConfig) -> int:
    """Replicas (of all the models together) the worker nodes hold once the largest
    retraining job has its own."""
    return _replicas_a_worker_holds(cfg) * max(0, cfg.deploy.workers.max_workers - _training_nodes(cfg))


def replicas_the_workers_hold(cfg: TuneloopConfig) -> int:
    """The most replicas of one model ``deploy.workers.max_workers`` workers hold (CPUs and,
    when replicas take GPUs, GPUs per worker) beside the largest retraining job's nodes,
    shared by the models, the ceiling for Serve's autoscaler on a cluster when
    ``serving.autoscaling.max_replicas`` is left out. (On one machine the builder counts the
    machine's CPUs; on a cluster that grows, the CPUs up at deploy time are too few.)
    Replicas that filled every node left a retrain waiting for a GPU under load, until it
    failed; each of three models given all the room did the same."""
    return max(1, _replicas_beside_training(cfg) // len(cfg.models), cfg.serving.autoscaling.min_replicas)


def serve_applications(cfg: TuneloopConfig, config_path: str) -> list[dict[str, Any]]:
    # The config's digest rides along: Serve rebuilds an application only when its
    # import_path, args or runtime_env change, and a config edited in place changes none.
    digest = cfg.digest()

    def app(name: str, which: str, route: str | None) -> dict[str, Any]:
        # route_prefix null: no HTTP route (left out, Serve would take "/", the ingress's).
        return {"name": name, "route_prefix": route, "import_path": IMPORT_PATH,
                "args": {"config": config_path, "app": which, "config_sha256": digest}}

    return [*(app(model_app_name(m.name), m.name, predict_route(m.name)) for m in cfg.models),
            app(CONTROLLER_APP, "controller", None), app(INGRESS_APP, "ingress", "/")]


def serve_config(cfg: TuneloopConfig, config_path: str) -> dict[str, Any]:
    """A Serve config file whose applications read ``config_path`` on the nodes."""
    return {"proxy_location": "EveryNode", "http_options": {"host": "0.0.0.0", "port": SERVE_PORT},
            "applications": serve_applications(cfg, config_path)}


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2, the ConfigMap's config) as literal blocks."""


_Dumper.add_representer(str, lambda dumper, value: dumper.represent_scalar(
    "tag:yaml.org,2002:str", value, style="|" if "\n" in value else None))


def dump_all(docs: list[dict[str, Any]]) -> str:
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, width=120)


# -- KubeRay ----------------------------------------------------------------------------
def _labels(cfg: TuneloopConfig, component: str) -> dict[str, str]:
    # part-of, not name: KubeRay labels its pods app.kubernetes.io/name=kuberay and lets a
    # template's own value replace it, and its head Service selects on that label: with
    # name=tuneloop it matched no pod (`deploy status` and `deploy logs` exec'd into nothing).
    return {"app.kubernetes.io/part-of": "tuneloop", "app.kubernetes.io/instance": cfg.deploy.name,
            "app.kubernetes.io/component": component}


def _env(cfg: TuneloopConfig) -> tuple[list[dict], list[dict]]:
    """Every node's environment: the config's path, Serve's fast path, and the operator's
    Secret (API keys, object-store credentials) as variables; optional, so a cluster whose
    nodes get credentials from their service account needs none."""
    env = [{"name": "TUNELOOP_CONFIG", "value": f"{cfg.deploy.config_dir}/{CONFIG_FILE}"},
           *({"name": k, "value": v} for k, v in FAST_PATH_ENV.items())]
    if cfg.deploy.run_as_user is not None:
        # A user id the image may not list in /etc/passwd: Python's getpass (torch's compile
        # cache names its folder with it) reads USER first, and HOME (Hugging Face's,
        # DeepSpeed's and Triton's caches) is a volume it may write to.
        env += [{"name": "HOME", "value": HOME}, {"name": "USER", "value": "tuneloop"}]
    return env, [{"secretRef": {"name": cfg.deploy.secret, "optional": True}}]


def _security(cfg: TuneloopConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the pod's securityContext, each container's): a user that is not root, the volumes
    (the journal's) given its group, no privilege escalation, no Linux capability (Ray,
    Serve and HAProxy bind ports above 1024 only); empty with ``run_as_user`` None."""
    uid = cfg.deploy.run_as_user
    if uid is None:
        return {}, {}
    # OnRootMismatch: the journal's files are given the group once, not walked again at every
    # head's start (a NewCluster upgrade starts a second head on the same volume).
    pod = {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid, "fsGroup": uid,
           "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}}
    return pod, {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _container(cfg: TuneloopConfig, name: str, cpus: int, memory: str, gpus: int,
               ports: list[tuple[str, int]], journal: bool) -> dict[str, Any]:
    env, env_from = _env(cfg)
    limits: dict[str, Any] = {"cpu": str(cpus), "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    mounts = [{"name": "config", "mountPath": cfg.deploy.config_dir, "readOnly": True}]
    if journal:
        mounts.append({"name": "journal", "mountPath": cfg.deploy.journal_dir})
    # No imagePullPolicy: Kubernetes' default pulls a ``:latest`` or untagged image on every
    # start and a pinned tag once, so an image rebuilt under ``:latest`` reaches the nodes.
    container = {"name": name, "image": cfg.deploy.image, "env": env, "envFrom": env_from,
                 "resources": {"limits": limits, "requests": dict(limits)},
                 "ports": [{"name": n, "containerPort": p} for n, p in ports], "volumeMounts": mounts}
    security = _security(cfg)[1]
    return {**container, "securityContext": security} if security else container


# KubeRay refuses a RayJob whose name is longer (it appends 6 characters for the cluster, whose
# service names must stay DNS labels) or is no DNS-1035 label.
MAX_RAYJOB_NAME = 47


def rayjob_name(cfg: TuneloopConfig, model: str) -> str:
    """The RayJob that trains ``model``: a model name may hold ``_`` and run to 64
    characters, a RayJob's may not; a shortened name ends with a digest of the model's."""
    name = f"{cfg.deploy.name}-train-{model.replace('_', '-')}".rstrip("-")
    if len(name) <= MAX_RAYJOB_NAME and "_" not in model:
        return name
    digest = hashlib.sha256(model.encode()).hexdigest()[:6]
    return f"{name[:MAX_RAYJOB_NAME - len(digest) - 1].rstrip('-')}-{digest}"


def config_map_name(cfg: TuneloopConfig, cluster_doc: dict[str, Any]) -> str:
    """Named after its content: a changed config is a new ConfigMap, hence a changed pod
    template, hence a zero-downtime upgrade (below); a mounted ConfigMap edited in place
    would reach running replicas late or never (they read the config when built)."""
    digest = hashlib.sha256(yaml.safe_dump(cluster_doc, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.deploy.name}-config-{digest}"


def _config_volume(config_map: str) -> dict[str, Any]:
    return {"name": "config", "configMap": {"name": config_map}}


def _pod(cfg: TuneloopConfig, component: str, container: dict, volumes: list[dict], gpus: int) -> dict[str, Any]:
    # Shared memory for Ray's object store: a container's own /dev/shm is 64 MB, and Ray then
    # keeps its objects in /tmp on the node's disk (slower, and evicted under disk pressure).
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    volumes = [*volumes, {"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    pod_security = _security(cfg)[0]
    if pod_security:
        mounts.append({"name": "home", "mountPath": HOME})
        volumes.append({"name": "home", "emptyDir": {}})
    container = {**container, "volumeMounts": [*container["volumeMounts"], *mounts]}
    spec: dict[str, Any] = {"containers": [container], "volumes": volumes}
    if pod_security:
        spec["securityContext"] = pod_security
    if cfg.deploy.service_account:
        spec["serviceAccountName"] = cfg.deploy.service_account
    if gpus:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    if component == SERVING_HEAD:
        spec["affinity"] = _with_the_journal(cfg)
    return {"metadata": {"labels": _labels(cfg, component)}, "spec": spec}


def _submitter(cfg: TuneloopConfig) -> dict[str, Any]:
    """The pod KubeRay runs a RayJob's ``ray job submit`` in (KubeRay fills in the command):
    its default pod, with the deployment's labels, which the NetworkPolicy lets reach the
    dashboard, and the same security context as the Ray pods."""
    pod_security, container_security = _security(cfg)
    container: dict[str, Any] = {"name": "ray-job-submitter", "image": cfg.deploy.image,
                                 "resources": {"limits": {"cpu": "1", "memory": "1Gi"},
                                               "requests": {"cpu": "500m", "memory": "200Mi"}}}
    spec: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
    if pod_security:
        container["env"] = [{"name": "HOME", "value": "/tmp"}, {"name": "USER", "value": "tuneloop"}]
        container["securityContext"] = container_security
        spec["securityContext"] = pod_security
    return {"metadata": {"labels": _labels(cfg, "training-submitter")}, "spec": spec}


def network_policy(cfg: TuneloopConfig) -> dict[str, Any]:
    """Ingress to the deployment's pods (``deploy.network_policy``): from one another on every
    port (Ray's nodes talk on many), from anyone to Serve (the API, behind its keys) and to
    Ray's metrics port (Prometheus), and from the KubeRay operator to the dashboard (it
    deploys Serve's applications and submits jobs there). Egress stays open: the bucket."""
    d = cfg.deploy
    ours = {"matchLabels": {"app.kubernetes.io/part-of": "tuneloop", "app.kubernetes.io/instance": d.name}}
    # Labels alone can be worn by any pod of any namespace: the operator's namespace, when
    # given, narrows the rule to the pods there.
    namespace = d.network_policy.operator_namespace
    where = {"matchLabels": {"kubernetes.io/metadata.name": namespace}} if namespace else {}
    operator = [{"namespaceSelector": copy.deepcopy(where), "podSelector": {"matchLabels": labels}}
                for labels in d.network_policy.operator_labels]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": f"{d.name}-ray", "namespace": d.namespace, "labels": _labels(cfg, "network")},
            "spec": {"podSelector": ours, "policyTypes": ["Ingress"], "ingress": [
                {"from": [{"podSelector": copy.deepcopy(ours)}]},  # a copy: YAML would write an anchor
                {"ports": [{"protocol": "TCP", "port": SERVE_PORT}, {"protocol": "TCP", "port": METRICS_PORT}]},
                {"from": operator, "ports": [{"protocol": "TCP", "port": DASHBOARD_PORT}]},
            ]}}


def _with_the_journal(cfg: TuneloopConfig) -> dict[str, Any]:
    """The serving head goes where a serving head of this deployment already runs. A
    ``NewCluster`` upgrade starts a second head while the first still holds the journal's
    ReadWriteOnce volume, which attaches to one node but serves every pod there: on that
    node the new head mounts it at once, and the two ingresses each write segments of their
    own, under ``flock`` (store/journal.py); when KubeRay deletes the old cluster the new
    ingress recovers what the old one left. With no head running (the first, or after its
    node died) the term matches nothing and Kubernetes places the pod freely."""
    return {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
        "labelSelector": {"matchLabels": _labels(cfg, SERVING_HEAD)},
        "topologyKey": "kubernetes.io/hostname",
    }]}}


def _cluster_spec(cfg: TuneloopConfig, config_map: str, serving: bool) -> dict[str, Any]:
    """A RayCluster spec: a CPU head that runs no replicas and no training workers
    (``num-cpus: 0``) and, when serving, holds the journal volume and offers the journal
    resource the ingress is pinned to; a worker group the autoscaler sizes."""
    d, w = cfg.deploy, cfg.deploy.workers
    head_ports = [("gcs", 6379), ("dashboard", DASHBOARD_PORT), ("client", 10001), ("serve", SERVE_PORT),
                  ("metrics", METRICS_PORT)]
    head_params = {"num-cpus": "0", "dashboard-host": "0.0.0.0", "metrics-export-port": str(METRICS_PORT)}
    head_volumes = [_config_volume(config_map)]
    if serving:
        # KubeRay's documented quoting: the JSON in double quotes, its own quotes escaped.
        head_params["resources"] = json.dumps(json.dumps({JOURNAL_RESOURCE: 1}))
        head_volumes.append({"name": "journal", "persistentVolumeClaim": {"claimName": f"{d.name}-journal"}})
    head = _container(cfg, "ray-head", d.head_cpus, d.head_memory, 0, head_ports, journal=serving)
    worker = _container(cfg, "ray-worker", w.cpus_per_worker, w.memory, w.gpus_per_worker,
                        [("serve", SERVE_PORT), ("metrics", METRICS_PORT)], journal=False)
    group = "gpu" if w.gpus_per_worker else "cpu"
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        # The autoscaler sidecar KubeRay adds to the head pod: its container's security too.
        "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 300,
                              **({"securityContext": security} if (security := _security(cfg)[1]) else {})},
        "headGroupSpec": {"rayStartParams": head_params,
                          "template": _pod(cfg, SERVING_HEAD if serving else "training-head", head, head_volumes, 0)},
        "workerGroupSpecs": [{
            "groupName": group, "replicas": w.min_workers, "minReplicas": w.min_workers, "maxReplicas": w.max_workers,
            "rayStartParams": {"metrics-export-port": str(METRICS_PORT)},
            "template": _pod(cfg, f"{'serving' if serving else 'training'}-{group}-worker", worker,
                             [_config_volume(config_map)], w.gpus_per_worker),
        }],
    }


def kuberay(cfg: TuneloopConfig, doc: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The KubeRay manifests, by file name: ``config.yaml`` (ConfigMap, the journal's
    PersistentVolumeClaim and the NetworkPolicy), ``rayservice.yaml``, ``rayjob-<model>.yaml``, ``podmonitor.yaml``."""
    d = cfg.deploy
    config_path = f"{d.config_dir}/{CONFIG_FILE}"
    cluster_doc = cluster_config_doc(doc, cfg)
    config_map = config_map_name(cfg, cluster_doc)
    meta = {"namespace": d.namespace}
    claim: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": d.journal_size}}}
    if d.storage_class:
        claim["storageClassName"] = d.storage_class
    files = {
        "config.yaml": [
            {"apiVersion": "v1", "kind": "ConfigMap",
             "metadata": {"name": config_map, **meta, "labels": _labels(cfg, "config")},
             "data": {CONFIG_FILE: yaml.safe_dump(cluster_doc, sort_keys=False)}},
            {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
             "metadata": {"name": f"{d.name}-journal", **meta, "labels": _labels(cfg, "journal")}, "spec": claim},
            *([network_policy(cfg)] if d.network_policy.enabled else []),
        ],
        "rayservice.yaml": [{
            "apiVersion": "ray.io/v1", "kind": "RayService",
            "metadata": {"name": d.name, **meta, "labels": _labels(cfg, "serving")},
            "spec": {
                # Zero-downtime upgrades: a change of the cluster spec (a new image, new
                # sizes) makes KubeRay start a whole new RayCluster beside the running one,
                # deploy serveConfigV2 there, and move the Service only once every
                # application is healthy there; the old cluster then drains and goes. The
                # new head shares the old one's node and journal (_with_the_journal). A
                # change of serveConfigV2 alone is applied in place by Serve, which starts
                # new replicas before it stops old ones. New model *versions* need neither:
                # replicas hot-swap to production from the registry without a restart.
                "upgradeStrategy": {"type": "NewCluster"},
                "serveConfigV2": yaml.safe_dump(serve_config(cfg, config_path), sort_keys=False),
                "rayClusterConfig": _cluster_spec(cfg, config_map, serving=True),
            },
        }],
        "podmonitor.yaml": [
            {   # Prometheus Operator: Ray's metrics agent on every node of every cluster
                # (serving and training jobs): Serve's, Ray Train's and the nodes' own series.
                "apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
                "metadata": {"name": f"{d.name}-ray", **meta,
                             "labels": {**d.monitor_labels, **_labels(cfg, "monitoring")}},
                "spec": {"selector": {"matchLabels": {"app.kubernetes.io/instance": d.name}},
                         "podMetricsEndpoints": [{"port": "metrics", "interval": "15s"}]},
            },
            {   # tuneloop's /metrics, on the serving head only: its ingress already gathers
                # every node's replicas, so scraping each pod would count them once per pod.
                # The feedback-derived series need a key that may read feedback statistics:
                # the Secret's TUNELOOP_METRICS_KEY (`tuneloop keys create metrics`).
                "apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
                "metadata": {"name": f"{d.name}-tuneloop", **meta,
                             "labels": {**d.monitor_labels, **_labels(cfg, "monitoring")}},
                "spec": {"selector": {"matchLabels": {"app.kubernetes.io/instance": d.name,
                                                      "app.kubernetes.io/component": SERVING_HEAD}},
                         "podMetricsEndpoints": [{
                             "port": "serve", "path": "/metrics", "interval": "15s",
                             "authorization": {"type": "Bearer", "credentials": {
                                 "name": d.secret, "key": METRICS_KEY, "optional": True}}}]},
            },
        ],
    }
    for m in cfg.models:
        files[f"rayjob-{m.name}.yaml"] = [{
            "apiVersion": "ray.io/v1", "kind": "RayJob",
            "metadata": {"name": rayjob_name(cfg, m.name), **meta, "labels": _labels(cfg, "training")},
            "spec": {
                # A cluster of its own for the job, gone when it ends: training capacity
                # never competes with serving's. The serving cluster's controller trains
                # on its own workers when feedback triggers it; this is the manual path.
                "entrypoint": shlex.join(["python", "-m", "tuneloop.control", "train", m.name,
                                          "--config", config_path]),
                "shutdownAfterJobFinishes": True,
                "ttlSecondsAfterFinished": 600,
                "backoffLimit": 0,
                "submitterPodTemplate": _submitter(cfg),
                "rayClusterSpec": _cluster_spec(cfg, config_map, serving=False),
            },
        }]
    return files
