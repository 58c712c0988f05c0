"""Overload against a real Serve app: a full queue answers 503 + Retry-After at once,
a request past its timeout too, and the server serves normally as soon as load drops."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import httpx
import pytest

from tests.integration.conftest import make_config, publish_version, served


async def _flood(url: str, n: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(limits=limits, timeout=60) as c:
        return await asyncio.gather(*(
            c.post(f"{url}/v1/models/sentiment/predict", json={"inputs": [f"text {i}"] * 8}) for i in range(n)
        ))


@pytest.fixture
def tight(ray_session, serve_port, metrics_dir, tiny_model, tmp_path):
    # One text per batch, 4 in flight, 1 queued: a burst of 60 requests of 8 texts overflows.
    cfg = make_config(tmp_path / "store", tiny_model, None,
                      serving={"max_batch_size": 1, "max_queued_requests": 1, "adaptive_batching": False,
                               "num_replicas": 1})
    publish_version(cfg, tiny_model)
    with served(cfg, metrics_dir, serve_port) as url:
        yield url


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
    cfg = make_config(tmp_path / "store", tiny_model, None,
                      serving={"request_timeout_s": 0.001, "target_batch_latency_s": 0.0005})
    publish_version(cfg, tiny_model)
    with served(cfg, metrics_dir, serve_port) as url:
        yield url


def test_request_past_its_timeout_gets_503(impatient):
    r = httpx.post(f"{impatient}/v1/models/sentiment/predict", json={"inputs": ["x"] * 8}, timeout=30)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "did not answer within" in r.json()["error"]["message"] and r.json()["error"]["code"] == "overloaded"
    assert httpx.get(f"{impatient}/healthz").status_code == 200
    # A timeout, not an overload, to the metrics, and against the version that did not answer.
    metrics = httpx.get(f"{impatient}/metrics").text
    assert re.search(r'tuneloop_requests_total\{[^}]*outcome="timeout"[^}]*version="v1"[^}]*\} 1\.0', metrics), \
        [line for line in metrics.splitlines() if line.startswith("tuneloop_requests_total")]


@pytest.fixture
def elastic(ray_session, serve_port, metrics_dir, tiny_model, tmp_path):
    # One text per batch and a target of one request per replica: any load scales out.
    cfg = make_config(tmp_path / "store", tiny_model, None, serving={
        "max_batch_size": 1, "adaptive_batching": False,
        "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                        "upscale_delay_s": 0, "look_back_period_s": 11}})
    publish_version(cfg, tiny_model)
    with served(cfg, metrics_dir, serve_port) as url:
        yield url


def _replicas(url: str) -> int:
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith('tuneloop_replicas{model="sentiment"}'):
            return int(float(line.split()[-1]))
    raise AssertionError("tuneloop_replicas missing from /metrics")


def test_replicas_scale_out_under_load_within_bounds(elastic):
    assert _replicas(elastic) == 1
    stop = threading.Event()
    failures: list[str] = []

    def client():
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                r = c.post(f"{elastic}/v1/models/sentiment/predict", json={"inputs": ["busy"] * 8})
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text}")

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    samples, scaled_at = [], None
    try:
        deadline = time.monotonic() + 120
        # Sampled through the load, and for 5 s under it once scaled: a third replica shows.
        while time.monotonic() < deadline and (scaled_at is None or time.monotonic() - scaled_at < 5):
            time.sleep(1)
            samples.append(_replicas(elastic))
            if samples[-1] >= 2 and scaled_at is None:
                scaled_at = time.monotonic()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert 2 in samples, f"no second replica under load: {samples}"
    assert max(samples) == 2, f"past max_replicas: {samples}"
    assert not failures, failures[:3]
