"""The config's ``storage``: where the registry, feedback and predictions live (a local folder,
``s3://`` or ``gs://``), and the rule that no URI in the config carries credentials. Pure.
"""

from __future__ import annotations

import os
from urllib.parse import unquote

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from tuneloop.core.deploy_config import Section


CREDENTIALS_IN_URI = "credentials_in_uri"  # the error type of a storage root with keys in it

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


def _keys_end(location: str) -> int:
    """Where keys written before a URI's bucket end (past their "@"), or 0 where it has none:
    an "@" in the host part (``KEY@bucket``, ``KEY:SECRET@bucket``), or, after a ":" in it,
    the first "@" (a secret key may hold a "/", which ends the host part: ``KEY:se/cret@bucket``;
    no bucket name holds a ":"). An "@" or ":" in the path past the bucket is a folder's
    (``bucket/team@corp/``, ``bucket/runs/12:00@x/``)."""
    host = location.partition("/")[0]
    if "@" in host:
        return host.rindex("@") + 1
    return location.index("@") + 1 if ":" in host and "@" in location else 0


def without_credentials(uri: str) -> str:
    """``uri`` as messages may quote it: its scheme and location, never keys (``KEY:SECRET@``)
    nor its query (``?secret_key=``)."""
    if "://" not in uri:
        return uri
    scheme, rest = uri.split("://", 1)
    location = rest.partition("?")[0]
    return f"{scheme}://{location[_keys_end(location):]}"


def refuse_credentials(v: str, what: str) -> str:
    """``v`` unless it is a URI carrying keys (``s3://KEY:SECRET@bucket``, or ``?secret_key=``):
    keys there reached pyarrow only, not the conditional writes' boto3 client, which then
    wrote as another identity or found none; and the URI is printed in logs, command output
    and every version's manifest. The error never quotes the keys."""
    if "://" not in v:
        return v
    location, _, query = v.split("://", 1)[1].partition("?")
    names = {unquote(p.partition("=")[0]).lower() for p in query.split("&")}
    if _keys_end(location) or names & {"access_key", "secret_key", "session_token"}:
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
    def _journal_is_local(self, info: ValidationInfo) -> StorageConfig:
        scheme = self.root.split("://", 1)[0] if "://" in self.root else None
        if scheme is not None and scheme not in OBJECT_STORE_CLIENTS:
            raise ValueError(f"storage root {self.root!r}: tuneloop shares state on local paths, s3:// and gs:// "
                             f"roots (conditional writes), not on {scheme}://")
        # Not where the config is only rendered into a cluster's files (`deploy render`): the
        # image has the clients, and rendering a gs:// cluster asked for them here.
        clients_here = (info.context or {}).get("clients_here", True)
        if scheme is not None and clients_here and not _installed(OBJECT_STORE_CLIENTS[scheme][0]):
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
