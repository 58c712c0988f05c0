"""Conditional writes on object stores: the one thing pyarrow's filesystems lack.

Several hosts change the same small documents (a model's state.json, the key file, job
records) and claim the same names (a version number). On a local disk a ``flock`` or an
exclusive ``link(2)`` makes them take turns. An object store has no lock, but it can refuse
a write: S3 ``PutObject`` with ``If-None-Match: *`` (create only) or ``If-Match: <etag>``
(replace only what was read), GCS uploads with ``ifGenerationMatch``. Both answer 412 to
the loser, who re-reads and tries again: compare-and-swap, atomic on the service's side.

Reads and every other write still go through pyarrow; only these two calls use the
vendor's client (boto3, google-cloud-storage), built from the same URI and the same
credentials chain, imported on first use so that a local root needs neither.

The conditional put is never retried by the client: a retry of a put whose first attempt
landed (the answer lost on the way) would be refused, and the caller, taking that for
another writer's win, would apply its change twice (a rollback stepping back two versions).
So a lost answer surfaces as the client's error, and the caller's operation fails instead.
A put the store refused for its request rate (S3's 503 SlowDown) wrote nothing, and is sent
again after a pause.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Protocol, TypeVar
from urllib.parse import parse_qs, urlparse

class ConditionalWrites(Protocol):
    def read(self, path: str) -> tuple[bytes | None, str | None]:
        """The object's bytes and its version token (None, None when absent)."""

    def write(self, path: str, data: bytes, token: str | None) -> bool:
        """Write ``data`` only if the object is still at ``token`` (None: only if absent);
        False if another writer got there first."""


_T = TypeVar("_T")
READ_ATTEMPTS = 4
# What a store answers a request it refused before acting on it (its request rate): safe to
# send again, conditional or not. Not a 500, nor a connection cut, after which a put may have landed.
S3_REFUSALS = ("SlowDown", "TooManyRequests", "RequestLimitExceeded", "Throttling", "ThrottlingException")


def conditional_writes(uri: str) -> ConditionalWrites:
    scheme = urlparse(uri).scheme
    if scheme == "s3":
        return _S3(uri)
    if scheme in ("gs", "gcs"):
        return _Gcs(uri)
    raise ValueError(f"tuneloop can share state on local paths, s3:// and gs:// roots, not on {uri!r}")


def _with_backoff(call: Callable[[], _T], retryable: Callable[[Exception], bool]) -> _T:
    """``call()``, sent again after a random pause that doubles each time while it raises an
    error ``retryable`` accepts, READ_ATTEMPTS times in all."""
    attempt = 0
    while True:
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - ``retryable`` decides; the rest go up as they are
            attempt += 1
            if not retryable(e) or attempt == READ_ATTEMPTS:
                raise
        time.sleep(random.uniform(0, 0.05 * 2 ** attempt))


def _split(path: str) -> tuple[str, str]:
    bucket, _, key = path.partition("/")
    return bucket, key


def _option(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[0] if values else None


class _S3:
    """boto3 against the endpoint and region the URI names (pyarrow's query options:
    ``endpoint_override``, ``scheme``, ``region``), with keys from boto3's usual chain
    (environment, profile, instance role), as pyarrow takes them: the config refuses keys
    in the URI."""

    def __init__(self, uri: str):
        import boto3
        import botocore.config
        import botocore.exceptions

        query = parse_qs(urlparse(uri).query)
        endpoint = _option(query, "endpoint_override")
        if endpoint and "://" not in endpoint:
            endpoint = f"{_option(query, 'scheme') or 'https'}://{endpoint}"
        self._client = boto3.client(
            "s3", endpoint_url=endpoint, region_name=_option(query, "region"),
            config=botocore.config.Config(retries={"total_max_attempts": 1}))  # see the module's docstring
        self._error = botocore.exceptions.ClientError
        # A connection refused, reset or timed out: a read is safe to send again.
        self._transport = (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError)

    def read(self, path: str) -> tuple[bytes | None, str | None]:
        """A read is safe to repeat, unlike the conditional put: a 5xx (S3's 500 or 503
        SlowDown; the local endpoint's 500 under a concurrent put) or a connection that
        failed is retried with backoff."""
        bucket, key = _split(path)

        def get() -> tuple[bytes | None, str | None]:
            try:
                got = self._client.get_object(Bucket=bucket, Key=key)
            except self._error as e:
                if e.response["Error"]["Code"] in ("NoSuchKey", "404"):
                    return None, None
                raise
            return got["Body"].read(), got["ETag"]

        return _with_backoff(get, lambda e: isinstance(e, self._transport) or (
            isinstance(e, self._error) and e.response["ResponseMetadata"].get("HTTPStatusCode", 0) >= 500))

    def write(self, path: str, data: bytes, token: str | None) -> bool:
        """One conditional put; sent again only when the store refused it for its request
        rate (S3_REFUSALS), which writes nothing: a promote hitting S3's SlowDown failed."""
        bucket, key = _split(path)
        condition = {"IfMatch": token} if token is not None else {"IfNoneMatch": "*"}

        def put() -> bool:
            try:
                self._client.put_object(Bucket=bucket, Key=key, Body=data, **condition)
            except self._error as e:
                # 412: someone wrote first; 409: a concurrent conditional write is in flight.
                if e.response["ResponseMetadata"].get("HTTPStatusCode") in (409, 412):
                    return False
                raise
            return True

        return _with_backoff(put, lambda e: isinstance(e, self._error) and e.response["Error"].get("Code") in S3_REFUSALS)


class _Gcs:
    """google-cloud-storage, generation-matched; ``STORAGE_EMULATOR_HOST`` or the URI's
    ``endpoint_override`` points it at another endpoint (an emulator in the tests)."""

    def __init__(self, uri: str):
        from google.api_core.exceptions import NotFound, PreconditionFailed
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        query = parse_qs(urlparse(uri).query)
        endpoint = _option(query, "endpoint_override")
        if endpoint:
            if "://" not in endpoint:
                endpoint = f"{_option(query, 'scheme') or 'https'}://{endpoint}"
            anonymous = _option(query, "anonymous") == "true"
            self._client = storage.Client(
                project=_option(query, "project_id") or "tuneloop",
                credentials=AnonymousCredentials() if anonymous else None,
                client_options={"api_endpoint": endpoint})
        else:
            self._client = storage.Client()
        self._not_found, self._precondition = NotFound, PreconditionFailed

    def read(self, path: str) -> tuple[bytes | None, str | None]:
        bucket, key = _split(path)
        blob = self._client.bucket(bucket).blob(key)
        try:
            data = blob.download_as_bytes()
        except self._not_found:
            return None, None
        return data, str(blob.generation)

    def write(self, path: str, data: bytes, token: str | None) -> bool:
        bucket, key = _split(path)
        blob = self._client.bucket(bucket).blob(key)
        try:
            blob.upload_from_string(data, if_generation_match=int(token) if token is not None else 0,
                                    retry=None)  # see the module's docstring
        except self._precondition:
            return False
        return True
