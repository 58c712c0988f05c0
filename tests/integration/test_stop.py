"""A stop answers what it holds: requests in flight at a Ctrl-C or SIGTERM of a real
`tuneloop run` get their answers before the server goes. Slow (a server's start and stop,
about a minute): `make crash-test` runs it; `make test` does not.

Serve's shutdown stops its HTTP proxy first, and every request in flight was cut off
("server disconnected without sending a response") within 0.2 s of the signal; the server
now deletes its applications and waits while their replicas answer (``server.drain``).
"""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest
import yaml

from tests.integration.conftest import LABELS, make_config, publish_version
from tests.integration.test_feedback_crash import Server
from tests.tiny_models import build_tiny_model
from tuneloop.serving.fast_path import free_port

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_requests_in_flight_at_a_stop_are_answered(tmp_path, signum):
    weights = build_tiny_model(tmp_path / "tiny", LABELS)
    cfg = make_config(tmp_path / "store", weights, None, ray={"num_cpus": 4},
                      serving={"port": free_port(), "max_inputs_per_request": 64, "max_chars_per_input": 2000,
                               "max_batch_size": 64})
    publish_version(cfg, weights)
    config_path = tmp_path / "tuneloop.yaml"
    config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    server = Server(config_path, cfg.serving.port, tmp_path / "server.log")
    server.start()
    deadline = time.monotonic() + 120  # the server's own start done (its retrain controller too)
    while "tuneloop ready at" not in server.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    body = {"inputs": [("a long review of a film " * 100)[:2000]] * 64}  # 128 tokens each: queued a while
    outcomes: list[tuple[float, str]] = []  # (when sent, what came back)
    lock, stop = threading.Lock(), threading.Event()

    def client():
        with httpx.Client(timeout=120) as c:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    r = c.post(f"{server.url}/v1/models/sentiment/predict", json=body)
                    outcome = str(r.status_code)
                except httpx.HTTPError as e:
                    outcome = type(e).__name__
                with lock:
                    outcomes.append((sent, outcome))

    clients = [threading.Thread(target=client) for _ in range(24)]
    for t in clients:
        t.start()
    time.sleep(3)
    signalled = time.monotonic()
    server.proc.send_signal(signum)
    stop.set()
    server.proc.wait(timeout=120)
    for t in clients:
        t.join(timeout=120)
    before = [o for sent, o in outcomes if sent < signalled - 0.1]
    in_flight = [o for sent, o in outcomes if signalled - 1.0 < sent < signalled - 0.1]
    assert in_flight and before, outcomes[-30:]
    assert set(before) == {"200"}, sorted(set(before))  # none cut off, none refused
    assert server.proc.returncode == 0
    console = server.log.read_text()
    assert "tuneloop: stopped (" in console.splitlines()[-1], console[-2000:]  # the stop says it is over
    assert "\x1b[" not in console  # a log file: no colour codes of Ray's
