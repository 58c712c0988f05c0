"""The config's serving sections: ``serving`` (replicas, batching, limits, autoscaling),
``predictions`` (the prediction log), ``feedback`` and ``auth`` (API keys). Pure.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tuneloop.core.deploy_config import Section, refuse_repeated
from tuneloop.core.resources import RAY_MIN_AMOUNT, custom_resources
from tuneloop.core.runtimes import RuntimeName


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


# Ray Serve's HAProxy opens these listeners beside the serving port, on every interface.
HAPROXY_PORT_DEFAULTS = {"RAY_SERVE_HAPROXY_STATS_PORT": 8404, "RAY_SERVE_HAPROXY_METRICS_PORT": 9101}


def haproxy_ports() -> dict[str, int]:
    """HAProxy's side listeners, by the variable that moves each: the environment's, else Serve's default."""
    return {var: int(os.environ.get(var) or default) for var, default in HAPROXY_PORT_DEFAULTS.items()}


class ServingConfig(Section):
    host: str = Field(default="127.0.0.1", min_length=1,
                      description="an IPv4 address or host name; 0.0.0.0: every interface")
    port: int = Field(default=8000, ge=1, le=65535)

    @field_validator("port")
    @classmethod
    def _not_haproxys(cls, v: int) -> int:
        for var, port in haproxy_ports().items():
            if v == port:
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

    @field_validator("num_gpus_per_replica")
    @classmethod
    def _gpus_none_or_placeable(cls, v: float) -> float:
        if 0 < v < RAY_MIN_AMOUNT:  # Ray refused it when the deployment was built, naming no key
            raise ValueError(f"must be 0, or at least {RAY_MIN_AMOUNT:g} (Ray's precision)")
        return v

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

    def max_feedback_body_bytes(self) -> int:
        """The largest feedback body the limits allow: one text, escaped as above, and its
        entities, at most one a character, each ``{"start": .., "end": .., "label": ..}``
        in 64 bytes. With ``max_inputs_per_request: 1`` the predict limit (24 KB at 2,000
        characters) refused an NER correction of a long text with many entities (413)."""
        return self.max_chars_per_input * (12 + 64) + 4096

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
    def min_replicas(self) -> int:
        """The fewest replicas a model keeps: the fixed count, or autoscaling's floor (0:
        none while idle)."""
        return self.num_replicas or self.autoscaling.min_replicas

    @property
    def replica_threads(self) -> int:
        """A replica's torch (and ONNX Runtime) threads: its CPUs, rounded up. The optimizer
        times the runtimes at this count, and a replica looks its speeds up by it."""
        return max(1, math.ceil(self.num_cpus_per_replica))


class PredictionsConfig(Section):
    """The prediction log (what was served, for joining feedback by prediction id)."""

    sample_rate: float = Field(default=1.0, ge=0, le=1, description="share of predictions recorded")
    retention_days: int | None = Field(default=30, ge=1, le=36_500, description="older date partitions are dropped; null keeps all")
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

    @field_validator("sha256", mode="before")
    @classmethod
    def _hex_in_either_case(cls, v: Any) -> Any:
        """The same digest in upper case (PowerShell's ``Get-FileHash`` prints it so) was refused."""
        return v.lower() if isinstance(v, str) else v

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
        refuse_repeated([k.id for k in v], "auth.keys ids (one would shadow the other)")
        return v
