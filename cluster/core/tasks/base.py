"""The Task contract: everything tuneloop does that depends on what a model predicts.

A task owns, for one kind of model: how a predict request's inputs are checked, which
Hugging Face auto class loads the model, how the model's scores become an answer, which
feedback fields a user sends and how they are checked, the task's own columns of the
prediction and feedback records, how training rows become training targets, the evaluation
metrics and which of them the gate compares, and whether batches group inputs by length.
Everything outside a task treats answers, targets and record columns as opaque.

Pure: no torch, no pyarrow. The edges (the serving replica, the training worker) run the
tokenizer and the model and hand plain lists to the task; the stores map the column types
declared here onto Parquet. A task is a small picklable object made from the model's
labels, so it crosses Ray by value.

Adding a task is one module in this package (``tasks/__init__.py`` finds it by its ``name``).
"""

from __future__ import annotations

import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from tuneloop.core.errors import InvalidBody, InvalidValue, PayloadTooLarge, json_type, quoted
from tuneloop.core.evaluation import EvalMetrics


# -- column types: what a task's record columns hold, without naming pyarrow --------------
@dataclass(frozen=True)
class MapOf:
    key: ColumnType
    value: ColumnType


@dataclass(frozen=True)
class ListOf:
    item: ColumnType


@dataclass(frozen=True)
class StructOf:
    fields: tuple[tuple[str, ColumnType], ...]


# A scalar is named as pyarrow names it ("string", "float32", "int64", "bool").
ColumnType = str | MapOf | ListOf | StructOf


# -- checks every text input takes --------------------------------------------------------
def check_text_length(text: str, where: str, max_chars: int) -> None:
    if len(text) > max_chars:
        raise PayloadTooLarge(f"{where} has {len(text)} characters; the limit is {max_chars}")


def check_unicode(text: str, where: str) -> None:
    """JSON may carry a lone surrogate (``"\\ud800"``) that decodes to a Python ``str`` but is
    no Unicode text: tokenizers raise on it and UTF-8 cannot store it. Refuse it up front."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidValue(f"{where} is not valid Unicode text (a lone surrogate at character {e.start})") from None


INVISIBLE = ("Cc", "Cf", "Cs")  # control, format (zero-width space, BOM), surrogate


def has_visible_text(text: str) -> bool:
    """Whether ``text`` holds a character one can see: not only whitespace, control
    characters (``"\\x00"``) or format ones (a zero-width space). Such a text's tokens are the
    model's special ones alone: as feedback it taught nothing, and a validation row of it, whose
    every token a token classifier leaves out of its loss, made the loss NaN and stopped the
    job early. Unassigned code points (Cn) and private use (Co) count as visible: an emoji newer
    than this Python's Unicode tables (🩷, Unicode 15, on Python 3.11) is one."""
    return any(category not in INVISIBLE and not category.startswith("Z")  # Z: spaces, line separators
               for category in map(unicodedata.category, text))


# Tokenizer outputs a task may ask for (``tokenizer_options``) that no model's forward takes.
NON_MODEL_OUTPUTS = ("offset_mapping", "special_tokens_mask", "overflow_to_sample_mapping")


