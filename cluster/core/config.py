"""tuneloop's one config file, parsed into one pydantic model per component.

Everything is validated before anything starts: unknown keys are rejected, and every
error names the key and the value that was given. Pure: imports neither ray nor torch.
The whole file is ``TuneloopConfig``, here with reading and checking it; its sections'
models live in ``model_config``, ``storage_config``, ``serving_config``,
``training_config`` and ``deploy_config``, and are imported from here.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from tuneloop.core.deploy_config import DeployConfig, Section, refuse_repeated
from tuneloop.core.model_config import DEFAULT_BASE_MODEL, TRANSFER_KEY, DistillConfig, ModelConfig
from tuneloop.core.resources import training_cpus
from tuneloop.core.rollout import RolloutConfig
from tuneloop.core.serving_config import (ApiKeyConfig, AuthConfig, AutoscalingConfig, FeedbackConfig,
                                          PredictionsConfig, ServingConfig)
from tuneloop.core.storage_config import CREDENTIALS_IN_URI, StorageConfig, without_credentials
from tuneloop.core.training_config import (GateConfig, OptimizeConfig, QuarantineConfig, TrainingConfig,
                                           TrainingDefaults, TriggerConfig)

__all__ = ["ApiKeyConfig", "AuthConfig", "AutoscalingConfig", "ConfigError", "DEFAULT_BASE_MODEL", "DeployConfig",
           "DistillConfig", "FeedbackConfig", "GateConfig", "ModelConfig", "OptimizeConfig", "PredictionsConfig",
           "QuarantineConfig", "RayConfig", "ServingConfig", "StorageConfig", "TRANSFER_KEY", "TrainingConfig",
           "TrainingDefaults", "TriggerConfig", "TuneloopConfig", "load_config", "load_config_and_document",
           "parse_config", "ray_address_problem", "read_config_yaml", "cluster_to_join"]

DEFAULT_CONFIG_PATH = "tuneloop.yaml"
CONFIG_ENV_VAR = "TUNELOOP_CONFIG"


class ConfigError(ValueError):
    """The config file is missing, unreadable or invalid; the message says where."""


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


def cluster_to_join(*addresses: str | None) -> str | None:
    """The Ray cluster this process joins: the first of ``addresses`` given (a flag's, the
    config's, then $RAY_ADDRESS, which a Ray Job's entrypoint has), or None, where none is or
    it is ``local``, Ray's word for starting one here. ``local`` counted as a cluster to join:
    ``ray.num_cpus`` was ignored, the start's resource checks skipped, and a job that could
    not fit waited for an autoscaler instead of failing."""
    address = next((a for a in addresses if a), None)
    return None if address == "local" else address


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
        refuse_repeated([m.name for m in v], "model names")
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
        for m in self.models:
            if m.window_stride is None:
                continue
            # Training reads a long text in the same windows, at its own max_length: a stride
            # past half of that would be cut there without a word.
            trained = f"models.{m.name}.training.max_length" if "max_length" in m.training else "training.max_length"
            for key, length in (("serving.max_length", self.serving.max_length),
                                (trained, self.training_for(m.name).max_length)):
                if m.window_stride > length // 2:
                    raise ValueError(f"model {m.name!r}: window_stride {m.window_stride} exceeds half of {key} "
                                     f"({length}): windows would share most of their tokens; at most {length // 2}")
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

    def largest_job_gpus(self, models: list[str] | None = None) -> float:
        """The GPUs the largest of ``models``' (default: all) training jobs asks Ray for (0 on CPUs)."""
        jobs = (self.training_for(name) for name in (models if models is not None else [m.name for m in self.models]))
        return max((t.num_workers * t.gpus_per_worker if t.use_gpu else 0.0 for t in jobs), default=0.0)

    def training_for(self, name: str) -> TrainingConfig:
        """The training settings of model ``name``: the top-level ones, with the model's own
        ``training:`` keys over them (a 12-intent seed set wants more epochs than sentiment)."""
        overrides, top = self.model(name).training, self.training.model_dump(exclude_unset=True)
        try:
            return TrainingConfig.model_validate({**top, **overrides})
        except ValidationError as err:
            def where(e: dict[str, Any]) -> str:
                """The section to blame: the model's, unless the bad key (or, for a check of
                several keys, the top-level section alone) is the top level's."""
                if not overrides:
                    return "training"
                if e["loc"]:
                    return f"models.{name}.training" if e["loc"][0] in overrides else "training"
                try:
                    TrainingConfig.model_validate(top)
                except ValidationError as alone:  # the same complaint of the top level alone: its keys
                    if any(a["msg"] == e["msg"] for a in alone.errors()):
                        return "training"
                return f"models.{name}.training"

            raise ValueError("\n  ".join(_error_line(e, where(e), ("training", *e["loc"][:-1]))
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


def parse_config(data: object, source: str = "<dict>", base_dir: Path | None = None,
                 clients_here: bool = True) -> TuneloopConfig:
    """Validate a parsed YAML document; relative paths are taken from ``base_dir``.
    ``clients_here`` False: the storage root's client library need not be installed here (the
    config is only rendered into a cluster's files)."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: expected a mapping at the top, got {data!r}")
    try:
        cfg = TuneloopConfig.model_validate(data, context={"clients_here": clients_here})
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
        text = path.read_text(encoding="utf-8")  # YAML's own; not the locale's
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:  # a Latin-1 "café": a traceback from every command
        raise ConfigError(f"cannot read config {path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at "
                          f"{e.start}); save it as UTF-8") from None
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


def load_config_and_document(explicit: str | None = None,
                             clients_here: bool = True) -> tuple[TuneloopConfig, dict[str, Any]]:
    """The config, and the YAML document it was read from (what deploy files carry), from
    one read of the file."""
    path = config_path(explicit)
    doc = read_config_yaml(path)
    return parse_config(copy.deepcopy(doc), source=str(path), base_dir=path.resolve().parent,
                        clients_here=clients_here), doc
