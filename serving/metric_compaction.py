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
neither. The fold is opportunistic: it waits at most LOCK_WAIT_S for the lock (a scrape
renders under it), folds at most MAX_FILES_A_FOLD files (the lock bounds scrapes too), and
sets a file it cannot read aside (``.unreadable``); the next process to start on the node goes on.

A fold killed half-way neither loses nor doubles a value: it writes the new archive aside
(``.tmp``), renames the files it folded to ``.folding`` (no reader lists them), replaces
the archive, then deletes them. The next fold finds what was left: with the ``.tmp`` still
there the archive was not replaced, and the files go back; without it they are in the
archive, and go. (Scrapes in between, before the next process starts on the node, miss the
renamed files' values.)
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client.mmap_dict import MmapedDict

log = logging.getLogger(__name__)

ARCHIVE = "archive"  # in place of a pid: <kind>_archive.db
LOCK_FILE = ".compact.lock"
FOLDING = ".folding"  # a file being folded, between the archive's replacement and its deletion
UNREADABLE = ".unreadable"  # an ended process's file no merge can read, kept aside
LOCK_WAIT_S = 2.0
MAX_FILES_A_FOLD = 1000
_ADDED = ("counter", "histogram", "summary", "gauge_sum", "gauge_livesum")


@contextmanager
def folder_lock(folder: str, exclusive: bool, wait_s: float | None = None) -> Iterator[bool]:
    """``folder``'s lock: shared for readers of its files, exclusive for ``compact_ended``;
    with ``wait_s``, gives up after that long (the block gets False)."""
    fd = os.open(os.path.join(folder, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        yield _take(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, wait_s)
    finally:
        os.close(fd)  # releases the lock


def _take(fd: int, mode: int, wait_s: float | None) -> bool:
    if wait_s is None:
        fcntl.flock(fd, mode)
        return True
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
        time.sleep(0.05)


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
    how many files it folded (or, for ``live*`` gauges, removed). 0 if a scrape kept the
    lock past LOCK_WAIT_S."""
    with folder_lock(folder, exclusive=True, wait_s=LOCK_WAIT_S) as locked:
        if not locked:
            log.info("metrics: %s busy; its ended processes' files are left for the next fold", folder)
            return 0
        _finish_interrupted(folder, os.listdir(folder))
        ended: dict[str, list[str]] = {}
        for name in sorted(os.listdir(folder)):
            parsed = _kind_and_pid(name)
            if parsed is not None and _ended(parsed[1]) and parsed[0] != "gauge_all":
                ended.setdefault(parsed[0], []).append(os.path.join(folder, name))
        done, budget = 0, MAX_FILES_A_FOLD
        for kind, paths in ended.items():
            paths = paths[:budget]
            if not paths:
                break
            budget -= len(paths)
            done += _fold_kind(folder, kind, paths)
        if done:
            log.info("metrics: folded %d files of ended processes in %s", done, folder)
        return done


def _fold_kind(folder: str, kind: str, paths: list[str]) -> int:
    if kind.startswith("gauge_live"):  # only live processes count: an ended one's values go
        for path in paths:
            os.unlink(path)
        return len(paths)
    archive = os.path.join(folder, f"{kind}_{ARCHIVE}.db")
    values: dict[str, tuple[float, float]] = {}
    if os.path.exists(archive):
        for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(archive):
            _fold(kind, values, key, value, timestamp)
    folded = []
    for path in paths:
        try:
            read = list(MmapedDict.read_all_values_from_file(path))
        except Exception as e:  # noqa: BLE001 - cut by a process killed as it made it
            # Its process has ended, so it never will be whole; as *.db it failed every merge
            # of the node's files (a scrape on one machine). Kept aside, under a name no reader lists.
            log.warning("metrics: cannot read %s (%s); set aside as %s", path, e, path + UNREADABLE)
            os.replace(path, path + UNREADABLE)
            continue
        for key, value, timestamp, _ in read:
            _fold(kind, values, key, value, timestamp)
        folded.append(path)
    if not folded:
        return 0
    staged = archive + ".tmp"  # not *.db: no reader lists it; none is left (_finish_interrupted)
    written = MmapedDict(staged)
    for key, (value, timestamp) in values.items():
        written.write_value(key, value, timestamp)
    written.close()
    for path in folded:
        os.replace(path, path + FOLDING)
    os.replace(staged, archive)
    for path in folded:
        os.unlink(path + FOLDING)
    return len(folded)


def _finish_interrupted(folder: str, names: list[str]) -> None:
    """What a fold killed half-way left (see the module's docstring): files it renamed go
    back when its archive was not replaced (its ``.tmp`` is there), and go otherwise."""
    staged = {n[: -len(".tmp")] for n in names if n.endswith(f"_{ARCHIVE}.db.tmp")}
    for name in names:
        if not name.endswith(FOLDING):
            continue
        original = name[: -len(FOLDING)]
        parsed = _kind_and_pid(original)
        path = os.path.join(folder, name)
        if parsed is not None and f"{parsed[0]}_{ARCHIVE}.db" in staged:
            os.replace(path, os.path.join(folder, original))
        else:
            os.unlink(path)
    for archive in staged:
        os.unlink(os.path.join(folder, archive + ".tmp"))