class Task(ABC):
    """One task's rules. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]  # the config's ``task`` value
    auto_class: ClassVar[str]  # the transformers class that loads a checkpoint with its head
    model_options: ClassVar[dict[str, Any]] = {}  # config values the model is loaded with for training
    activation: ClassVar[str] = "softmax"  # logits to scores: "softmax" (one answer) or "sigmoid" (each on its own)
    target_dtype: ClassVar[str] = "long"  # the loss's targets: class ids ("long") or multi-hot ("float")
    gate_metric: ClassVar[str]  # the EvalMetrics field the gate compares
    batch_by_length: ClassVar[bool] = True  # padded encoders: batch inputs of similar length
    tokenizer_options: ClassVar[dict[str, Any]] = {}  # extra tokenizer arguments at serving and training
    needs_word_ids: ClassVar[bool] = False  # the encoding carries each token's word (a fast tokenizer's)
    options: ClassVar[tuple[str, ...]] = ()  # the ModelConfig fields the task is made with, beside labels
    reads_rows: ClassVar[bool] = False  # dataset files are read row by row through ``dataset_row``
    prediction_columns: ClassVar[dict[str, ColumnType]]  # the task's part of a prediction record
    feedback_fields: ClassVar[tuple[str, ...]]  # what a user sends besides the prediction or text
    feedback_columns: ClassVar[dict[str, ColumnType]]  # the task's part of a feedback record
    target_columns: ClassVar[tuple[str, ...]]  # what training reads from seed data and feedback
    training_columns: ClassVar[dict[str, ColumnType]]  # what ``training_targets`` adds for the worker

    def __init__(self, labels: Sequence[str]):
        self.labels = list(labels)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.labels == self.labels

    def spelled_as_configured(self, label: Any, names: Sequence[str] | None = None) -> Any:
        """``label``, or the one of ``names`` (default: the labels) it equals once both are in
        Unicode's composed form (NFC). "très bien" typed with a combining accent, as macOS
        input methods and file names give it, looked the same as the config's label on screen
        and was refused as unknown."""
        names = self.labels if names is None else names
        if not isinstance(label, str) or label in names:
            return label
        composed = unicodedata.normalize("NFC", label)
        return next((n for n in names if unicodedata.normalize("NFC", n) == composed), label)

    def __hash__(self) -> int:
        return hash((self.name, tuple(self.labels)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.labels!r})"

    # -- requests ----------------------------------------------------------------------
    def check_inputs(self, inputs: object, max_inputs: int, max_chars: int) -> list[str]:
        """The ``inputs`` of a predict body, checked: a non-empty list of valid texts."""
        if not isinstance(inputs, list):
            raise InvalidBody(f'"inputs" must be a list of texts, not {json_type(inputs)}')
        if not inputs:
            raise InvalidValue('"inputs" must hold at least one text')
        if len(inputs) > max_inputs:
            raise PayloadTooLarge(f'"inputs" has {len(inputs)} texts; the limit is {max_inputs}')
        for i, text in enumerate(inputs):
            if not isinstance(text, str):
                raise InvalidBody(f"inputs[{i}] must be a string, not {json_type(text)}")
            check_text_length(text, f"inputs[{i}]", max_chars)
            check_unicode(text, f"inputs[{i}]")
        return inputs

    # -- serving and training ----------------------------------------------------------
    def window_rows(self, tokenizer: Any, rows: dict[str, list], max_length: int) -> dict[str, list]:
        """Training rows (columns of lists) as the replicas read their texts: a task that
        reads a long text in windows gives a row per window (see TokenClassification); any
        other, ``rows`` as they are."""
        return rows

    def serving_tokenizer_options(self, max_length: int) -> dict[str, Any]:
        """The tokenizer's extra arguments as the replicas read texts (a task may read long
        texts in windows, each a row of the batch); training and the gate read them so too."""
        return self.tokenizer_options

    def encoding_for(self, enc: Any) -> dict[str, list]:
        """Take out of the tokenizer's output (a BatchEncoding of tensors) what the model
        does not accept, such as offsets, and return the encoding as lists for this task's
        methods: {} when ``tokenizer_options`` asks for nothing beyond the ids."""
        extra = {k: enc.pop(k) for k in NON_MODEL_OUTPUTS if k in enc}
        if not self.tokenizer_options:
            return {}
        out = {k: v.tolist() for k, v in {**enc, **extra}.items()}
        if self.needs_word_ids:
            out["word_ids"] = [enc.word_ids(i) for i in range(len(out["input_ids"]))]
        return out

    def label_names(self) -> list[str]:
        """The labels answers carry and feedback names (``label_set`` compares them;
        ``GET /v1/models`` lists them): a token classifier's entity types."""
        return self.labels

    @abstractmethod
    def head_labels(self) -> list[str]:
        """The labels of the model's output units (a checkpoint's ``id2label`` values)."""

    @abstractmethod
    def answers(self, texts: list[str], scores: list, head: list[str],
                encoding: dict[str, list] | None) -> list[dict[str, Any]]:
        """Post-processing: per text, the answer fields (without id and version), from the
        model's softmaxed scores, whose last axis follows ``head`` (the checkpoint's own
        ``id2label`` order), and the tokenizer's output when ``tokenizer_options`` asks for
        more than the ids (offsets, for a task that answers with spans). With windows
        (``serving_tokenizer_options``) scores has a row per window, and the encoding's
        ``overflow_to_sample_mapping`` says whose."""

    @abstractmethod
    def prediction_record(self, answer: dict[str, Any]) -> dict[str, Any]:
        """The task's columns of the prediction log row for one answer."""

    # -- feedback ----------------------------------------------------------------------
    def check_feedback_fields(self, fields: dict[str, Any]) -> None:
        """The shape of a feedback body's task fields: exactly ``feedback_fields``, of the
        right JSON types (values are checked by ``feedback_target``, once the model is known)."""
        extra = sorted(set(fields) - set(self.feedback_fields))
        missing = [f for f in self.feedback_fields if f not in fields]  # a null is the wrong type: the task says
        if extra or missing:
            wanted = ", ".join(f'"{f}"' for f in self.feedback_fields)
            unknown = ", ".join(quoted(f) for f in extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
            said = f"unknown field(s) {unknown}" if extra else f"missing {missing}"
            raise InvalidBody(
                f'{said}: give "prediction_id" or "model" and "text", and {wanted} ({self.name})'
            )

    @abstractmethod
    def feedback_target(self, model: str, fields: dict[str, Any], text: str) -> dict[str, Any]:
        """The user's fields on ``text``, checked (a 4xx TuneloopError otherwise), as record columns."""

    @abstractmethod
    def predicted(self, served: dict[str, Any]) -> dict[str, Any]:
        """The feedback columns that record what was served (from a prediction log row)."""

    @abstractmethod
    def feedback_labels(self, row: dict[str, Any]) -> list[str]:
        """The labels a feedback record counts under in the statistics."""

    @abstractmethod
    def agrees(self, row: dict[str, Any]) -> bool:
        """Whether a feedback record on a prediction says the prediction was right."""

    @abstractmethod
    def label_outcomes(self, row: dict[str, Any]) -> list[tuple[str, str]]:
        """What a feedback record on a prediction says of each label it involves: ``right``
        (served and confirmed), ``wrong`` (served, not confirmed) or ``missed`` (not served,
        the user's); [] for feedback on a text. Online precision and recall per label."""

    # -- training ----------------------------------------------------------------------
    def dataset_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """With ``reads_rows``: one row of a seed or golden file as ``text`` and the target
        columns (a task may read other layouts here), checked; ValueError says what is wrong."""
        raise NotImplementedError

    @abstractmethod
    def training_targets(self, columns: dict[str, list]) -> dict[str, list]:
        """Seed or feedback rows' ``target_columns`` (read as the types of ``feedback_columns``)
        as the worker's ``training_columns``; a value outside the model's labels raises
        ValueError naming it."""

    def stratum(self, targets: dict[str, Any]) -> str:
        """The group a training row is sampled in (replay and the golden sample keep each
        group's share): by default its first target column's value."""
        return str(targets[self.target_columns[0]])

    @abstractmethod
    def batch_targets(self, batch: dict[str, list], encoding: dict[str, list]) -> list:
        """The loss's targets for a training batch, one per row (``labels=`` of the model)."""

    @abstractmethod
    def predictions(self, scores: list, encoding: dict[str, list]) -> list:
        """Evaluation: the model's answer per row from its scores (``activation`` applied,
        the last axis in ``head_labels`` order), in the form ``batch_targets`` gives."""

    def evaluated(self, batch: dict[str, list], encoding: dict[str, list], scores: list) -> tuple[list, list]:
        """Evaluation: (targets, predictions) per row of ``batch``, from an encoding made with
        ``serving_tokenizer_options`` and its activated ``scores``: the rows read as the
        replicas read them, so the gate scores what serves."""
        return self.batch_targets(batch, encoding), self.predictions(scores, encoding)

    def answered_right(self, target: Any, predicted: Any) -> bool:
        """Whether one row's prediction is its target (forms of the two above), as a user's
        feedback agreeing with it means (``agrees``); the gate's test on fresh rows counts it."""
        return target == predicted

    @abstractmethod
    def metrics(self, y_true: list, y_pred: list) -> EvalMetrics:
        """The evaluation of predictions against targets (lists from the two above)."""
