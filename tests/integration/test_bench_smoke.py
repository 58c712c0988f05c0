"""The serving benchmark runs end to end and prints its table (no timing assertions)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tuneloop.serving.fast_path import HAPROXY_PORT_VARS

ROOT = Path(__file__).resolve().parents[2]
# Its own Ray and Serve, every cell of the table: about 70 s, so `make bench-smoke`, not `make test`.
pytestmark = pytest.mark.slow


def test_serve_bench_smoke_prints_the_table():
    # The benchmark starts its own Ray and Serve beside this session's: it must not reuse
    # this session's metrics folder or HAProxy side ports.
    private = {"PROMETHEUS_MULTIPROC_DIR", *HAPROXY_PORT_VARS}
    env = {k: v for k, v in os.environ.items() if k not in private}
    out = subprocess.run(
        # One text set: the long set's cells add time, not code paths.
        [sys.executable, str(ROOT / "benchmarks" / "serve_bench.py"), "--smoke", "--sets", "short"],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| server | texts | clients | texts/s | p50 ms")
    servers = {line.split("|")[1].strip() for line in lines[2:]}
    assert servers == {"bare model", "tuneloop", "naive"}
    for line in lines[2:]:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert float(cells[3]) > 0, line  # every cell served something
        if cells[0] != "bare model":
            assert cells[-1] == "0", line  # and no request failed
    assert any(c.startswith("open ") for c in (line.split("|")[3].strip() for line in lines[2:]))
    assert "p99 at half the peak throughput" in out.stdout
