"""Acknowledged feedback survives kill -9 of serving processes and of the whole local Ray
cluster, exactly once, even when clients retry requests whose answers were lost. Slow (minutes): `make crash-test` runs it; `make test` does not.

A real `tuneloop run` serves; four clients post feedback, each retrying a record with its
Idempotency-Key until it is acknowledged; a killer sends SIGKILL at random
moments to the ingress replica, the model replica, or every process of the server (driver,
GCS, raylet, workers, HAProxy), restarting the server after the last. At the end the server
restarts once more (recovery), compacts, stops, and the Parquet files are read with pyarrow.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pyarrow.dataset as pads
import pytest
import yaml

from tuneloop.control.server import wait_ready
from tuneloop.serving.fast_path import HAPROXY_PORT_VARS, free_port
from tests.integration.conftest import FEEDBACK_KEY, LABELS, bearer, make_config, publish_version
from tests.tiny_models import build_tiny_model

pytestmark = pytest.mark.slow

MIN_RECORDS, MIN_KILLS = 1000, 5
TUNELOOP = str(Path(sys.executable).with_name("tuneloop"))


class Server:
    def __init__(self, config_path: Path, port: int, log: Path):
        self.config_path, self.url, self.log, self.port = config_path, f"http://127.0.0.1:{port}", log, port
        self.proc: subprocess.Popen | None = None
        self.env = {k: v for k, v in os.environ.items() if k not in {"PROMETHEUS_MULTIPROC_DIR", *HAPROXY_PORT_VARS}}
        for var in HAPROXY_PORT_VARS:
            self.env[var] = str(free_port())

    def start(self, timeout_s: float = 180) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([TUNELOOP, "run", "--config", str(self.config_path)], stdout=out,
                                         stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        wait_ready(self.url, timeout_s, alive=lambda: self.proc.poll() is None)

    def processes(self) -> list[psutil.Process]:
        """The server's process tree, plus whatever listens on its port: HAProxy daemonizes
        and so leaves the tree, yet is part of the cluster."""
        procs = {}
        try:
            root = psutil.Process(self.proc.pid)
            procs = {p.pid: p for p in [root, *root.children(recursive=True)]}
        except psutil.NoSuchProcess:
            pass
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == self.port and conn.status == psutil.CONN_LISTEN and conn.pid:
                procs.setdefault(conn.pid, psutil.Process(conn.pid))
        return list(procs.values())

    def find(self, marker: str) -> psutil.Process | None:
        for p in self.processes():
            try:
                if marker in " ".join(p.cmdline()):
                    return p
            except psutil.Error:
                continue
        return None

    def kill_all(self) -> None:
        procs = self.processes()
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=30)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.kill_all()


def test_acknowledged_feedback_survives_kill_9_exactly_once(tmp_path):
    weights = build_tiny_model(tmp_path / "tiny", LABELS)
    cfg = make_config(tmp_path / "store", weights, None, serving={"port": free_port()},
                      feedback={"compact_interval_s": 1.0}, ray={"num_cpus": 4},
                      auth={"feedback_per_minute": 1e6, "feedback_burst": 10_000})
    publish_version(cfg, weights)
    config_path = tmp_path / "tuneloop.yaml"
    config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    server = Server(config_path, cfg.serving.port, tmp_path / "server.log")
    server.start()

    acked: dict[str, str] = {}  # text -> feedback_id, for every 202
    lock, stop = threading.Lock(), threading.Event()
    counter = iter(range(10**9))

    def client():
        """Like a careful client: each record is retried with the same Idempotency-Key until
        it is acknowledged, so a request whose answer a kill swallowed (stored or not) is
        sent again, and must still be stored exactly once."""
        with httpx.Client(timeout=10, headers=bearer(FEEDBACK_KEY)) as c:
            while not stop.is_set():
                with lock:
                    n = next(counter)
                text, key = f"record {n}", f"key-{n}"
                while not stop.is_set():
                    try:
                        r = c.post(f"{server.url}/v1/feedback", headers={"Idempotency-Key": key},
                                   json={"model": "sentiment", "text": text, "label": "positive"})
                    except httpx.HTTPError:
                        time.sleep(0.2)
                        continue
                    if r.status_code == 202:
                        with lock:
                            acked[text] = r.json()["feedback_id"]
                        break
                    time.sleep(0.2)

    clients = [threading.Thread(target=client) for _ in range(4)]
    for t in clients:
        t.start()
    rng = random.Random(7)
    kills: list[str] = []
    # Every kind of victim at least once, then at random, until both minimums are met.
    plan = ["ingress", "cluster", "model"]
    try:
        while len(kills) < MIN_KILLS or len(acked) < MIN_RECORDS:
            time.sleep(rng.uniform(2, 5))
            victim = plan[0] if plan else rng.choice(["ingress", "model", "cluster"])
            if victim == "cluster":
                server.kill_all()
                server.start()
            else:
                marker = "ServeReplica:tuneloop:Ingress" if victim == "ingress" else "ServeReplica:tuneloop-model-"
                proc = server.find(marker)
                if proc is None:  # not up again yet: the plan keeps it for the next round
                    continue
                proc.send_signal(signal.SIGKILL)
            if plan:
                plan.pop(0)
            kills.append(victim)
    finally:
        stop.set()
        for t in clients:
            t.join()
    # Restart once more: the new ingress recovers whatever the journal still holds.
    server.kill_all()
    server.start()
    journal = Path(cfg.storage.journal_path())
    deadline = time.monotonic() + 60
    # A writer opens a segment only for its first record: wait for every segment to go.
    while list(journal.glob("*.wal")) and time.monotonic() < deadline:
        time.sleep(0.5)
    server.stop()

    rows = pads.dataset(str(Path(cfg.storage.root) / "feedback" / "sentiment"), format="parquet",
                        partitioning="hive").to_table(columns=["feedback_id", "text"]).to_pylist()
    stored: dict[str, list[str]] = {}
    for row in rows:
        stored.setdefault(row["text"], []).append(row["feedback_id"])
    lost = [t for t in acked if t not in stored]
    duplicated = [t for t, ids in stored.items() if len(ids) > 1]
    wrong_id = [t for t, fid in acked.items() if t in stored and stored[t] != [fid]]
    print(f"\nacknowledged {len(acked)} records over {len(kills)} kills ({', '.join(kills)}); "
          f"stored {len(rows)}; lost {len(lost)}; duplicated {len(duplicated)}")
    assert len(kills) >= MIN_KILLS and {"cluster", "ingress", "model"} <= set(kills)
    assert len(acked) >= MIN_RECORDS
    assert not lost, lost[:5]
    assert not duplicated, duplicated[:5]
    assert not wrong_id, wrong_id[:5]
