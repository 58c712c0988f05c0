"""Folding the metric files of a node's ended processes into one file per kind.

prometheus-client's multiprocess mode gives every process files of its own
(``<kind>_<pid>.db``: ``counter``, ``histogram``, ``gauge_<mode>``), and a process's counters
must outlive it, or a replica that ends would take its requests out of the node's totals
(a counter reset to Prometheus). So every replica that ever ran on a node left its files
there, and every /metrics scrape read and merged them all: weeks of autoscaling churn made
scrapes slower and slower. ``compact_ended`` folds the files of processes that have ended
into ``<kind>_archive.db``: counters and histograms add up, a ``mostrecent`` gauge keeps
its newest value, ``max``/``min``/``sum`` theirs, a ``live*`` gauge of an ended process is
dropped (prometheus-client's own ``mark_process_dead`` does that), and ``all`` gauges, a
series per process, stay as they are. The node's merged values are the same after as
before (``test_metric_compaction.py``).

Readers (a scrape) hold the folder's lock shared while they list and read its files; the
fold holds it exclusive, so no scrape sees an archive and the files it holds at once, or
neither. Not covered: a process killed between writing the archive and removing the
files folded into it (a few unlink calls) leaves both, and the node's counters read high
by that process's values from then on.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client.mmap_dict import MmapedDict

log = logging.getLogger(__name__)

ARCHIVE = "archive"  # in place of a pid: <kind>_archive.db
LOCK_FILE = ".compact.lock"
_ADDED = ("counter", "histogram", "summary", "gauge_sum", "gauge_livesum")


@contextmanager
def folder_lock(folder: str, exclusive: bool) -> Iterator[None]:
    """``folder``'s lock: shared for readers of its files, exclusive for ``compact_ended``."""
    fd = os.open(os.path.join(folder, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def _kind_and_pid(name: str) -> tuple[str, str] | None:
    """("counter", "123") of counter_123.db, ("gauge_mostrecent", "123") of a gauge's."""
    if not name.endswith(".db"):
        return None
    kind, _, pid = name[:-3].rpartition("_")
    return (kind, pid) if kind else None


def _ended(pid: str) -> bool:
    """Whether process ``pid`` of this host has ended (an archive, or a process of another
    user, is not)."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _fold(kind: str, values: dict[str, tuple[float, float]], key: str, value: float, timestamp: float) -> None:
    old = values.get(key)
    if old is None:
        values[key] = (value, timestamp)
    elif kind in _ADDED:
        values[key] = (old[0] + value, max(old[1], timestamp))
    elif kind.endswith("mostrecent"):
        values[key] = max(old, (value, timestamp), key=lambda v: v[1])
    elif kind.endswith("max"):
        values[key] = max(old, (value, timestamp))
    elif kind.endswith("min"):
        values[key] = min(old, (value, timestamp))


def compact_ended(folder: str) -> int:
    """Folds the files of ``folder``'s ended processes into one archive per kind; returns
    how many files it folded (or, for ``live*`` gauges, removed)."""
    with folder_lock(folder, exclusive=True):
        ended: dict[str, list[str]] = {}
        for name in sorted(os.listdir(folder)):
            parsed = _kind_and_pid(name)
            if parsed is not None and _ended(parsed[1]) and parsed[0] != "gauge_all":
                ended.setdefault(parsed[0], []).append(os.path.join(folder, name))
        done = 0
        for kind, paths in ended.items():
            if kind.startswith("gauge_live"):  # only live processes count: an ended one's values go
                for path in paths:
                    os.unlink(path)
                done += len(paths)
                continue
            archive = os.path.join(folder, f"{kind}_{ARCHIVE}.db")
            values: dict[str, tuple[float, float]] = {}
            for path in ([archive] if os.path.exists(archive) else []) + paths:
                for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(path):
                    _fold(kind, values, key, value, timestamp)
            staged = archive + ".tmp"  # not *.db: no reader lists it
            if os.path.exists(staged):
                os.unlink(staged)  # a fold that died before its rename
            written = MmapedDict(staged)
            for key, (value, timestamp) in values.items():
                written.write_value(key, value, timestamp)
            written.close()
            os.replace(staged, archive)
            for path in paths:
                os.unlink(path)
            done += len(paths)
        if done:
            log.info("metrics: folded %d files of ended processes in %s", done, folder)
        return done
