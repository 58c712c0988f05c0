"""Model registry: immutable versions with manifests, and a state file naming production.

Layout under the storage root::

    registry/<model>/<version>/        save_pretrained output + manifest.json
    registry/<model>/state.json        {"production": "v2", "history": [...]}

A version is staged under a hidden name and moved into place with its manifest already
written, so readers never see half a version; rename onto an existing version fails, so
two concurrent publishers cannot take the same number.
"""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cluster.errors import UnknownVersion
from cluster.storage import Storage

_VERSION = re.compile(r"^v(\d+)$")
MANIFEST = "manifest.json"
STATE = "state.json"


def version_number(version: str) -> int:
    m = _VERSION.match(version)
    if not m:
        raise ValueError(f"not a version name: {version!r}")
    return int(m.group(1))


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class EvalMetrics(BaseModel):
    model_config = ConfigDict(extra="allow")

    accuracy: float
    precision: float
    recall: float
    f1: float
    eval_rows: int


class GateResult(BaseModel):
    accepted: bool
    reason: str


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    version: str
    model: str
    parent: str | None
    base_model: str
    task: str
    labels: list[str]
    training: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    metrics: EvalMetrics | None = None
    parent_metrics: EvalMetrics | None = None
    gate: GateResult | None = None
    status: Literal["accepted", "rejected"] = "accepted"
    job_id: str | None = None
    created_at: str = Field(default_factory=now_iso)


class HistoryEntry(BaseModel):
    at: str
    event: str
    production: str | None
    reason: str = ""


class RegistryState(BaseModel):
    production: str | None = None
    history: list[HistoryEntry] = Field(default_factory=list)

    def rollback_target(self) -> str | None:
        """The production before the current one: promotions stack up, rollbacks pop, so
        rolling back twice after v1, v2, v3 lands on v1."""
        stack: list[str] = []
        for entry in self.history:
            if entry.event == "rollback":
                if stack:
                    stack.pop()
            elif entry.production is not None:
                stack.append(entry.production)
        return stack[-2] if len(stack) >= 2 else None


class Registry:
    def __init__(self, storage: Storage):
        self.storage = storage

    @staticmethod
    def _dir(model: str, version: str | None = None) -> str:
        return f"registry/{model}/{version}" if version else f"registry/{model}"

    # -- versions ------------------------------------------------------------------------
    def versions(self, model: str) -> list[Manifest]:
        """Published versions, oldest first."""
        out = []
        for info in self.storage.list_dir(self._dir(model)):
            if _VERSION.match(info.base_name):
                raw = self.storage.read_json(f"{self._dir(model, info.base_name)}/{MANIFEST}")
                if raw is not None:
                    out.append(Manifest.model_validate(raw))
        return sorted(out, key=lambda m: version_number(m.version))

    def manifest(self, model: str, version: str) -> Manifest:
        if not _VERSION.match(version):
            raise UnknownVersion(model, version)
        raw = self.storage.read_json(f"{self._dir(model, version)}/{MANIFEST}")
        if raw is None:
            raise UnknownVersion(model, version)
        return Manifest.model_validate(raw)

    def publish(self, model: str, local_dir: str, manifest: Manifest) -> Manifest:
        """Copy a saved model folder in as the next version; returns the final manifest."""
        staging = f"{self._dir(model)}/.staging-{uuid.uuid4().hex}"
        self.storage.upload_dir(local_dir, staging)
        try:
            for _ in range(100):
                taken = [
                    version_number(i.base_name)
                    for i in self.storage.list_dir(self._dir(model))
                    if _VERSION.match(i.base_name)
                ]
                version = f"v{max(taken, default=0) + 1}"
                final = manifest.model_copy(update={"version": version, "model": model})
                self.storage.write_json_atomic(f"{staging}/{MANIFEST}", final.model_dump(mode="json"))
                try:
                    self.storage.move_dir(staging, self._dir(model, version))
                    return final
                except FileExistsError:
                    continue  # another publisher took this number: take the next one
            raise RuntimeError(f"could not allocate a version for {model}")
        except BaseException:
            if self.storage.exists(staging):
                self.storage.delete_dir(staging)
            raise

    def local_path(self, model: str, version: str, cache_dir: str | None = None) -> str:
        """A local folder holding the version's files, downloading them if storage is remote."""
        self.manifest(model, version)  # raises UnknownVersion
        if self.storage.is_local:
            return self.storage.path(self._dir(model, version))
        cache = cache_dir or os.path.join(tempfile.gettempdir(), "tuneloop-cache")
        target = os.path.join(cache, model, version)
        if not os.path.exists(os.path.join(target, MANIFEST)):
            partial = f"{target}.partial-{uuid.uuid4().hex}"
            self.storage.download_dir(self._dir(model, version), partial)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                os.rename(partial, target)
            except OSError:
                pass  # a concurrent download won; its copy is identical
        return target

    # -- state ---------------------------------------------------------------------------
    def state(self, model: str) -> RegistryState:
        raw = self.storage.read_json(f"{self._dir(model)}/{STATE}")
        return RegistryState() if raw is None else RegistryState.model_validate(raw)

    def production(self, model: str) -> str | None:
        return self.state(model).production

    def set_production(self, model: str, version: str, event: str, reason: str = "") -> RegistryState:
        self.manifest(model, version)  # raises UnknownVersion
        state = self.state(model)
        state.production = version
        state.history.append(HistoryEntry(at=now_iso(), event=event, production=version, reason=reason))
        self.storage.write_json_atomic(f"{self._dir(model)}/{STATE}", state.model_dump(mode="json"))
        return state
