"""Ended processes' metric files fold into one archive per kind, and the node's values stay."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from tuneloop.serving.metric_compaction import compact_ended
from tuneloop.serving.metrics import FilesCollector


def _ended_pid() -> int:
    """A pid of this host whose process has ended."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write(folder, kind: str, pid, metric: str, rows: list[tuple[str, dict[str, str], float, float]]) -> None:
    values = MmapedDict(str(folder / f"{kind}_{pid}.db"))
    for name, labels, value, timestamp in rows:
        values.write_value(mmap_key(metric, name, list(labels), list(labels.values()), "help"), value, timestamp)
    values.close()


def _replica(folder, pid, requests: float, latency_bucket: float, resident: float, at: float) -> None:
    """What a replica process leaves: a counter, a histogram's bucket and sum, a gauge."""
    m = {"model": "m"}
    _write(folder, "counter", pid, "tuneloop_requests",
           [("tuneloop_requests_total", {**m, "version": "v1"}, requests, 0.0)])
    _write(folder, "histogram", pid, "tuneloop_latency_seconds",
           [("tuneloop_latency_seconds_bucket", {**m, "le": "0.1"}, latency_bucket, 0.0),
            ("tuneloop_latency_seconds_bucket", {**m, "le": "+Inf"}, 0.0, 0.0),
            ("tuneloop_latency_seconds_sum", m, latency_bucket / 20, 0.0)])
    _write(folder, "gauge_mostrecent", pid, "tuneloop_resident_bytes", [("tuneloop_resident_bytes", m, resident, at)])
    _write(folder, "gauge_livesum", pid, "tuneloop_inflight", [("tuneloop_inflight", m, 1.0, 0.0)])


def _merged(folder) -> dict:
    files = [str(folder / n) for n in os.listdir(folder) if n.endswith(".db")]
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in FilesCollector({"n": files}).collect() for s in family.samples}


def test_ended_processes_fold_into_one_archive_per_kind_and_the_values_stay(tmp_path):
    live = os.getpid()
    first, second, third = _ended_pid(), _ended_pid(), _ended_pid()
    _replica(tmp_path, first, requests=5, latency_bucket=3, resident=4e6, at=100.0)
    _replica(tmp_path, second, requests=7, latency_bucket=2, resident=0.0, at=200.0)  # unloaded last
    _replica(tmp_path, live, requests=11, latency_bucket=1, resident=9e6, at=150.0)
    before = _merged(tmp_path)

    assert compact_ended(str(tmp_path)) == 8  # 2 ended processes x 4 files
    names = sorted(n for n in os.listdir(tmp_path) if n.endswith(".db"))
    assert names == sorted(["counter_archive.db", "histogram_archive.db", "gauge_mostrecent_archive.db",
                            f"counter_{live}.db", f"histogram_{live}.db", f"gauge_mostrecent_{live}.db",
                            f"gauge_livesum_{live}.db"])
    after = _merged(tmp_path)
    # An ended process's live gauge no longer counts (as prometheus-client's own mark_process_dead has it) ...
    assert after.pop(("tuneloop_inflight", (("model", "m"), ("node", "n")))) == 1.0
    assert before.pop(("tuneloop_inflight", (("model", "m"), ("node", "n")))) == 3.0
    # ... and everything else reads as it did: counters and buckets add up, the newest gauge value wins.
    assert after == pytest.approx(before)  # the same sums, added in another order
    assert after[("tuneloop_requests_total", (("model", "m"), ("node", "n"), ("version", "v1")))] == 23
    assert after[("tuneloop_resident_bytes", (("model", "m"), ("node", "n")))] == 0.0
    assert after[("tuneloop_latency_seconds_bucket", (("le", "0.1"), ("model", "m"), ("node", "n")))] == 6

    # A later fold adds to the archive; nothing ended: nothing to do.
    _replica(tmp_path, third, requests=100, latency_bucket=1, resident=1.0, at=300.0)
    assert compact_ended(str(tmp_path)) == 4
    final = _merged(tmp_path)
    assert final[("tuneloop_requests_total", (("model", "m"), ("node", "n"), ("version", "v1")))] == 123
    assert final[("tuneloop_resident_bytes", (("model", "m"), ("node", "n")))] == 1.0
    assert compact_ended(str(tmp_path)) == 0


