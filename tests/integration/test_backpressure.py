"""Overload against a real Serve app: a full queue answers 503 + Retry-After at once,
a request past its timeout too, and the server serves normally as soon as load drops."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from cluster.server import wait_ready
from tests.integration.conftest import make_config, publish_version


def _deploy(cfg, metrics_dir, port):
    from ray import serve

    from serving.app import APP_NAME, build_app

    publish_version(cfg, cfg.models[0].base_model)
    serve.run(build_app(cfg, metrics_dir), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)
    return url


async def _flood(url: str, n: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(limits=limits, timeout=60) as c:
        return await asyncio.gather(*(
            c.post(f"{url}/v1/models/sentiment/predict", json={"inputs": [f"text {i}"] * 8}) for i in range(n)
        ))


@pytest.fixture
def tight(ray_session, serve_port, metrics_dir, tiny_model, tmp_path):
    from ray import serve

    from serving.app import APP_NAME

    # One text per batch, 4 in flight, 1 queued: a burst of 60 requests of 8 texts overflows.
    cfg = make_config(tmp_path / "store", tiny_model, None,
                      serving={"max_batch_size": 1, "max_queued_requests": 1, "adaptive_batching": False})
    yield _deploy(cfg, metrics_dir, serve_port)
    serve.delete(APP_NAME)


def test_full_queue_answers_503_with_retry_after_then_recovers(tight):
    responses = asyncio.run(_flood(tight, 60))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    rejected = [r for r in responses if r.status_code == 503]
    assert rejected, "the burst never overflowed the queue"
    assert 200 in codes
    for r in rejected:
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "overloaded"
    # Load gone: the next requests are served normally.
    for _ in range(3):
        r = httpx.post(f"{tight}/v1/models/sentiment/predict", json={"inputs": ["calm again"]}, timeout=30)
        assert r.status_code == 200
    metrics = httpx.get(f"{tight}/metrics").text
    assert 'outcome="rejected"' in metrics


@pytest.fixture
def impatient(ray_session, serve_port, metrics_dir, tiny_model, tmp_path):
    from ray import serve

    from serving.app import APP_NAME

    cfg = make_config(tmp_path / "store", tiny_model, None, serving={"request_timeout_s": 0.001})
    yield _deploy(cfg, metrics_dir, serve_port)
    serve.delete(APP_NAME)


def test_request_past_its_timeout_gets_503(impatient):
    r = httpx.post(f"{impatient}/v1/models/sentiment/predict", json={"inputs": ["x"] * 8}, timeout=30)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "did not answer within" in r.json()["error"]["message"]
    assert httpx.get(f"{impatient}/healthz").status_code == 200
