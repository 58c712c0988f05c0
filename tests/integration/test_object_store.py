"""Storage on an object store, against a real S3 endpoint on loopback (moto's server):
claims and compare-and-swap from several processes, the registry, keys, quarantine, the
job lease, feedback Parquet. pyarrow's S3 filesystem for everything but the conditional
puts. A training job whose seed, checkpoints and versions live in the bucket runs in
test_two_nodes.py."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pyarrow as pa
import pytest

from tuneloop.core.config import AuthConfig
from tuneloop.core.errors import Conflict, NotQuarantined
from tuneloop.store.jobs import JobRunning, JobStore, take_lease
from tuneloop.store.keys import KeyRing, add_stored_key, ensure_admin_key, revoke_stored_key, save_admin_key
from tuneloop.store.quarantine import QuarantineBook
from tuneloop.store.feedback_store import FeedbackStore
from tuneloop.store.manifest import Manifest
from tuneloop.store.registry import Registry
from tuneloop.store.storage import Storage
from tests.concurrency import in_processes, in_threads
from tests.integration.conftest import LABELS


def _increment(root: str, times: int, start) -> None:
    storage = Storage(root)
    start.wait()
    for _ in range(times):
        storage.update_json("counter.json", lambda doc: {"n": (doc or {"n": 0})["n"] + 1})


def _promote_back_and_forth(root: str, times: int, out: str, start) -> None:
    """Promotes, counting in ``out``/<pid> those that changed production (promoting the
    production of the moment changes nothing)."""
    registry = Registry(Storage(root))
    start.wait()
    applied = 0
    for i in range(times):
        reason = f"pid {os.getpid()} #{i}"
        applied += registry.promote("m", "v1" if i % 2 else "v2", reason=reason).history[-1].reason == reason
    Path(out, str(os.getpid())).write_text(str(applied))


def _manifest(parent: str | None = None) -> Manifest:
    return Manifest(version="pending", model="m", parent=parent, base_model="tiny", task="text-classification",
                    labels=LABELS)


@pytest.fixture
def weights(tmp_path) -> str:
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    (folder / "config.json").write_text("{}")
    return str(folder)


def test_compare_and_swap_and_claims_hold_across_processes(s3_root):
    storage = Storage(s3_root)
    assert not storage.is_local
    assert storage.conditional_write_problem() is None  # the start's probe: this endpoint honours both
    import pyarrow.fs as pafs

    everything = storage.fs.get_file_info(pafs.FileSelector(storage.root, allow_not_found=True, recursive=True))
    assert not [i.path for i in everything if ".probe" in i.path]  # and leaves nothing behind
    in_processes(_increment, (s3_root, 8), n=3)
    assert storage.read_json("counter.json") == {"n": 24}  # no update lost
    assert storage.create_new("claims/x", b"first") and not storage.create_new("claims/x", b"second")
    assert storage.read_bytes("claims/x") == b"first"


def test_registry_publishes_without_renames_and_keeps_every_transition(s3_root, weights, tmp_path):
    registry = Registry(Storage(s3_root))
    out = in_threads(lambda: registry.publish("m", weights, _manifest(), tables={"trained_on": pa.table({"a": [1]})}).version,
                     n=4)
    assert sorted(out) == ["v1", "v2", "v3", "v4"]
    assert [m.version for m in registry.versions("m")] == ["v1", "v2", "v3", "v4"]
    local = Path(registry.local_path("m", "v3", cache_dir=str(tmp_path / "cache")))
    assert (local / "model.safetensors").read_bytes() == Path(weights, "model.safetensors").read_bytes()
    assert not (local / "data").exists()  # the tables it trained on are read from the bucket, never here
    for version in ("v1", "v2"):  # used two hours ago: v1 goes when v4 is fetched, v2 stays among the newest 3
        os.utime(registry.local_path("m", version, cache_dir=str(tmp_path / "cache")), (time.time() - 7200,) * 2)
    registry.local_path("m", "v4", cache_dir=str(tmp_path / "cache"))
    assert sorted(p.name for p in local.parent.iterdir()) == ["v2", "v3", "v4"]
    assert registry.table("m", "v3", "trained_on").to_pylist() == [{"a": 1}]
    assert registry.table_path("m", "v3", "trained_on").startswith("s3://")  # pasted into another tool, it works

    registry.promote("m", "v1")
    counts = tmp_path / "applied"
    counts.mkdir()
    in_processes(_promote_back_and_forth, (s3_root, 5, str(counts)), n=3)
    applied = 1 + sum(int(f.read_text()) for f in counts.iterdir())
    state = registry.state("m")
    assert applied > 3 and state.generation == applied and len(state.history) == applied  # none lost
    assert [e.generation for e in state.history] == list(range(1, applied + 1))
    with pytest.raises(Conflict):
        registry.promote("m", "v4", expect_production="v3")

    golden = pa.table({"text": ["a"], "label": ["positive"]})
    assert registry.freeze_golden("m", golden) == golden
    assert registry.freeze_golden("m", pa.table({"text": ["b"], "label": ["negative"]})) == golden


def test_a_nodes_cache_keeps_two_roots_apart_and_refetches_a_root_made_anew(s3_endpoint, weights, tmp_path):
    """The cache was one folder per model and version: a second root's v1 (staging and
    production buckets on one host, or a bucket emptied and filled again) was served from
    the first root's files, with no error while the labels matched."""
    import uuid

    from tests.integration.conftest import S3_BUCKET

    cache = str(tmp_path / "cache")

    def publish(root: str, content: bytes) -> Path:
        Path(weights, "model.safetensors").write_bytes(content)
        registry = Registry(Storage(root))
        assert registry.publish("m", weights, _manifest()).version == "v1"
        return Path(registry.local_path("m", "v1", cache_dir=cache), "model.safetensors")

    staging, production = (f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:12]}?endpoint_override={s3_endpoint}&scheme=http"
                           for _ in range(2))
    assert publish(staging, b"staging weights").read_bytes() == b"staging weights"
    assert publish(production, b"production weights").read_bytes() == b"production weights"
    Storage(staging).delete_dir("registry")  # the staging registry is made anew
    assert publish(staging, b"new staging weights").read_bytes() == b"new staging weights"


