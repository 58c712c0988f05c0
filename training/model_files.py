"""Where a job's processes find the weights they start from: on their own node.

The job's driver resolves a version to a folder by downloading it from the bucket into its
node's cache (``Registry.local_path``), and a base model through its node's Hugging Face
cache. A training worker or the teacher's scorer on another node (the shipped cluster has
a CPU head and GPU workers) had that path and no such folder: ``from_pretrained`` took it
for a hub id and the job failed. So the driver hands them what to fetch (``ModelFiles``),
and each resolves it where it runs; two workers of a node share one download.
"""

from __future__ import annotations

from pydantic import BaseModel

from tuneloop.core.model_source import resolve_model_source
from tuneloop.store.registry import Registry
from tuneloop.store.storage import Storage


class ModelFiles(BaseModel):
    """A published ``version`` of ``model`` in the storage at ``storage`` (its URI), or a
    configured ``base_model`` (a hub id or a folder every node has)."""

    storage: str | None = None
    model: str | None = None
    version: str | None = None
    base_model: str | None = None

    @classmethod
    def of_version(cls, registry: Registry, model: str, version: str) -> ModelFiles:
        return cls(storage=registry.storage.uri, model=model, version=version)

    def local_path(self) -> str:
        """A folder of this node holding the files (downloaded here if need be)."""
        if self.version is not None:
            return Registry(Storage(self.storage)).local_path(self.model, self.version)
        return resolve_model_source(self.base_model)
