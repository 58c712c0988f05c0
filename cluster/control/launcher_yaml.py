"""Ray cluster launcher YAMLs (`ray up`) for AWS and GCP, rendered from the config: a pure
function, as the rest of deploy/'s files (``manifests.py``)."""

from __future__ import annotations

from typing import Any

from tuneloop.control.manifests import CONFIG_FILE, LAUNCHER_ETC, METRICS_PORT, NotClusterable
from tuneloop.core.config import TuneloopConfig
from tuneloop.core.names import JOURNAL_RESOURCE
# Serve's fast data path for the nodes too: `ray start` there never runs tuneloop's CLI,
# which sets these variables on one machine.
from tuneloop.serving.fast_path import FAST_PATH_ENV


def _setup_commands(cfg: TuneloopConfig, config_path: str) -> list[str]:
    return [f"mkdir -p {cfg.deploy.journal_dir}",
            *(f"echo 'export {k}={v}' >> ~/.bashrc" for k, v in FAST_PATH_ENV.items()),
            f"echo 'export TUNELOOP_CONFIG={config_path}' >> ~/.bashrc"]


# GPUs of the GPU instance types tuneloop's defaults come from and their neighbours: a changed
# deploy.workers.gpus_per_worker beside an unchanged instance type rendered a cluster whose
# workers declared GPUs they lacked (AWS), or that GCP refused (acceleratorCount).
INSTANCE_GPUS = {
    **{f"{family}.{size}": 1 for family in ("g4dn", "g5", "g6") for size in
       ("xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge")},
    **{f"{family}.{size}": 4 for family in ("g4dn", "g5", "g6") for size in ("12xlarge", "24xlarge")},
    **{f"{family}.48xlarge": 8 for family in ("g5", "g6")},
    "p4d.24xlarge": 8, "p5.48xlarge": 8,
    **{f"g2-standard-{n}": 1 for n in (4, 8, 12, 16, 32)}, "g2-standard-24": 2, "g2-standard-48": 4,
    "g2-standard-96": 8, **{f"a2-highgpu-{n}g": n for n in (1, 2, 4, 8)}, "a2-megagpu-16g": 16, "a3-highgpu-8g": 8,
}


# The bucket scheme each cloud's nodes have credentials for: the launcher passes no Secret,
# only the instances' own identity (an IAM instance profile, a GCP service account).
_OWN_SCHEME = {"aws": "s3://", "gcp": "gs://"}


def _other_clouds_buckets(cfg: TuneloopConfig, cloud: str) -> list[str]:
    """Config paths in a bucket of a cloud other than ``cloud``: its nodes cannot read them
    (a gcp cluster on an s3:// root rendered, and no node could load a version)."""
    foreign = tuple(scheme for name, scheme in _OWN_SCHEME.items() if name != cloud)
    paths = [("storage.root", cfg.storage.root)]
    paths += [(f"models.{m.name}.{key}", path) for m in cfg.models for key, path in m.dataset_files() if path]
    return [f"{key} {path!r}" for key, path in paths if path.startswith(foreign)]


