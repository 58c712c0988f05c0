import threading

import pytest

from cluster.errors import UnknownVersion
from cluster.registry import Manifest, Registry
from cluster.storage import Storage


def _manifest(**kw):
    fields = {"version": "pending", "model": "m", "parent": None, "base_model": "base",
              "task": "text-classification", "labels": ["a", "b"]}
    return Manifest(**{**fields, **kw})


@pytest.fixture
def weights(tmp_path):
    d = tmp_path / "weights"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"\0" * 1024)
    (d / "config.json").write_text("{}")
    return str(d)


def test_publish_numbers_versions_and_writes_manifest(tmp_path, weights):
    reg = Registry(Storage(str(tmp_path / "store")))
    v1 = reg.publish("m", weights, _manifest())
    v2 = reg.publish("m", weights, _manifest(parent="v1"))
    assert (v1.version, v2.version) == ("v1", "v2")
    assert [m.version for m in reg.versions("m")] == ["v1", "v2"]
    assert reg.manifest("m", "v2").parent == "v1"
    files = sorted(p.name for p in (tmp_path / "store/registry/m/v2").iterdir())
    assert files == ["config.json", "manifest.json", "model.safetensors"]
    # Nothing temporary is left beside the versions.
    assert sorted(p.name for p in (tmp_path / "store/registry/m").iterdir()) == ["v1", "v2"]


def test_concurrent_publishers_get_distinct_versions(tmp_path, weights):
    reg = Registry(Storage(str(tmp_path / "store")))
    out, errors = [], []

    def publish():
        try:
            out.append(reg.publish("m", weights, _manifest()).version)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=publish) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(out, key=lambda v: int(v[1:])) == [f"v{i}" for i in range(1, 7)]


def test_half_written_version_is_invisible(tmp_path, weights):
    store = tmp_path / "store"
    reg = Registry(Storage(str(store)))
    reg.publish("m", weights, _manifest())
    # A crashed publisher leaves a staging folder and a version folder without manifest.
    (store / "registry/m/.staging-dead").mkdir()
    (store / "registry/m/v7").mkdir()
    assert [m.version for m in reg.versions("m")] == ["v1"]
    with pytest.raises(UnknownVersion):
        reg.manifest("m", "v7")


def test_production_state_and_history(tmp_path, weights):
    reg = Registry(Storage(str(tmp_path / "store")))
    assert reg.production("m") is None
    reg.publish("m", weights, _manifest())
    reg.publish("m", weights, _manifest())
    reg.set_production("m", "v1", event="promote", reason="first")
    state = reg.set_production("m", "v2", event="promote", reason="better")
    assert state.production == "v2"
    assert [(h.production, h.reason) for h in reg.state("m").history] == [("v1", "first"), ("v2", "better")]
    with pytest.raises(UnknownVersion):
        reg.set_production("m", "v9", event="promote")
    with pytest.raises(UnknownVersion):
        reg.manifest("m", "../../etc")


def test_local_path_for_local_storage(tmp_path, weights):
    reg = Registry(Storage(str(tmp_path / "store")))
    reg.publish("m", weights, _manifest())
    assert reg.local_path("m", "v1") == str(tmp_path / "store/registry/m/v1")


def test_rollback_pops_promotions_in_order():
    from cluster.registry import HistoryEntry, RegistryState

    def state(*events):
        return RegistryState(production=events[-1][1] if events else None,
                             history=[HistoryEntry(at="t", event=e, production=v) for e, v in events])

    assert state().rollback_target() is None
    assert state(("promote", "v1")).rollback_target() is None
    assert state(("promote", "v1"), ("promote", "v2"), ("promote", "v3")).rollback_target() == "v2"
    assert state(("promote", "v1"), ("promote", "v2"), ("promote", "v3"), ("rollback", "v2")).rollback_target() == "v1"
    assert state(("promote", "v1"), ("promote", "v2"), ("rollback", "v1"), ("promote", "v3")).rollback_target() == "v1"
