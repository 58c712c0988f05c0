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
