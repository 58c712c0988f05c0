"""Start several writers at the same moment: the races the storage tests provoke."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from typing import Any


def in_processes(target: Callable[..., None], args: tuple, n: int, timeout_s: float = 120) -> None:
    """Run ``target(*args, start)`` in ``n`` spawned processes that wait on ``start`` and so
    begin together; fails unless every one exits 0."""
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=target, args=(*args, start)) for _ in range(n)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout_s)
    assert [p.exitcode for p in procs] == [0] * n


def in_threads(fn: Callable[[], Any], n: int) -> list[Any]:
    """``fn()`` in ``n`` threads at once; their results, or the first error raised."""
    out, errors = [], []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as e:  # noqa: BLE001 - re-raised below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out