def test_a_version_optimized_again_is_fetched_again_by_a_node_that_cached_it(s3_root, weights, tmp_path):
    """`tuneloop optimize` rebuilds an artifact under the same file name: a node that had
    cached the version kept serving the old file under the new build's parity record."""
    from tuneloop.core.runtimes import ArtifactRecord, Optimization, ParityCheck

    registry = Registry(Storage(s3_root))
    version = registry.publish("m", weights, _manifest()).version
    cache = str(tmp_path / "cache")

    def optimize(content: bytes, built_at: str) -> None:
        built = tmp_path / f"built-{built_at}"
        built.mkdir()
        (built / "model.onnx").write_bytes(content)
        parity = ParityCheck(passed=True, detail="", rows=1, agreement=1.0, accuracy=1.0, reference_accuracy=1.0)
        record = ArtifactRecord(runtime="onnx", path="artifacts/model.onnx", bytes=len(content), build_s=0.1,
                                parity=parity)
        registry.record_optimization("m", version, str(built), Optimization(artifacts={"onnx": record},
                                                                            built_at=built_at))

    optimize(b"first build", "2026-12-01T00:00:00+00:00")
    local = Path(registry.local_path("m", version, cache_dir=cache))
    assert (local / "artifacts" / "model.onnx").read_bytes() == b"first build"
    optimize(b"second build", "2026-12-02T00:00:00+00:00")
    again = Path(registry.local_path("m", version, cache_dir=cache))
    assert again == local and (local / "artifacts" / "model.onnx").read_bytes() == b"second build"
    assert sorted(p.name for p in local.iterdir() if p.name.startswith("artifacts")) == ["artifacts"]  # no leftovers
    assert (local / "model.safetensors").read_bytes() == Path(weights, "model.safetensors").read_bytes()


