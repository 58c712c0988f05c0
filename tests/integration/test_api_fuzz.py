"""Schemathesis against the app's own OpenAPI schema, over real HTTP: whatever it sends,
valid by the schema or not, the answer is never a 500 (or any 5xx but the contract's 503)."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.integration.conftest import ADMIN_KEY, FEEDBACK_KEY, bearer, make_config, publish_version, served

EXAMPLES = 40  # per operation and mode


@pytest.fixture(scope="module")
def api(ray_session, serve_port, metrics_dir, tiny_model, tmp_path_factory):
    cfg = make_config(tmp_path_factory.mktemp("fuzz-store"), tiny_model, None,
                      auth={"feedback_per_minute": 1e6, "feedback_burst": 10_000})
    publish_version(cfg, tiny_model)
    with served(cfg, metrics_dir, serve_port) as url:
        yield url


def _fuzz(url: str, key: str | None, skip: set[str] = frozenset()) -> tuple[int, list[str]]:
    schema = schemathesis.openapi.from_dict(httpx.get(f"{url}/openapi.json").json())
    sent, failures = 0, []
    for result in schema.get_all_operations():
        op = result.ok()
        if op.label in skip:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=EXAMPLES, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                nonlocal sent
                response = case.call(base_url=url, headers=bearer(key) if key else {}, timeout=30)
                sent += 1
                if response.status_code >= 500 and response.status_code != 503:
                    failures.append(f"{op.label} -> {response.status_code} {response.text[:200]}")
                if response.status_code >= 400:  # every error is the contract's JSON shape
                    assert set(response.json()["error"]) == {"code", "message"}, response.text

            try:
                run()
            except Unsatisfiable:
                pass  # nothing to make invalid (an operation without parameters or body)
    return sent, failures


def test_fuzzing_the_api_finds_no_server_error(api):
    # A feedback key reaches everything but the admin operations (403), then an admin key
    # fuzzes promote and rollback (retrain would start real training jobs).
    sent, failures = _fuzz(api, FEEDBACK_KEY)
    admin_sent, admin_failures = _fuzz(api, ADMIN_KEY, skip={"POST /v1/models/{model}/retrain"})
    print(f"\nfuzz: {sent + admin_sent} requests, {len(failures) + len(admin_failures)} server errors")
    assert sent > 200 and not failures, failures[:5]
    assert admin_sent > 0 and not admin_failures, admin_failures[:5]
