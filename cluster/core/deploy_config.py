"""The config's ``deploy`` section: how `tuneloop deploy` runs tuneloop on a GPU cluster.

Every manifest under deploy/ (KubeRay's RayService and RayJob, the Ray cluster launcher's
YAMLs) is rendered from this and the rest of the config by ``tuneloop deploy render``, so
the cluster and the config cannot drift. Every key has a default that renders a working
cluster; an operator changes the image, the names and the sizes.
"""

from __future__ import annotations

import posixpath
import re
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?\Z")  # Kubernetes' memory/storage quantities
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# The name RayService, RayJob and the Services KubeRay makes from it take: a letter first
# (DNS-1035). `9lives` passed the check and was refused by the cluster at `deploy up`.
_DNS_1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"


class Section(BaseModel):
    """A section of the config: unknown keys refused, frozen once read. A sub-section whose
    keys are all commented out, which YAML reads as null, takes its defaults; so does a list
    or mapping that is empty by default (``auth.keys:`` with every key commented out)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_sections_take_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items() if not (v is None and _null_means_default(cls.model_fields.get(k)))}

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        # Pydantic takes a boolean for the number 1 or 0, and YAML reads true, false, yes, no,
        # on and off as booleans: ``predictions.sample_rate: false`` turned the prediction log
        # off and ``serving.port: yes`` asked for port 1, both "config OK".
        if _boolean_for_number(v, cls.model_fields[info.field_name].annotation):
            raise ValueError("a boolean where a number goes (YAML reads true, false, yes, no, on and off so)")
        return v


def refuse_repeated(values: list[str], what: str) -> None:
    """Raise, naming them, where ``values`` (``what``: a section's list key) repeat any."""
    dupes = sorted({v for v in values if values.count(v) > 1})
    if dupes:
        raise ValueError(f"{what} must be unique; repeated: {dupes}")


def _boolean_for_number(value: Any, annotation: Any) -> bool:
    """Whether ``value`` puts a boolean where ``annotation`` takes a number: an int or float
    (optional or not), a numeric Literal (``zero_stage``), or a list's items or a mapping's
    values of one (``canary_steps``, ``resources_per_worker``)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _boolean_for_number(value, args[0])
    if origin in (Union, UnionType):
        return bool not in args and any(_boolean_for_number(value, a) for a in args)
    if origin is Literal:
        return isinstance(value, bool) and any(type(a) in (int, float) for a in args)
    if origin in (list, tuple, set, frozenset) and args and isinstance(value, list | tuple):
        return any(_boolean_for_number(item, args[0]) for item in value)
    if origin is dict and len(args) == 2 and isinstance(value, dict):
        return any(_boolean_for_number(item, args[1]) for item in value.values())
    return isinstance(value, bool) and annotation in (int, float)


def _null_means_default(field: Any) -> bool:
    kind = getattr(field, "annotation", None)
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        return True
    default = getattr(field, "default", None)
    return getattr(field, "default_factory", None) in (list, dict) or (isinstance(default, list | dict) and not default)


def _quantity(value: str) -> str:
    if not _QUANTITY.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 16Gi, 512Mi)")
    return value


Quantity = Annotated[str, AfterValidator(_quantity)]


# What the images (deploy/docker) need in place: a volume mounted at, in or above one of
# these hides it (/app holds tuneloop, /usr/local its Python); and at or above one of
# IMAGE_FILES, which hides those (the CA certificates a bucket's TLS needs).
IMAGE_FOLDERS = ("/app", "/bin", "/dev", "/home/ray", "/home/tuneloop", "/lib", "/lib64", "/proc", "/sbin", "/sys", "/usr")
IMAGE_FILES = ("/etc/ssl", "/etc/pki", "/etc/ca-certificates", "/etc/passwd", "/root", "/tmp", "/var/lib/dpkg")


class WorkersConfig(Section):
    """The worker group: where model replicas and training workers run. GPU nodes by
    default; ``gpus_per_worker: 0`` makes a CPU cluster."""

    min_workers: int = Field(default=1, ge=0)
    max_workers: int = Field(default=4, ge=1, description="the autoscaler adds workers up to this")
    gpus_per_worker: int = Field(default=1, ge=0)
    # Below the default instance types' 8 vCPUs and 32 GiB: a pod asking for the whole node
    # never fits its allocatable share (about 7.9 CPUs and 30 GiB, less the node's daemons).
    cpus_per_worker: int = Field(default=7, ge=1)
    memory: Quantity = Field(default="28Gi", description="per worker pod")

    @model_validator(mode="after")
    def _bounds(self) -> WorkersConfig:
        if self.max_workers < self.min_workers:
            raise ValueError(f"max_workers ({self.max_workers}) is below min_workers ({self.min_workers})")
        return self


class AwsConfig(Section):
    region: str = "us-west-2"
    head_instance: str = "m6i.2xlarge"
    worker_instance: str = Field(default="g5.2xlarge", description="one NVIDIA A10G, 8 vCPUs")
    spot: bool = Field(default=True, description="workers on spot instances (the head never is)")
    image_id: str | None = Field(
        default=None, pattern=r"^ami-[0-9a-f]{8,17}$",
        description="the AMI of every node, in `region`: one whose NVIDIA driver is 570 or newer, as the CUDA "
                    "12.8 image needs. None: Ray's default, an Ubuntu 18.04 Deep Learning AMI whose driver "
                    "predates it, so the GPU workers could not start the container")
    worker_instance_profile_arn: str | None = Field(
        default=None, description="an IAM instance profile giving the workers the bucket (the launcher gives the "
                                  "head one of its own, not the workers); None: credentials from the Secret-less "
                                  "environment only")
    head_instance_profile_arn: str | None = Field(
        default=None, description="the head's IAM instance profile; its role needs EC2, the bucket and "
                                  "iam:PassRole on the workers' role (the autoscaler on the head launches them "
                                  "with it). None: Ray's default ray-autoscaler-v1 role, which has no PassRole, so "
                                  "workers with a profile of their own cannot be launched")


class GcpConfig(Section):
    project_id: str = "my-gcp-project"
    region: str = "us-central1"
    zone: str = "us-central1-a"
    head_instance: str = "n2-standard-8"
    worker_instance: str = Field(default="g2-standard-8", description="one NVIDIA L4, 8 vCPUs")
    accelerator: str = "nvidia-l4"
    preemptible: bool = Field(default=True, description="workers preemptible (the head never is)")

    @model_validator(mode="after")
    def _zone_in_region(self) -> GcpConfig:
        if not self.zone.startswith(f"{self.region}-"):
            raise ValueError(f"zone {self.zone!r} is not in region {self.region!r} (a zone is the region and a "
                             f"letter, e.g. {self.region}-a): set both")
        return self


# How the KubeRay operator's pods are labelled: its Helm chart names them
# app.kubernetes.io/name=kuberay-operator, its kustomize install component=kuberay-operator.
KUBERAY_OPERATOR_LABELS = ({"app.kubernetes.io/name": "kuberay-operator"},
                           {"app.kubernetes.io/component": "kuberay-operator"})


class NetworkPolicyConfig(Section):
    """A NetworkPolicy over the deployment's pods (serving's and the training jobs'): Ray's
    own ports (GCS, the dashboard, which runs jobs, the client server, the nodes' ports
    between themselves) answer only the deployment's pods and, for the dashboard, the KubeRay
    operator; Serve's port (the API, with its keys) and Ray's metrics port answer anyone."""

    enabled: bool = Field(default=True, description=(
        "render it; without it every pod of the Kubernetes cluster reaches the head's dashboard, which runs "
        "any job it is sent with the bucket's credentials (a CNI that does not enforce NetworkPolicies ignores it)"))
    operator_labels: list[dict[str, str]] = Field(
        default_factory=lambda: [dict(labels) for labels in KUBERAY_OPERATOR_LABELS], min_length=1,
        description="the KubeRay operator's pods, in any namespace: each entry a set of labels one of them carries")

    operator_namespace: str | None = Field(default=None, max_length=63, pattern=_DNS_LABEL, description=(
        "the namespace the KubeRay operator runs in: only pods there with operator_labels reach the dashboard. "
        "None: any namespace, where any pod given those labels would (an operator started with "
        "--use-kubernetes-proxy reaches the dashboard through the API server, which the policy refuses: turn it off)"))

    @field_validator("operator_labels")
    @classmethod
    def _no_empty_selector(cls, v: list[dict[str, str]]) -> list[dict[str, str]]:
        if any(not labels for labels in v):
            raise ValueError(f"an empty set of labels selects every pod of the cluster, got {v!r}: name the "
                             "operator's labels (kubectl get pods -A -l app.kubernetes.io/name=kuberay-operator)")
        return v


class DeployConfig(Section):
    name: str = Field(default="tuneloop", max_length=40, pattern=_DNS_1035_LABEL,
                      description="the RayService, RayJob, ConfigMap and cluster names start with it: "
                                  "lower-case letters, digits and '-', a letter first")
    namespace: str = Field(default="default", max_length=63, pattern=_DNS_LABEL)
    image: str = Field(default="tuneloop:0.1.0-cuda",
                       description="the image deploy/docker/Dockerfile.cuda builds; push it and name it here")
    head_cpus: int = Field(default=4, ge=1)
    head_memory: Quantity = "16Gi"
    workers: WorkersConfig = WorkersConfig()
    journal_size: Quantity = Field(default="20Gi", description="the head's persistent volume for the feedback journal")
    storage_class: str | None = Field(default=None, description="of that volume; None: the cluster's default")
    secret: str = Field(default="tuneloop", pattern=_DNS_LABEL,
                        description="Secret whose keys become environment variables on every node: "
                                    "TUNELOOP_API_KEYS, AWS_* or GOOGLE_* credentials (optional)")
    service_account: str | None = Field(
        default=None, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="the Kubernetes service account every pod runs as (bucket access through IRSA or "
                    "GKE Workload Identity, instead of keys in the Secret); None: the namespace's default")
    run_as_user: int | None = Field(default=1000, ge=1, description=(
        "the user id every KubeRay container runs as (the images' tuneloop user), never root, without "
        "privilege escalation or Linux capabilities; the journal volume is given its group. None: the image's "
        "own user, root"))
    network_policy: NetworkPolicyConfig = NetworkPolicyConfig()
    monitor_labels: dict[str, str] = Field(default_factory=dict, description=(
        "labels added to the PodMonitors, for the Prometheus that selects them: kube-prometheus-stack selects "
        "release: <its Helm release> by default, and ignored PodMonitors without it silently"))
    config_dir: str = Field(default="/etc/tuneloop", description="where the config's ConfigMap is mounted")
    journal_dir: str = Field(default="/var/lib/tuneloop/journal", description="where the journal volume is mounted")
    aws: AwsConfig = AwsConfig()
    gcp: GcpConfig = GcpConfig()

    @field_validator("config_dir", "journal_dir")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"must be an absolute path in the container, got {v!r}")
        folder = "/" + posixpath.normpath(v).lstrip("/")  # "//app" is /app
        if folder == "/":
            raise ValueError("must be a folder below / (a volume mounted at / would hide the container's files)")
        hidden = [f for f in IMAGE_FOLDERS if f == folder or f.startswith(folder + "/") or folder.startswith(f + "/")]
        hidden += [f for f in IMAGE_FILES if f == folder or f.startswith(folder + "/")]
        if hidden:
            raise ValueError(f"{v!r} would be mounted over the image's {hidden[0]} (tuneloop's code, Python, "
                             "certificates): choose a folder of its own, e.g. /etc/tuneloop or /var/lib/tuneloop")
        return folder

    @model_validator(mode="after")
    def _mounts_apart(self) -> DeployConfig:
        # Both are volume mounts of the head's container: Kubernetes refuses one path twice,
        # and the journal's inside the read-only ConfigMap cannot be mounted.
        a, b = self.config_dir, self.journal_dir
        if a == b or a.startswith(b + "/") or b.startswith(a + "/"):
            raise ValueError(f"config_dir {a!r} and journal_dir {b!r} are mounted apart: neither may be, or lie "
                             "within, the other")
        return self


Target = Literal["serve", "kuberay", "aws", "gcp"]