def test_a_worker_fetches_the_version_it_starts_from_on_its_own_node(s3_root, weights, tmp_path, monkeypatch):
    """The driver handed workers its own node's download folder: on a worker node without it,
    from_pretrained read the path as a hub id. What crosses to a worker is what to fetch."""
    import pickle

    from tuneloop.training.model_files import ModelFiles

    registry = Registry(Storage(s3_root))
    version = registry.publish("m", weights, _manifest()).version
    files = pickle.loads(pickle.dumps(ModelFiles.of_version(registry, "m", version).model_dump()))
    import tempfile

    (tmp_path / "worker-node").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "worker-node"))  # another node: another cache
    local = Path(ModelFiles(**files).local_path())
    assert str(local).startswith(str(tmp_path / "worker-node"))
    assert (local / "model.safetensors").read_bytes() == Path(weights, "model.safetensors").read_bytes()
    assert ModelFiles(base_model=weights).local_path() == weights  # a folder every node has


def test_a_document_read_while_it_is_replaced_is_one_version_of_it(s3_root):
    """pyarrow reads an object's size, then ranges of it: one replaced in between came back
    cut (a replica's poll of state.json, an API read of it, the key file's refresh)."""
    import threading
    import time

    storage = Storage(s3_root)
    storage.update_json("state.json", lambda _: {"n": 0, "pad": ""})
    done = threading.Event()

    def writer():
        i = 0
        while not done.is_set():
            i += 1
            storage.update_json("state.json", lambda doc: {"n": doc["n"] + 1, "pad": "x" * (100 * (i % 9))})

    thread = threading.Thread(target=writer)
    thread.start()
    seen, deadline = [], time.monotonic() + 3
    try:
        while time.monotonic() < deadline:
            seen.append(storage.read_json("state.json")["n"])  # raised on a cut document
    finally:
        done.set()
        thread.join()
    assert len(set(seen)) > 5 and seen == sorted(seen)


def test_keys_quarantine_and_the_job_lease(s3_root):
    storage = Storage(s3_root)
    auth = AuthConfig(create_admin_key=True)
    first = ensure_admin_key(auth, storage)
    assert first is not None and ensure_admin_key(auth, storage) is None  # one admin key, once
    where = save_admin_key(storage, first)  # on this machine, 0600: the bucket's readers are not all admins
    assert os.path.isabs(where) and where.endswith("/admin-key.txt") and os.stat(where).st_mode & 0o777 == 0o600
    assert not storage.exists("auth/admin-key.txt")
    feedback_key = add_stored_key(storage, "feedback")
    ring = KeyRing(auth, storage)
    assert sorted(k.role for k in ring.keys()) == ["admin", "feedback"]
    revoke_stored_key(auth, storage, feedback_key.split("_")[1])
    assert [k.role for k in KeyRing(auth, storage).keys()] == ["admin"]

    book = QuarantineBook(storage)
    assert book.quarantine("m", {"k1": "far off"}, {}) == {"k1"}
    assert book.release("m", "k1").state == "released"
    with pytest.raises(NotQuarantined):
        book.release("m", "k1")

    jobs = JobStore(storage)
    first_job, second_job = jobs.create("m", "manual"), jobs.create("m", "manual")
    lease = take_lease(storage, jobs, first_job)
    with pytest.raises(JobRunning, match=first_job.job_id):
        take_lease(storage, jobs, second_job)
    first_job.state = "succeeded"
    jobs.save(first_job)
    take_lease(storage, jobs, second_job).release()  # a finished holder holds nothing
    lease.release()  # no longer its lease: changes nothing


def test_feedback_parquet_lands_in_the_bucket(s3_root, tmp_path):
    from tuneloop.core.tasks import make_task

    storage = Storage(s3_root)
    store = FeedbackStore(storage, str(tmp_path / "journal"), {"m": make_task("text-classification", LABELS)})
    store.open_writer()
    ids = [store.append(model="m", text=f"text {i}", label=LABELS[i % 2]) for i in range(10)]
    store.close()  # compacts
    assert store.files("m") and all("/date=" in f for f in store.files("m"))
    assert sorted(r["feedback_id"] for r in store.read("m").to_pylist()) == sorted(ids)
