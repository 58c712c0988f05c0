"""Ray Serve's fast data path: HAProxy (C) as the HTTP ingress instead of the Python proxy,
and direct gRPC between replicas. Measured here on 2 cores: /healthz p50 9.6 -> 1.3 ms,
one predict 23 -> 13 ms (benchmarks/serve_bench.py has the full table).

Serve reads these variables when it is imported and when Ray starts its processes, so
they are set first thing, before anything imports ray. An operator's own setting wins.
"""

from __future__ import annotations

import os
import socket
import sys

from tuneloop.core.log_lines import log_tuneloop_to
from tuneloop.core.serving_config import HAPROXY_PORT_DEFAULTS
from tuneloop.store.storage import private_temp_dir

FAST_PATH_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # A stopping replica stays open this long so load balancers can deregister it; 30 s
    # by default, sized for external balancers. HAProxy runs on the node, reloads within
    # a second or two and retries refused connections, so 5 s suffices; at 30 s every
    # Ctrl-C and every scale-down took over half a minute.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
}


# HAProxy's own metrics and stats listeners, on fixed ports by default (9101, 8404).
HAPROXY_PORT_VARS = tuple(HAPROXY_PORT_DEFAULTS)

# Ray's HAProxy keeps its config, state and an admin socket (``stats socket ... mode 666
# level admin``: anyone who can reach it can reconfigure the proxy) under the world-readable
# /tmp/haproxy-serve. tuneloop moves them into a folder only its own user can enter; Serve
# adds a folder per node below it. HAPROXY_DIR_ENV names that folder.
HAPROXY_DIR_ENV = "TUNELOOP_HAPROXY_DIR"
_HAPROXY_FILE_VARS = {
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
}


def enable_fast_path(private_haproxy_ports: bool = False) -> None:
    """``private_haproxy_ports`` moves HAProxy's side listeners to free ports, so a second
    Serve on the machine (a test session or a benchmark beside `tuneloop run`) can start."""
    for key, value in FAST_PATH_ENV.items():
        os.environ.setdefault(key, value)
    if private_haproxy_ports:
        for var in HAPROXY_PORT_VARS:
            os.environ.setdefault(var, str(free_port()))
    base = haproxy_dir()
    os.environ.setdefault("RAY_SERVE_HAPROXY_SERVER_STATE_BASE", base)
    for var, name in _HAPROXY_FILE_VARS.items():
        os.environ.setdefault(var, os.path.join(base, name))


def log_to_stderr() -> None:
    """tuneloop's own lines of a Serve replica on the process's real stderr, at info (Ray's
    log files for the worker, and the console of a local `tuneloop run`). Throughput-
    optimized Serve keeps the ``ray.serve`` logger's records in memory, 1,000 at a time (an
    ERROR flushes them), and sends none to stderr, which it redirects into that logger: a
    replica's warnings (an artifact that did not load, a named runtime not served) reached no
    file and no console. A process whose ``tuneloop`` logger has a handler (a local Ray's
    worker setup) keeps it; outside a replica (a test constructing one) nothing changes."""
    from ray import serve

    try:
        serve.get_replica_context()
    except Exception:  # noqa: BLE001 - RayServeException: not in a replica
        return
    log_tuneloop_to(sys.__stderr__)


def haproxy_dir() -> str:
    """A folder for HAProxy's files that only this user may enter (made 0700)."""
    path = os.environ.get(HAPROXY_DIR_ENV) or private_temp_dir("tuneloop-haproxy")
    os.environ[HAPROXY_DIR_ENV] = path  # Ray's processes inherit it, and find the same folder
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
