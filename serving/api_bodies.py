"""The JSON bodies of the ingress's routes (DESIGN.md's contract, v1), as pydantic models:
unknown fields refused (feedback's are its task's, which the task checks), strict types
("yes" or 1 is no boolean), every string valid Unicode (the journal stores UTF-8).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictStr, model_validator

from tuneloop.core.rollout import Stage
from tuneloop.core.tasks import check_unicode
from tuneloop.store.rollout_actions import RolloutAction


class PredictRequest(BaseModel):
    """The predict body, as the model replicas check it (serving/predict_request.py)."""

    model_config = ConfigDict(extra="forbid")
    inputs: list[StrictStr]


class EmptyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: StrictStr
    force: StrictBool = False  # "yes" or 1 promoting a gate-rejected version would be a surprise


class RolloutRequest(BaseModel):
    """``start`` (``version``; ``stage`` shadow or canary, else as rollout.mode says),
    ``pause``, ``resume``, ``step`` (force the next stage; ``at``: the percent it was seen
    at, a 409 if it moved since) or ``rollback``."""

    model_config = ConfigDict(extra="forbid")
    action: RolloutAction
    version: StrictStr | None = None
    stage: Stage | None = None
    force: StrictBool = False
    at: StrictFloat | None = Field(default=None, ge=0, le=100)  # true or "50" is no percent


class FeedbackRequest(BaseModel):
    """What the user says about a prediction (``prediction_id``) or a text (``model`` and
    ``text``): the other fields are the model's task's feedback fields (a classifier takes
    ``label``), which the task checks (``FeedbackService.submit``)."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"example": {"prediction_id": "…", "label": "positive"}})
    prediction_id: StrictStr | None = None
    model: StrictStr | None = None
    text: StrictStr | None = None

    @model_validator(mode="after")
    def _valid_unicode(self) -> "FeedbackRequest":
        def walk(value: Any, where: str) -> None:  # the journal stores UTF-8; a lone surrogate is none
            if isinstance(value, str):
                check_unicode(value, where)
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    walk(item, f"{where}[{i}]")
            elif isinstance(value, dict):
                for key, item in value.items():
                    walk(key, where)
                    walk(item, f"{where}.{key}")

        for name in ("prediction_id", "model", "text"):
            walk(getattr(self, name), name)
        for name, value in self.task_fields().items():
            walk(name, "body")
            walk(value, name)
        return self

    @model_validator(mode="after")
    def _one_form(self) -> "FeedbackRequest":
        by_id = self.prediction_id is not None
        by_text = self.model is not None or self.text is not None
        if by_id == by_text or (by_text and (self.model is None or self.text is None)):
            raise ValueError('give either "prediction_id", or "model" and "text", with the task\'s feedback '
                             'fields ("label" for text classification)')
        return self

    def task_fields(self) -> dict[str, Any]:
        return dict(self.model_extra or {})
