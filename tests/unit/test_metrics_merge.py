"""/metrics merges replicas' multiprocess files per node: one series per node, one family."""

from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.parser import text_string_to_metric_families

from tuneloop.serving.metrics import render
from tuneloop.store.jobs import JobStore
from tuneloop.store.registry import Registry
from tuneloop.store.storage import Storage

LABELS = ["model", "outcome", "version"]


def _counter_file(folder, pid: int, value: float, version: str = "v1") -> str:
    """A counter's multiprocess file as a replica process ``pid`` leaves it."""
    folder.mkdir(exist_ok=True)
    path = str(folder / f"counter_{pid}.db")
    values = MmapedDict(path)
    key = mmap_key("tuneloop_requests", "tuneloop_requests_total", LABELS, ["m", "ok", version], "Requests.")
    values.write_value(key, value, 0.0)
    values.close()
    return path


def _rendered(tmp_path, files):
    storage = Storage(str(tmp_path / "store"))
    text = render(JobStore(storage), lambda: {}, Registry(storage), ["m"], None, files).decode()
    return text, {(s.labels.get("node"), s.labels["version"]): s.value
                  for f in text_string_to_metric_families(text) if f.name == "tuneloop_requests"
                  for s in f.samples if s.name == "tuneloop_requests_total"}


def test_each_node_is_its_own_series_and_processes_of_a_node_add_up(tmp_path):
    # The same pid on two nodes is two processes; two pids on one node add up.
    node_a = [_counter_file(tmp_path / "a", 7, 3), _counter_file(tmp_path / "a", 8, 4)]
    node_b = [_counter_file(tmp_path / "b", 7, 5), _counter_file(tmp_path / "b", 9, 1, version="v2")]
    text, samples = _rendered(tmp_path, {"aaaa": node_a, "bbbb": node_b})
    assert samples == {("aaaa", "v1"): 7.0, ("bbbb", "v1"): 5.0, ("bbbb", "v2"): 1.0}
    assert text.count("# TYPE tuneloop_requests_total counter") == 1  # one family, as the format requires


def test_a_node_missing_from_a_scrape_leaves_the_others_unchanged(tmp_path):
    # Left out (late or gone): its series is absent, the other node's value does not drop.
    node_a = [_counter_file(tmp_path / "a", 7, 3)]
    node_b = [_counter_file(tmp_path / "b", 7, 5)]
    _, both = _rendered(tmp_path, {"aaaa": node_a, "bbbb": node_b})
    _, one = _rendered(tmp_path, {"aaaa": node_a})
    assert one == {("aaaa", "v1"): both[("aaaa", "v1")]}


def _write(folder, pid: int, kind: str, entries) -> str:
    """A multiprocess file of metric ``kind`` with ``entries``: (metric, sample, labels, value)."""
    folder.mkdir(exist_ok=True)
    path = str(folder / f"{kind}_{pid}.db")
    values = MmapedDict(path)
    for metric, sample, labels, value in entries:
        values.write_value(mmap_key(metric, sample, list(labels), list(labels.values()), "h"), value, 0.0)
    values.close()
    return path


def test_version_health_sums_nodes_and_separates_served_from_shadow(tmp_path):
    from tuneloop.serving.metrics import version_health

    latency = "tuneloop_request_latency_seconds"

    def served(folder, pid, version, fast, slow, errors):
        v = {"model": "m", "version": version}
        return [_write(folder, pid, "histogram", [
                    (latency, f"{latency}_bucket", {**v, "le": "0.1"}, fast),
                    (latency, f"{latency}_bucket", {**v, "le": "1.0"}, slow),
                    (latency, f"{latency}_bucket", {**v, "le": "+Inf"}, 0),
                    (latency, f"{latency}_sum", v, 0.05 * fast + 0.5 * slow)]),
                _write(folder, pid, "counter", [("tuneloop_predict_errors", "tuneloop_predict_errors_total", v,
                                                 errors)])]

    shadow = {"model": "m", "version": "v2"}
    files = {"a": served(tmp_path / "a", 1, "v1", 90, 10, 1),
             "b": served(tmp_path / "b", 1, "v1", 99, 1, 0) + [
                 _write(tmp_path / "b", 2, "counter", [
                     ("tuneloop_shadow_runs", "tuneloop_shadow_runs_total", {**shadow, "outcome": "ok"}, 40),
                     ("tuneloop_shadow_runs", "tuneloop_shadow_runs_total", {**shadow, "outcome": "error"}, 2),
                     ("tuneloop_shadow_runs", "tuneloop_shadow_runs_total", {**shadow, "outcome": "shed"}, 7)])],
             "c": [_write(tmp_path / "c", 1, "counter", [  # a replica where v3 never loaded
                 ("tuneloop_version_load_failures", "tuneloop_version_load_failures_total",
                  {"model": "m", "version": "v3"}, 3)]),
                   _resident_file(tmp_path / "c", 2, 4e6, at=100.0)]}  # another replica of it holds v2
    from tuneloop.core.rollout import health_since

    by_node = version_health(files, "m")
    assert set(by_node) == {"a", "b", "c"} and by_node["a"]["v1"].requests == 101
    health = health_since(by_node, {})
    v1, v2 = health["v1"], health["v2"]
    assert (v1.requests, v1.errors) == (201, 1)  # 200 answered on two nodes, 1 failed
    assert dict(v1.latency_buckets) == {0.1: 189, 1.0: 200, float("inf"): 200}
    assert 0.1 < v1.p99_s() <= 1.0
    assert (v2.requests, v2.errors, v2.latency_buckets) == (42, 2, ())  # shed runs are no requests
    assert (health["v3"].requests, health["v3"].load_failures, health["v3"].resident) == (0, 3, False)
    assert health["v2"].resident and not v1.resident  # (v1's gauge was not written here)


