"""Lines Ray prints on the driver's console that say nothing an operator can act on, dropped
there: the raylet's worker-startup warnings, and the failed calls tuneloop's own stop causes.

`serve.shutdown()` kills Serve's controller with ``ray.kill`` while calls to it are under
way (the proxies' and handles' long polls, its own graceful shutdown), and Ray reports each
as a failed task on the driver's stdout: every Ctrl-C of `tuneloop run` ended with

    (raylet) Task ServeController.graceful_shutdown failed. There are infinite retries
    remaining, so the task will be retried. Error: The actor is dead because it was killed
    by `ray.kill`.

which reads as an error where the stop went as planned. Ray prints them from a thread of
its own, to whatever ``sys.stdout`` is at that moment; nothing in its API turns them off.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO


_RAYLET_WORKER_STARTUP = re.compile(r"(\x1b\[[0-9;]*m)?\(raylet\)(\x1b\[[0-9;]*m)? WARNING: \d+ PYTHON worker "
                                    r"processes have been started on node")


def worker_startup_warning(line: str) -> bool:
    """The raylet's "WARNING: 8 PYTHON worker processes have been started on node ..., which is
    4x the maximum expected startup concurrency (2)": a training job's workers and Ray Train's
    own actors starting beside the replicas on a small machine, seven times a first `make
    run`; nothing an operator of tuneloop can act on."""
    # Anchored at the line's start: a line of tuneloop's that Ray's thread wrote into (a print
    # is two writes, its text and its newline) keeps its own start, and is kept.
    return _RAYLET_WORKER_STARTUP.match(line) is not None


def killed_serve_call(line: str) -> bool:
    """A call to Serve's controller reported failed because the stop killed it."""
    return "Task ServeController." in line and "killed by `ray.kill`" in line


class LineFilter:
    """A text stream that passes on ``stream`` every whole line ``drop`` does not match."""

    def __init__(self, stream: TextIO, drop: Callable[[str], bool]):
        self.stream, self.drop = stream, drop
        self._pending, self._lock = "", threading.Lock()  # Ray's log thread and ours write

    def write(self, text: str) -> int:
        with self._lock:
            *lines, self._pending = (self._pending + text).split("\n")
            for line in lines:
                if not self.drop(line):
                    self.stream.write(line + "\n")
        return len(text)

    def close_pending(self) -> None:
        with self._lock:
            if self._pending and not self.drop(self._pending):
                self.stream.write(self._pending)
            self._pending = ""

    def flush(self) -> None:
        """Passes on a partial line too: a prompt (``print(..., end="", flush=True)``) shows
        when it is flushed, not at the next newline."""
        self.close_pending()
        self.stream.flush()

    def __getattr__(self, name: str):  # isatty, encoding, fileno: the stream's own
        return getattr(self.stream, name)


def quiet_driver_console() -> None:
    """For a driver's whole life (`tuneloop run`, `tuneloop train`): stdout without the raylet's
    worker-startup warnings, and Ray's colour codes left out of what is not a terminal (a
    log file held ``ESC[36m`` before every worker's line)."""
    if sys.stdout is None:  # started with its stdout closed: Ray prints nothing either
        return
    # Ray prints workers' lines to stdout, or to stderr where the driver sends them there
    # (`tuneloop train` keeps stdout for its JSON): colours only where both are terminals.
    if not (sys.stdout.isatty() and sys.stderr is not None and sys.stderr.isatty()):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # read by Ray at each line it prints
    if not isinstance(sys.stdout, LineFilter):
        sys.stdout = LineFilter(sys.stdout, worker_startup_warning)
        atexit.register(sys.stdout.close_pending)


@contextmanager
def without_stop_noise() -> Iterator[None]:
    """Around `serve.shutdown()` and `ray.shutdown()`: stdout without the failed calls the
    stop itself causes."""
    original, sys.stdout = sys.stdout, LineFilter(sys.stdout, killed_serve_call)
    try:
        yield
    finally:
        filtered, sys.stdout = sys.stdout, original
        if isinstance(filtered, LineFilter):
            filtered.close_pending()