def test_a_fold_waits_for_a_scrape_reading_the_files(tmp_path):
    """A scrape that saw the archive and the files folded into it would count them twice."""
    import threading

    from tuneloop.serving.metric_compaction import folder_lock

    _replica(tmp_path, _ended_pid(), requests=5, latency_bucket=1, resident=1.0, at=1.0)
    folded = []
    with folder_lock(str(tmp_path), exclusive=False):
        fold = threading.Thread(target=lambda: folded.append(compact_ended(str(tmp_path))))
        fold.start()
        fold.join(timeout=0.3)
        assert fold.is_alive() and not folded  # waiting on the scrape
    fold.join(timeout=5)
    assert folded == [4]


def test_a_cut_file_is_set_aside_and_the_rest_fold(tmp_path):
    """A process killed as it created its file leaves 0 bytes: every replica of the node
    then failed to start, and every merge of the node's files (a scrape) failed on it."""
    _replica(tmp_path, _ended_pid(), requests=5, latency_bucket=1, resident=1.0, at=1.0)
    cut = tmp_path / f"counter_{_ended_pid()}.db"
    cut.write_bytes(b"")
    assert compact_ended(str(tmp_path)) == 4
    assert not cut.exists() and (tmp_path / f"{cut.name}.unreadable").exists()  # no merge reads it again
    assert _merged(tmp_path)[("tuneloop_requests_total", (("model", "m"), ("node", "n"), ("version", "v1")))] == 5


def _lasting(folder) -> dict:
    """The node's values that outlive a process (not its live gauges)."""
    return {k: v for k, v in _merged(folder).items() if k[0] != "tuneloop_inflight"}


def test_a_fold_killed_half_way_neither_loses_nor_doubles_a_value(tmp_path):
    """Killed after renaming the files it folds: the archive was not replaced (its .tmp is
    there), and the files go back. Killed after replacing it: the renamed files go."""
    from tuneloop.serving.metric_compaction import ARCHIVE, FOLDING

    _replica(tmp_path, _ended_pid(), requests=5, latency_bucket=1, resident=1.0, at=1.0)
    compact_ended(str(tmp_path))
    total = _lasting(tmp_path)
    pid = _ended_pid()
    _replica(tmp_path, pid, requests=7, latency_bucket=1, resident=2.0, at=2.0)
    expected = _lasting(tmp_path)
    # Before the archive was replaced: the counter file renamed, the new archive staged aside.
    (tmp_path / f"counter_{pid}.db").rename(tmp_path / f"counter_{pid}.db{FOLDING}")
    (tmp_path / f"counter_{ARCHIVE}.db.tmp").write_bytes(b"half")
    compact_ended(str(tmp_path))
    assert _lasting(tmp_path) == pytest.approx(expected)
    assert not [n for n in os.listdir(tmp_path) if n.endswith((FOLDING, ".tmp"))]
    # After: the archive holds the file's values already, and the renamed file is left over.
    again = _ended_pid()
    _replica(tmp_path, again, requests=11, latency_bucket=1, resident=3.0, at=3.0)
    expected = _lasting(tmp_path)
    compact_ended(str(tmp_path))
    (tmp_path / f"counter_{again}.db{FOLDING}").write_bytes(b"already folded")
    compact_ended(str(tmp_path))
    assert _lasting(tmp_path) == pytest.approx(expected) and total != expected
    assert not [n for n in os.listdir(tmp_path) if n.endswith(FOLDING)]


def test_a_fold_gives_up_on_a_folder_a_scrape_keeps_busy(tmp_path, monkeypatch):
    from tuneloop.serving import metric_compaction
    from tuneloop.serving.metric_compaction import folder_lock

    monkeypatch.setattr(metric_compaction, "LOCK_WAIT_S", 0.2)
    _replica(tmp_path, _ended_pid(), requests=5, latency_bucket=1, resident=1.0, at=1.0)
    with folder_lock(str(tmp_path), exclusive=False):
        assert compact_ended(str(tmp_path)) == 0  # the replica starts; the next one folds
    assert compact_ended(str(tmp_path)) == 4
