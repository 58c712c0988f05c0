"""Ray Serve's fast data path: HAProxy (C) as the HTTP ingress instead of the Python proxy,
and direct gRPC between replicas. Measured here on 2 cores: /healthz p50 9.6 -> 1.3 ms,
one predict 23 -> 13 ms (benchmarks/serve_bench.py has the full table).

Serve reads these variables when it is imported and when Ray starts its processes, so
they are set first thing, before anything imports ray. An operator's own setting wins.
"""

from __future__ import annotations

import os
import socket

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
HAPROXY_PORT_VARS = ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT")


def enable_fast_path(private_haproxy_ports: bool = False) -> None:
    """``private_haproxy_ports`` moves HAProxy's side listeners to free ports, so a second
    Serve on the machine (a test session or a benchmark beside `tuneloop run`) can start."""
    for key, value in FAST_PATH_ENV.items():
        os.environ.setdefault(key, value)
    if private_haproxy_ports:
        for var in HAPROXY_PORT_VARS:
            os.environ.setdefault(var, str(free_port()))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