def _resident_file(folder, pid: int, value: float, at: float) -> str:
    """A live replica's resident-weights gauge file (livemax mode: a file a live process)."""
    folder.mkdir(exist_ok=True)
    path = str(folder / f"gauge_livemax_{pid}.db")
    values = MmapedDict(path)
    key = mmap_key("tuneloop_resident_weight_bytes", "tuneloop_resident_weight_bytes", ["model", "version"],
                   ["m", "v2"], "Weights.")
    values.write_value(key, value, at)
    values.close()
    return path


def test_resident_weights_are_held_while_any_live_replica_of_the_node_holds_them(tmp_path):
    """Two replicas on one node held v2 and one let it go (wrote 0) while the other still
    serves it: as the most recent value, the node said v2 was not resident."""
    held, let_go = _resident_file(tmp_path / "a", 7, 4e6, at=100.0), _resident_file(tmp_path / "a", 8, 0, at=200.0)
    storage = Storage(str(tmp_path / "store"))

    def resident(paths) -> list[float]:
        text = render(JobStore(storage), lambda: {}, Registry(storage), ["m"], None, {"aaaa": paths}).decode()
        return [s.value for f in text_string_to_metric_families(text) if f.name == "tuneloop_resident_weight_bytes"
                for s in f.samples]

    assert resident([held, let_go]) == [4e6]
    assert resident([let_go]) == [0.0]  # the holder ended (compaction removes a live gauge's file): let go


def _state(storage, *changes, rollout=None, archived=None) -> None:
    """state.json of model m from (minutes ago, event, production after it, version)."""
    from datetime import UTC, datetime, timedelta

    from tuneloop.store.documents import iso_time
    from tuneloop.store.registry_state import HistoryEntry, RegistryState

    now = datetime.now(UTC)
    history = [HistoryEntry(at=iso_time(now - timedelta(minutes=ago)), event=event, production=production,
                            version=version) for ago, event, production, version in changes]
    state = RegistryState(production=history[-1].production, generation=len(history), history=history,
                          rollout=rollout, **({"archived": archived} if archived else {}))
    storage.write_json_atomic("registry/m/state.json", state.model_dump(mode="json"))


def test_a_version_out_of_service_for_an_hour_leaves_the_exposition(tmp_path):
    """A replica's counters live in its files for good: a model retrained every hour exposed a
    dozen histograms per node for every version it ever had."""
    storage = Storage(str(tmp_path / "store"))
    _state(storage, (300, "promote", "v1", "v1"), (120, "promote", "v2", "v2"), (100, "candidate", "v2", "v4"),
           (10, "promote", "v3", "v3"))
    files = [_counter_file(tmp_path / "a", 7, 1, version=v) for v in ("v1", "v2", "v3")]
    files.append(_counter_file(tmp_path / "a", 8, 1, version="none"))  # requests no version answered
    _, samples = _rendered(tmp_path, {"aaaa": files})
    # v1 left production 120 minutes ago; v2 ten minutes ago, still within the hour.
    assert set(samples) == {("aaaa", "v2"), ("aaaa", "v3"), ("aaaa", "none")}
    # v1 promoted again a minute ago: back in service, shown again; v3 left a minute ago, v2 long since.
    _state(storage, (300, "promote", "v1", "v1"), (120, "promote", "v2", "v2"), (100, "promote", "v3", "v3"),
           (1, "promote", "v1", "v1"))
    _, samples = _rendered(tmp_path, {"aaaa": files})
    assert set(samples) == {("aaaa", "v1"), ("aaaa", "v3"), ("aaaa", "none")}


def test_a_challenger_of_a_long_rollout_stays_in_the_exposition(tmp_path):
    from tuneloop.core.rollout import Rollout

    storage = Storage(str(tmp_path / "store"))
    long_ago = "2026-01-01T00:00:00.000+00:00"
    _state(storage, (300, "promote", "v1", "v1"), (200, "rollout", "v1", "v2"),
           rollout=Rollout(version="v2", stage="canary", percent=5.0, started_at=long_ago, stage_started_at=long_ago))
    files = [_counter_file(tmp_path / "a", 7, 1, version=v) for v in ("v1", "v2")]
    _, samples = _rendered(tmp_path, {"aaaa": files})
    assert set(samples) == {("aaaa", "v1"), ("aaaa", "v2")}


def test_versions_named_only_by_archived_history_leave_and_its_last_production_stays(tmp_path):
    """state.json's older entries move to history/ (store/registry.py): a version they alone
    name is long out of service; production after them served until the first kept change."""
    from tuneloop.store.registry_state import ArchivedHistory

    storage = Storage(str(tmp_path / "store"))
    # v4's rollout was aborted long ago: only the archived entries name it.
    _state(storage, (10, "promote", "v3", "v3"), archived=ArchivedHistory(entries=100, production="v2", newest=4))
    files = [_counter_file(tmp_path / "a", 7, 1, version=v) for v in ("v1", "v2", "v3", "v4", "v5")]
    _, samples = _rendered(tmp_path, {"aaaa": files})
    assert set(samples) == {("aaaa", "v2"), ("aaaa", "v3"), ("aaaa", "v5")}  # v5: newer than the state knows


def test_series_retire_within_the_hour_and_history_leaves_state_json_after_a_day():
    """in_service_since reads only state.json's entries: it is right while a version's
    series retire (RETIRED_SERIES_S) well before the entries naming it may leave."""
    from datetime import timedelta

    from tuneloop.serving.metrics import RETIRED_SERIES_S
    from tuneloop.store.registry_state import ARCHIVE_AFTER

    assert timedelta(seconds=RETIRED_SERIES_S) < ARCHIVE_AFTER