def launcher(cfg: TuneloopConfig, cloud: str) -> dict[str, Any]:
    """A Ray cluster launcher YAML (`ray up`) for ``cloud`` ("aws" or "gcp"): the image as a
    docker container on every node, a CPU head holding the journal, GPU workers (spot or
    preemptible) the autoscaler adds up to ``deploy.workers.max_workers``."""
    d, w = cfg.deploy, cfg.deploy.workers
    config_path = f"{d.config_dir}/{CONFIG_FILE}"
    head_resources = {"CPU": 0, JOURNAL_RESOURCE: 1}
    worker_resources: dict[str, Any] = {"CPU": w.cpus_per_worker, "GPU": w.gpus_per_worker}
    instance = {"aws": d.aws.worker_instance, "gcp": d.gcp.worker_instance}.get(cloud)
    if w.gpus_per_worker and INSTANCE_GPUS.get(instance, w.gpus_per_worker) != w.gpus_per_worker:
        raise NotClusterable(f"deploy.workers.gpus_per_worker is {w.gpus_per_worker}, but a {instance} has "
                             f"{INSTANCE_GPUS[instance]}: set deploy.{cloud}.worker_instance to a type with "
                             f"{w.gpus_per_worker} GPUs")
    if cloud in _OWN_SCHEME and (foreign := _other_clouds_buckets(cfg, cloud)):
        raise NotClusterable(f"{', '.join(foreign)} on another cloud than {cloud}, whose nodes have no credentials "
                             f"for it: use {_OWN_SCHEME[cloud]} paths")
    if cloud == "aws":
        a = d.aws
        if a.worker_instance_profile_arn and not a.head_instance_profile_arn:
            # Ray's default head role (EC2 and S3 full access) has no iam:PassRole: the
            # autoscaler's every launch of a worker with its profile was refused.
            raise NotClusterable("deploy.aws.worker_instance_profile_arn needs deploy.aws.head_instance_profile_arn "
                                 "too: the autoscaler on the head launches the workers with their profile, which "
                                 "takes iam:PassRole on their role, and Ray's default head role has none")
        if cfg.storage.root.startswith("s3://") and not a.worker_instance_profile_arn:
            # The launcher gives the head an instance profile, never the workers, and passes
            # no Secret: replicas could not load a version, nor training workers checkpoint.
            raise NotClusterable(f"storage.root {cfg.storage.root!r} is a bucket the GPU workers must reach: give "
                                 "them an IAM instance profile that may read and write it "
                                 "(deploy.aws.worker_instance_profile_arn)")
        worker_node: dict[str, Any] = {"InstanceType": a.worker_instance}
        if a.spot:
            worker_node["InstanceMarketOptions"] = {"MarketType": "spot"}
        if a.worker_instance_profile_arn:
            worker_node["IamInstanceProfile"] = {"Arn": a.worker_instance_profile_arn}
        provider = {"type": "aws", "region": a.region, "cache_stopped_nodes": False}
        head_node: dict[str, Any] = {"InstanceType": a.head_instance,
                                     "BlockDeviceMappings": [{"DeviceName": "/dev/sda1",
                                                              "Ebs": {"VolumeSize": 200, "VolumeType": "gp3"}}]}
        if a.head_instance_profile_arn:
            head_node["IamInstanceProfile"] = {"Arn": a.head_instance_profile_arn}
        if a.image_id:
            head_node["ImageId"] = worker_node["ImageId"] = a.image_id
        auth = {"ssh_user": "ubuntu"}
    elif cloud == "gcp":
        g = d.gcp

        def node(machine: str, accelerators: bool, preemptible: bool, worker: bool) -> dict[str, Any]:
            out: dict[str, Any] = {
                "machineType": machine,
                "disks": [{"boot": True, "autoDelete": True, "type": "PERSISTENT",
                           "initializeParams": {"diskSizeGb": 200, "sourceImage":
                                                "projects/deeplearning-platform-release/global/images/family/"
                                                "common-cu124-ubuntu-2204-py310"}}],
                # An object, as GCE takes it (Ray's examples give a list: ray#46248). GPU
                # hosts are not live-migrated; a preemptible VM is never restarted.
                "scheduling": {"onHostMaintenance": "TERMINATE", "preemptible": preemptible,
                               "automaticRestart": not preemptible},
            }
            if worker:  # the head gets the launcher's own service account; workers the project's
                # default one, with the scope that reaches the bucket (gs://).
                out["serviceAccounts"] = [{"email": "default",
                                           "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}]
            if accelerators:
                out["guestAccelerators"] = [{"acceleratorType": g.accelerator, "acceleratorCount": w.gpus_per_worker}]
                # The deep learning image installs the NVIDIA driver only when asked.
                out["metadata"] = {"items": [{"key": "install-nvidia-driver", "value": "True"}]}
            return out

        provider = {"type": "gcp", "region": g.region, "availability_zone": g.zone, "project_id": g.project_id}
        head_node = node(g.head_instance, False, False, worker=False)
        worker_node = node(g.worker_instance, bool(w.gpus_per_worker), g.preemptible, worker=True)
        auth = {"ssh_user": "ubuntu"}
    else:
        raise ValueError(f"unknown cloud {cloud!r}; tuneloop renders aws and gcp")
    return {
        "cluster_name": d.name,
        "max_workers": w.max_workers,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "docker": {"image": d.image, "container_name": "tuneloop", "pull_before_run": True,
                   # The journal on the host's disk: it outlives a restarted container.
                   "run_options": ["--ulimit nofile=65536:65536", f"-v {d.journal_dir}:{d.journal_dir}"],
                   "worker_run_options": ["--gpus all"] if w.gpus_per_worker else []},
        "provider": provider,
        "auth": auth,
        "available_node_types": {
            "head": {"resources": head_resources, "node_config": head_node},
            "gpu_worker" if w.gpus_per_worker else "cpu_worker": {
                "min_workers": w.min_workers, "max_workers": w.max_workers,
                "resources": worker_resources, "node_config": worker_node},
        },
        "head_node_type": "head",
        # The config and the Serve config travel with `ray up` (file_mounts, relative to
        # the folder `ray up` runs in: the rendered one) to the same folder on every node.
        "file_mounts": {d.config_dir: f"./{LAUNCHER_ETC}"},
        "initialization_commands": [],
        "setup_commands": _setup_commands(cfg, config_path),
        "head_start_ray_commands": [
            "ray stop",
            f"ray start --head --port=6379 --dashboard-host=0.0.0.0 --metrics-export-port={METRICS_PORT} "
            "--autoscaling-config=~/ray_bootstrap_config.yaml --num-cpus=0 "
            f"--resources='{{\"{JOURNAL_RESOURCE}\": 1}}'",
        ],
        "worker_start_ray_commands": [
            "ray stop",
            f"ray start --address=$RAY_HEAD_IP:6379 --metrics-export-port={METRICS_PORT}",
        ],
    }
