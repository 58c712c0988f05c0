import json
import multiprocessing
import pathlib
import random
import threading

import pytest

from tuneloop.core.errors import Conflict, UnknownVersion
from tuneloop.store.manifest import Manifest
from tuneloop.store.registry import Registry
from tuneloop.store.registry_state import HistoryEntry, RegistryState
from tuneloop.store.storage import Storage
from tests.concurrency import in_threads


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
    # Nothing temporary is left beside the versions; each number has its claim.
    assert sorted(p.name for p in (tmp_path / "store/registry/m").iterdir()) == [".claims", "v1", "v2"]
    assert sorted(p.name for p in (tmp_path / "store/registry/m/.claims").iterdir()) == ["v1", "v2"]


def test_a_publisher_that_died_mid_copy_leaves_a_gap_not_a_version(tmp_path, weights):
    reg = Registry(Storage(str(tmp_path / "store")))
    reg.publish("m", weights, _manifest())
    reg._claim_version("m")  # v2 claimed, files half copied, no manifest: the publisher died
    (tmp_path / "store/registry/m/v2").mkdir()
    (tmp_path / "store/registry/m/v2/config.json").write_text("{}")
    assert [m.version for m in reg.versions("m")] == ["v1"]
    with pytest.raises(UnknownVersion):
        reg.manifest("m", "v2")
    assert reg.publish("m", weights, _manifest(parent="v1")).version == "v3"


def test_concurrent_publishers_get_distinct_versions(tmp_path, weights):
    reg = Registry(Storage(str(tmp_path / "store")))
    out = in_threads(lambda: reg.publish("m", weights, _manifest()).version, n=6)
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
    reg.promote("m", "v1", reason="first")
    state = reg.promote("m", "v2", reason="better")
    assert state.production == "v2" and state.generation == 2
    assert reg.state("m") == state
    assert [(h.production, h.reason, h.generation) for h in state.history] == [("v1", "first", 1), ("v2", "better", 2)]
    with pytest.raises(UnknownVersion):
        reg.promote("m", "v9")
    with pytest.raises(UnknownVersion):
        reg.manifest("m", "../../etc")


def test_local_path_for_local_storage(tmp_path, weights):
    reg = Registry(Storage(str(tmp_path / "store")))
    reg.publish("m", weights, _manifest())
    assert reg.local_path("m", "v1") == str(tmp_path / "store/registry/m/v1")


def test_rollback_pops_promotions_in_order():
    def state(*events):
        return RegistryState(production=events[-1][1] if events else None,
                             history=[HistoryEntry(at="t", event=e, production=v) for e, v in events])

    assert state().rollback_target() is None
    assert state(("promote", "v1")).rollback_target() is None
    assert state(("promote", "v1"), ("promote", "v2"), ("promote", "v3")).rollback_target() == "v2"
    assert state(("promote", "v1"), ("promote", "v2"), ("promote", "v3"), ("rollback", "v2")).rollback_target() == "v1"
    assert state(("promote", "v1"), ("promote", "v2"), ("rollback", "v1"), ("promote", "v3")).rollback_target() == "v1"
    # A candidate never was production: it is not a step to roll back to.
    assert state(("promote", "v1"), ("promote", "v2"), ("candidate", "v2")).rollback_target() == "v1"
    # A promotion repeated back to back (state files written before it was a no-op) is one step.
    assert state(("promote", "v1"), ("promote", "v2"), ("promote", "v2")).rollback_target() == "v1"
    # ... and a rollback that then stayed on v2 still leaves v1 to go back to.
    assert state(("promote", "v1"), ("promote", "v2"), ("promote", "v2"), ("rollback", "v2")).rollback_target() == "v1"


@pytest.fixture
def reg3(tmp_path, weights):
    """A registry with v1..v3 published and v1, v2 promoted in turn."""
    reg = Registry(Storage(str(tmp_path / "store")))
    for _ in range(3):
        reg.publish("m", weights, _manifest())
    reg.promote("m", "v1")
    reg.promote("m", "v2")
    return reg


def test_rollback_works_out_its_target_and_counts_a_generation(reg3):
    state = reg3.rollback("m", reason="bad v2")
    assert (state.production, state.generation) == ("v1", 3)
    last = state.history[-1]
    assert (last.event, last.production, last.version, last.reason) == ("rollback", "v1", "v1", "bad v2")
    with pytest.raises(Conflict, match="no earlier production version") as e:
        reg3.rollback("m")
    assert e.value.status == 409 and "production is v1" in e.value.message
    assert reg3.state("m").generation == 3  # a refused change changes nothing


def test_rollback_to_a_version_of_other_labels_is_refused_and_changes_nothing(tmp_path, weights):
    reg = Registry(Storage(str(tmp_path / "store")))
    old = reg.publish("m", weights, _manifest(labels=["a", "b"])).version
    new = reg.publish("m", weights, _manifest(labels=["a", "b", "c"])).version  # a label was added
    reg.promote("m", old)
    reg.promote("m", new, labels=["a", "b", "c"])
    with pytest.raises(Conflict, match=f"cannot roll back from {new} to {old}: {old} was trained for labels"):
        reg.rollback("m", labels=["c", "b", "a"])
    assert (reg.state("m").production, reg.state("m").generation) == (new, 2)
    assert reg.rollback("m", labels=["b", "a"]).production == old  # a config that went back to the old labels


def test_promoting_production_again_changes_nothing_and_rollback_still_goes_back(reg3):
    before = reg3.state("m")
    assert reg3.promote("m", "v2", reason="a retried request") == before  # nothing written
    assert reg3.state("m") == before
    assert reg3.rollback("m").production == "v1"


def test_compare_and_set_refuses_when_production_moved(reg3):
    with pytest.raises(Conflict, match="production of 'm' is now v2 \\(generation 2\\), not v1"):
        reg3.promote("m", "v3", expect_production="v1")
    assert reg3.state("m").production == "v2" and reg3.state("m").generation == 2
    with pytest.raises(Conflict, match="now v2"):
        reg3.rollback("m", expect_production="v3")
    assert reg3.promote("m", "v3", expect_production="v2").production == "v3"
    # None is a real expectation: "no production yet", as for a job training v1.
    with pytest.raises(Conflict, match="not none"):
        reg3.promote("m", "v1", expect_production=None)


def test_first_promotion_expecting_no_production(tmp_path, weights):
    reg = Registry(Storage(str(tmp_path / "store")))
    reg.publish("m", weights, _manifest())
    assert reg.promote("m", "v1", expect_production=None).production == "v1"


def test_candidate_is_recorded_without_moving_production(reg3):
    state = reg3.record_candidate("m", "v3", reason="production moved")
    assert (state.production, state.generation) == ("v2", 3)
    last = state.history[-1]
    assert (last.event, last.production, last.version) == ("candidate", "v2", "v3")
    assert state.rollback_target() == "v1"
    with pytest.raises(UnknownVersion):
        reg3.record_candidate("m", "v9")


def test_state_written_before_generations_still_loads(tmp_path, weights):
    store = tmp_path / "store"
    reg = Registry(Storage(str(store)))
    reg.publish("m", weights, _manifest())
    reg.publish("m", weights, _manifest())
    legacy = {"production": "v1", "history": [{"at": "t", "event": "promote", "production": "v1", "reason": ""}]}
    (store / "registry/m/state.json").write_text(json.dumps(legacy))
    assert reg.state("m").generation == 0
    state = reg.promote("m", "v2")
    assert (state.generation, state.history[-1].generation, state.rollback_target()) == (1, 1, "v1")


# -- many writers at once ----------------------------------------------------------------
VERSIONS = ["v1", "v2", "v3", "v4"]


def _hammer(root: str, seed: int, rounds: int) -> int:
    """Random promotes and rollbacks; returns how many were applied (not refused, not a no-op)."""
    reg, rng, applied = Registry(Storage(root)), random.Random(seed), 0
    for i in range(rounds):
        try:
            if rng.random() < 0.6:
                state = reg.promote("m", rng.choice(VERSIONS), reason=f"w{seed}-{i}")
                applied += state.history[-1].reason == f"w{seed}-{i}"  # not when it was production already
            else:
                reg.rollback("m", reason=f"w{seed}-{i}")
                applied += 1
        except Conflict:
            pass  # nothing to roll back to
    return applied


def _assert_consistent(state: RegistryState, applied: int) -> None:
    """Every applied change is in the history once, generations count 1, 2, ... without a gap,
    and replaying the history gives each entry's production and the final production."""
    assert len(state.history) == applied == state.generation
    assert [h.generation for h in state.history] == list(range(1, applied + 1))
    assert len({h.reason for h in state.history}) == applied
    replay = RegistryState()
    for h in state.history:
        expected = replay.rollback_target() if h.event == "rollback" else h.version
        assert h.production == expected, (h, replay.history[-3:])
        replay.history.append(HistoryEntry.model_validate(h.model_dump()))
        replay.production = h.production
    assert replay.production == state.production


@pytest.fixture
def published(tmp_path, weights):
    reg = Registry(Storage(str(tmp_path / "store")))
    for _ in VERSIONS:
        reg.publish("m", weights, _manifest())
    return reg


def test_concurrent_promotes_and_rollbacks_from_threads_keep_a_consistent_history(published):
    results: list[int] = []
    threads = [threading.Thread(target=lambda s=s: results.append(_hammer(published.storage.uri, s, 25)))
               for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8
    _assert_consistent(published.state("m"), sum(results))


def test_concurrent_promotes_and_rollbacks_from_processes_keep_a_consistent_history(published):
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        results = pool.starmap(_hammer, [(published.storage.uri, s, 25) for s in range(4)])
    _assert_consistent(published.state("m"), sum(results))


def test_promote_refuses_a_gate_rejected_version_without_force_and_other_labels(tmp_path):
    from tuneloop.core.errors import Conflict
    from tuneloop.core.gate import GateDecision
    from tuneloop.store.manifest import Manifest
    from tuneloop.store.registry import Registry
    from tuneloop.store.storage import Storage

    reg = Registry(Storage(str(tmp_path / "store")))
    weights = tmp_path / "w"
    weights.mkdir()
    (weights / "f.bin").write_bytes(b"x")
    rejected = reg.publish("m", str(weights), Manifest(
        version="pending", model="m", parent=None, base_model="b", task="text-classification",
        labels=["a", "b"], status="rejected", gate=GateDecision(accepted=False, reason="worse")))
    with pytest.raises(Conflict, match="rejected by the gate \\(worse\\)"):
        reg.promote("m", rejected.version)
    with pytest.raises(Conflict, match="trained for labels"):
        reg.promote("m", rejected.version, force=True, labels=["a", "b", "c"])
    assert reg.promote("m", rejected.version, force=True, labels=["b", "a"]).production == rejected.version


def test_deploy_rollout_forces_a_rejected_version_only_when_told_and_knows_its_models(tmp_path):
    from typer.testing import CliRunner

    from tuneloop.control.cli import app
    from tuneloop.core.gate import GateDecision
    from tuneloop.store.manifest import Manifest
    from tuneloop.store.registry import Registry
    from tuneloop.store.storage import Storage

    reg = Registry(Storage(str(tmp_path / "store")))
    weights = tmp_path / "w"
    weights.mkdir()
    (weights / "f.bin").write_bytes(b"x")
    reg.publish("m", str(weights), Manifest(version="pending", model="m", parent=None, base_model="b",
                                            task="text-classification", labels=["a", "b"], status="rejected",
                                            gate=GateDecision(accepted=False, reason="worse")))
    config = tmp_path / "tuneloop.yaml"
    config.write_text(f"models: [{{name: m, base_model: b, labels: [a, b]}}]\nstorage: {{root: {tmp_path / 'store'}}}\n")
    runner = CliRunner()
    # --dry-run meets what the change would: an unknown version, the gate's verdict; and changes nothing
    dry = [runner.invoke(app, ["deploy", "rollout", "m", *args, "--dry-run", "--config", str(config)])
           for args in (["v7"], ["v1"], ["v1", "--force"], ["--rollback"])]
    assert dry[0].exit_code == 2 and "v7" in dry[0].output, dry[0].output
    assert dry[1].exit_code == 2 and "--force on the command line" in dry[1].output
    assert dry[2].exit_code == 0 and "production is none; it would be v1; nothing changed" in dry[2].output
    assert dry[3].exit_code == 2 and "no earlier production version to roll back to" in dry[3].output
    assert reg.production("m") is None
    refused = runner.invoke(app, ["deploy", "rollout", "m", "v1", "--config", str(config)])
    assert refused.exit_code == 2 and "--force on the command line" in refused.output
    forced = runner.invoke(app, ["deploy", "rollout", "m", "v1", "--force", "--config", str(config)])
    assert forced.exit_code == 0 and "m: production is v1" in forced.output
    unknown = runner.invoke(app, ["deploy", "rollout", "nosuch", "v1", "--config", str(config)])
    assert unknown.exit_code == 2 and "unknown model 'nosuch'; configured: ['m']" in unknown.output
    assert not (tmp_path / "store" / "registry" / "nosuch").exists()


def test_switches_and_serving_time_complete_a_published_version(tmp_path, weights):
    from datetime import UTC, datetime

    from tuneloop.core.serving_time import ServingTime

    reg = Registry(Storage(str(tmp_path / "store")))
    v1 = reg.publish("m", weights, _manifest()).version
    assert reg.switches("m", v1) == []
    t = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    reg.record_switch("m", v1, "replica-a", at=t)
    reg.record_switch("m", v1, "replica-b")
    reg.record_switch("m", v1, "replica-a", at=t)  # noted again: still one replica
    assert len(reg.switches("m", v1)) == 2 and t in reg.switches("m", v1)
    assert [m.version for m in reg.versions("m")] == [v1]  # the switches folder is not a version
    timing = ServingTime(phases={"rollout": 1.5}, total_s=9.0)
    reg.record_serving_time("m", v1, timing)
    assert reg.manifest("m", v1).serving_time == timing


def _publish_with_onnx(reg: Registry, weights, tmp_path, **optimization) -> None:
    """v1 of model m, optimized: a 64-byte ONNX artifact that passed parity on 5 rows."""
    from tuneloop.core.runtimes import ArtifactRecord, Optimization, ParityCheck

    reg.publish("m", weights, _manifest())
    built = tmp_path / "built" / "onnx"
    built.mkdir(parents=True)
    (built / "model.onnx").write_bytes(b"\1" * 64)
    parity = ParityCheck(passed=True, detail="d", rows=5, agreement=1.0, accuracy=0.8, reference_accuracy=0.8)
    record = ArtifactRecord(runtime="onnx", path="artifacts/onnx/model.onnx", bytes=64, build_s=1.0, parity=parity)
    reg.record_optimization("m", "v1", str(tmp_path / "built"), Optimization(artifacts={"onnx": record}, **optimization))


def test_record_optimization_adds_the_artifacts_then_names_them_in_the_manifest(tmp_path, weights):
    from tuneloop.core.runtimes import Optimization

    reg = Registry(Storage(str(tmp_path / "store")))
    _publish_with_onnx(reg, weights, tmp_path, texts_per_s={"cpu/2t": {"torch": 1.0, "onnx": 2.0}})
    manifest = reg.manifest("m", "v1")
    assert manifest.optimization.artifacts["onnx"].parity.agreement == 1.0
    assert manifest.optimization.texts_per_s == {"cpu/2t": {"torch": 1.0, "onnx": 2.0}}
    assert (tmp_path / "store/registry/m/v1/artifacts/onnx/model.onnx").read_bytes() == b"\1" * 64
    with pytest.raises(UnknownVersion):
        reg.record_optimization("m", "v9", str(tmp_path / "built"), Optimization())


def test_a_replicas_speeds_join_its_builds_record_and_never_a_later_builds(tmp_path, weights):
    from tuneloop.core.runtimes import Optimization

    reg = Registry(Storage(str(tmp_path / "store")))
    reg.publish("m", weights, _manifest())
    (tmp_path / "built").mkdir()
    reg.record_optimization("m", "v1", str(tmp_path / "built"),
                            Optimization(texts_per_s={"cuda": {"torch": 900.0}}, built_at="b1"))
    reg.record_speeds("m", "v1", "cpu/1t", {"torch": 40.04, "onnx": 61.26}, built_at="b1")
    assert reg.manifest("m", "v1").optimization.texts_per_s == {"cuda": {"torch": 900.0},
                                                                "cpu/1t": {"torch": 40.0, "onnx": 61.3}}
    assert reg.manifest("m", "v1").optimization.lone_ms == {}
    reg.record_speeds("m", "v1", "cpu/1t", {"torch": 42.0, "onnx-int8": 90.0}, built_at="b1",  # int8 measured later
                      lone_ms={"torch": 9.123, "onnx-int8": 6.0})
    assert reg.manifest("m", "v1").optimization.lone_ms == {"cpu/1t": {"torch": 9.12, "onnx-int8": 6.0}}
    assert reg.manifest("m", "v1").optimization.texts_per_s["cpu/1t"] == {"torch": 42.0, "onnx": 61.3,
                                                                          "onnx-int8": 90.0}
    # Measured on b1's artifacts while b2 was recorded: b2's speeds stand alone.
    reg.record_optimization("m", "v1", str(tmp_path / "built"), Optimization(texts_per_s={}, built_at="b2"))
    reg.record_speeds("m", "v1", "cpu/2t", {"torch": 70.0}, built_at="b1")
    assert "cpu/2t" not in reg.manifest("m", "v1").optimization.texts_per_s
    with pytest.raises(UnknownVersion):
        reg.record_speeds("m", "v9", "cpu/1t", {"torch": 1.0}, built_at="b1")


def test_a_rebuild_leaves_the_served_files_alone_until_its_manifest_names_its_own(tmp_path, weights, monkeypatch):
    """Rebuilt under the same names, the files a replica loads were written over before the
    manifest moved: a half-copied file, or the new build under the old build's parity."""
    from tuneloop.core.runtimes import ArtifactRecord, Optimization, ParityCheck

    storage = Storage(str(tmp_path / "store"))
    reg = Registry(storage)
    reg.publish("m", weights, _manifest())
    folder = tmp_path / "store/registry/m/v1/artifacts"
    parity = ParityCheck(passed=True, detail="d", rows=5, agreement=1.0, accuracy=0.8, reference_accuracy=0.8)

    def optimize(build: str, content: bytes) -> None:
        built = tmp_path / f"built-{build}"
        (built / build / "onnx").mkdir(parents=True)
        (built / build / "onnx/model.onnx").write_bytes(content)
        record = ArtifactRecord(runtime="onnx", path=f"artifacts/{build}/onnx/model.onnx", bytes=len(content),
                                build_s=1.0, parity=parity)
        reg.record_optimization("m", "v1", str(built), Optimization(artifacts={"onnx": record}, built_at=build))

    optimize("b1", b"first")
    commit = storage.update_json
    seen_at_commit = []

    def spy(rel, change):
        seen_at_commit.append((folder / "b1/onnx/model.onnx").read_bytes())
        return commit(rel, change)

    monkeypatch.setattr(storage, "update_json", spy)
    (folder / "b3/onnx").mkdir(parents=True)  # an operator's build, still uploading beside the job's
    (folder / "b3/onnx/model.onnx").write_bytes(b"third, half")
    optimize("b2", b"second")
    assert seen_at_commit == [b"first"]  # served as it was while the second build went in
    assert sorted(p.name for p in folder.iterdir()) == ["b2", "b3"]  # the first build's folder went, not b3
    assert reg.manifest("m", "v1").optimization.artifacts["onnx"].path == "artifacts/b2/onnx/model.onnx"


def test_a_serving_time_recorded_during_an_operators_rebuild_keeps_the_rebuild(tmp_path, weights, monkeypatch):
    """A job's serving time, written back over the manifest it had read, named build b1
    after the operator's build b2 had replaced it and removed b1's files."""
    from tuneloop.core.runtimes import ArtifactRecord, Optimization, ParityCheck
    from tuneloop.core.serving_time import ServingTime

    storage = Storage(str(tmp_path / "store"))
    reg = Registry(storage)
    reg.publish("m", weights, _manifest())
    parity = ParityCheck(passed=True, detail="d", rows=5, agreement=1.0, accuracy=0.8, reference_accuracy=0.8)

    def build(name: str, speeds: dict) -> Optimization:
        built = tmp_path / f"built-{name}"
        (built / name).mkdir(parents=True)
        (built / name / "model.onnx").write_bytes(name.encode())
        record = ArtifactRecord(runtime="onnx", path=f"artifacts/{name}/model.onnx", bytes=2, build_s=1.0,
                                parity=parity)
        lone = {hardware: {runtime: 10.0 / speed for runtime, speed in by_runtime.items()}
                for hardware, by_runtime in speeds.items()}
        optimization = Optimization(artifacts={"onnx": record}, texts_per_s=speeds, lone_ms=lone, built_at=name)
        reg.record_optimization("m", "v1", str(built), optimization)
        return optimization

    build("b1", {"cpu-bf16/2t": {"torch": 1.0, "onnx": 2.0, "onnx-int8": 3.0}, "cpu/1t": {"torch": 0.5}})
    old_manifest = reg.manifest("m", "v1")  # what the job had read
    commit = storage.update_json

    def rebuild_lands_first(rel, change):  # the operator's rebuild lands as the job records
        monkeypatch.setattr(storage, "update_json", commit)
        build("b2", {"cpu/1t": {"torch": 0.6, "onnx": 0.9}})
        return commit(rel, change)

    monkeypatch.setattr(storage, "update_json", rebuild_lands_first)
    monkeypatch.setattr(reg, "manifest", lambda model, version: old_manifest)
    reg.record_serving_time("m", "v1", ServingTime(phases={"rollout": 1.0}, total_s=2.0))
    monkeypatch.undo()
    manifest = reg.manifest("m", "v1")
    assert manifest.serving_time.total_s == 2.0 and manifest.optimization.built_at == "b2"
    assert sorted(p.name for p in (tmp_path / "store/registry/m/v1/artifacts").iterdir()) == ["b2"]
    # The rebuild, measured on a 1-thread CPU, kept the cluster's speeds of the runtimes it still has.
    assert manifest.optimization.texts_per_s == {"cpu/1t": {"torch": 0.6, "onnx": 0.9},
                                                 "cpu-bf16/2t": {"torch": 1.0, "onnx": 2.0}}
    assert manifest.optimization.lone_ms == {"cpu/1t": {"torch": 10.0 / 0.6, "onnx": 10.0 / 0.9},  # and its times alone
                                             "cpu-bf16/2t": {"torch": 10.0, "onnx": 5.0}}


def test_a_download_that_breaks_or_loses_the_race_leaves_no_partial_copy(tmp_path):
    """Each left a whole model's copy in the node's cache, one more at every retry."""
    from tuneloop.store.version_cache import download

    storage = Storage(str(tmp_path / "store"))
    storage.write_bytes_atomic("registry/m/v1/config.json", b"{}")
    cache = tmp_path / "cache"
    download(storage, "registry/m/v1", str(cache / "v1"))
    download(storage, "registry/m/v1", str(cache / "v1"))  # a replica beside it got there first
    with pytest.raises(OSError):
        download(storage, "registry/m/v9", str(cache / "v9"))  # nothing there: the download breaks
    assert sorted(p.name for p in cache.iterdir()) == ["v1"] and (cache / "v1/config.json").exists()


def test_an_artifact_refresh_that_breaks_leaves_nothing_and_a_killed_ones_leftovers_go_in_an_hour(
        tmp_path, weights, monkeypatch):
    """The new build's download began before the clean-up was armed: each failed refresh (one a
    reload tick) left a partial build inside the cached version, which no pruning reached."""
    import os
    import time

    from tuneloop.store import version_cache

    storage = Storage(str(tmp_path / "store"))
    reg = Registry(storage)
    _publish_with_onnx(reg, weights, tmp_path)
    target = tmp_path / "cache" / "v1"
    target.mkdir(parents=True)

    def breaks_midway(folder, local, wanted=None):
        os.makedirs(os.path.join(local, "onnx"))
        (pathlib.Path(local) / "onnx" / "model.onnx").write_bytes(b"\1" * 8)  # a part of it
        raise ConnectionResetError("the bucket hung up")

    monkeypatch.setattr(storage, "download_dir", breaks_midway)
    with pytest.raises(ConnectionResetError):
        version_cache._refresh_artifacts(storage, "registry/m/v1", str(target), reg.manifest("m", "v1"))
    assert list(target.iterdir()) == []
    killed = target / "artifacts.fresh-0123"  # a process killed between its renames
    killed.mkdir()
    os.utime(killed, (time.time() - 7200,) * 2)
    version_cache.prune_cache(str(tmp_path / "cache"), keep="v1")
    assert list(target.iterdir()) == []


def test_one_unreadable_manifest_is_left_out_of_the_versions_not_fatal_to_them(tmp_path, weights, caplog):
    """One manifest edited by hand (or written by a newer tuneloop with a runtime this one
    does not know) failed every listing: the ingress's start, a student's lineage."""
    from tuneloop.core.errors import CorruptStoredFile

    reg = Registry(Storage(str(tmp_path / "store")))
    for _ in range(3):
        reg.publish("m", weights, _manifest())
    (tmp_path / "store/registry/m/v2/manifest.json").write_text('{"version": "v2", "model": "m", "task": 7}')
    with caplog.at_level("WARNING", logger="tuneloop.store.registry"):
        assert [m.version for m in reg.versions("m")] == ["v1", "v3"]
    assert "m v2 left out of the versions listed" in caplog.text and "manifest.json" in caplog.text
    with pytest.raises(CorruptStoredFile):  # asked for by name, it is still an error an operator sees
        reg.manifest("m", "v2")
    (tmp_path / "store/registry/m/v3/manifest.json").write_text('{"version": "v3", ')  # cut
    from tuneloop.core.serving_time import ServingTime
    with pytest.raises(CorruptStoredFile, match="v3/manifest.json is not a file tuneloop can read"):
        reg.record_serving_time("m", "v3", ServingTime(phases={}, total_s=1.0))


def test_a_nodes_cache_keeps_the_newest_versions_and_those_used_within_the_hour(tmp_path):
    """Every version ever served stayed in every node's cache, a few hundred MB each."""
    import os
    import time

    from tuneloop.store.version_cache import prune_cache

    models = tmp_path / "m"
    now = time.time()
    for name, age_s in [("v1", 7200), ("v2", 60), ("v3", 7200), ("v10", 7200), ("v11", 7200), ("v12", 7200),
                        ("v4.partial-ab", 7200), ("v5.partial-cd", 60), ("v6.stale-ef", 7200), ("notes", 7200)]:
        (models / name).mkdir(parents=True)
        (models / name / "f").write_text("x")
        os.utime(models / name, (now - age_s,) * 2)
    removed = prune_cache(str(models), keep="v3", now=now)
    assert sorted(removed) == ["v1", "v4.partial-ab", "v6.stale-ef"]
    # v2 used a minute ago, v3 asked for, v10-v12 the newest, a download under way, and what is not ours stay.
    assert sorted(p.name for p in models.iterdir()) == ["notes", "v10", "v11", "v12", "v2", "v3", "v5.partial-cd"]
    assert prune_cache(str(tmp_path / "absent"), keep="v1") == []


def _old_history(n: int, days_ago: float = 3) -> list[HistoryEntry]:
    """``n`` entries of a model retrained for days: promotions, rollbacks, candidates, and
    rollouts by jobs and by the driver (which records its numbers), one a minute, ending
    ``days_ago`` days ago."""
    from datetime import UTC, datetime, timedelta

    rng = random.Random(n)
    start = datetime.now(UTC) - timedelta(days=days_ago, minutes=n)
    out = []
    for i in range(n):
        at, v = (start + timedelta(minutes=i)).isoformat(), f"v{i // 3 + 1}"
        event = rng.choice(["promote", "promote", "rollback", "candidate", "rollout", "abort"])
        reason, numbers = rng.choice([("job 0123456789abcdef: passed", None), ("by hand", None), ("", {"p99": 1})])
        production = out[-1].production if out and event in ("candidate", "rollout", "abort") else v
        out.append(HistoryEntry(at=at, event=event, production=production, version=v, reason=reason,
                                numbers=numbers, generation=i + 1))
    return out


def test_old_history_leaves_state_json_in_chunks_and_what_it_said_is_kept(tmp_path, weights):
    """Replicas read state.json every few seconds: months of hourly retraining made it
    megabytes. Past 200 entries its oldest 100 (once a day old) move to history/, and the
    rollback target, the decision counts and production before the kept entries stay."""
    reg = Registry(Storage(str(tmp_path / "store")))
    reg.publish("m", weights, _manifest())
    old = _old_history(199)
    reg.storage.write_json_atomic("registry/m/state.json", RegistryState(
        production=old[-1].production, generation=199, history=old).model_dump(mode="json"))
    whole = RegistryState(production=old[-1].production, history=old)

    state = reg.promote("m", "v1", reason="by hand")  # the 200th entry
    assert len(state.history) == 100 and state.archived.entries == 100 and state.generation == 200
    archived = json.loads((tmp_path / "store/registry/m/history/0000000001.json").read_text())
    assert [HistoryEntry.model_validate(e) for e in archived] == old[:100]
    assert state.history[:99] == old[100:]
    # What readers of the state work out is what the whole history gave.
    whole.history.append(state.history[-1])
    whole.production = "v1"
    assert state.rollback_target() == whole.rollback_target()
    assert state.decisions() == whole.decisions() and sum(state.decisions().values()) == 200
    assert state.archived.production == old[99].production
    assert state == reg.state("m")
    # The next change archives nothing: 101 entries.
    assert whole.rollback_target() is not None  # not vacuous: there was something to roll back to
    assert len(reg.rollback("m").history) == 101


def test_a_state_json_of_years_before_archiving_shrinks_twenty_chunks_a_change(tmp_path, weights):
    from tuneloop.store.registry_state import ARCHIVE_CHUNKS_AT_ONCE, HISTORY_CHUNK

    reg = Registry(Storage(str(tmp_path / "store")))
    reg.publish("m", weights, _manifest())
    old = _old_history(2500)
    for e in old[:150]:
        e.generation = None  # written before generations existed
    reg.storage.write_json_atomic("registry/m/state.json", RegistryState(
        production=old[-1].production, generation=2500, history=old).model_dump(mode="json"))
    state = reg.promote("m", "v1")
    assert state.archived.entries == ARCHIVE_CHUNKS_AT_ONCE * HISTORY_CHUNK
    assert len(state.history) == 2501 - ARCHIVE_CHUNKS_AT_ONCE * HISTORY_CHUNK
    files = sorted(p.name for p in (tmp_path / "store/registry/m/history").iterdir())
    assert files[:2] == ["0000000201.json", "0000000301.json"] and len(files) == ARCHIVE_CHUNKS_AT_ONCE
    assert files[-2:] == ["before-generations-0000000001.json", "before-generations-0000000101.json"]
    assert state.archived.newest == max(int(e.version[1:]) for e in old[:2000]) and state.newest_named() >= 834
    archived = [HistoryEntry.model_validate(e) for f in (tmp_path / "store/registry/m/history").iterdir()
                for e in json.loads(f.read_text())]
    assert sorted(archived, key=lambda e: e.at) == old[:2000]


def test_a_burst_of_changes_stays_in_state_json_for_a_day(tmp_path, weights):
    reg = Registry(Storage(str(tmp_path / "store")))
    reg.publish("m", weights, _manifest())
    recent = _old_history(250, days_ago=0.5)
    reg.storage.write_json_atomic("registry/m/state.json", RegistryState(
        production=recent[-1].production, generation=250, history=recent).model_dump(mode="json"))
    state = reg.promote("m", "v1")
    assert len(state.history) == 251 and state.archived.entries == 0
    assert not (tmp_path / "store/registry/m/history").exists()


def test_a_rollback_past_archived_promotions_lands_where_the_whole_history_says():
    from tuneloop.store.registry_state import HISTORY_CHUNK

    promotions = [HistoryEntry(at="2020-01-01T00:00:00+00:00", event="promote", production=f"v{i}")
                  for i in range(1, 2 * HISTORY_CHUNK + 1)]
    state = RegistryState(production=promotions[-1].production, history=list(promotions))
    state.without_oldest(state.history[:HISTORY_CHUNK])
    assert state.rollback_target() == f"v{2 * HISTORY_CHUNK - 1}"
    # Rolling back every kept promotion reaches into the archived ones.
    for i in range(2 * HISTORY_CHUNK - 1, HISTORY_CHUNK - 2, -1):
        target = state.rollback_target()
        assert target == f"v{i}"
        state.history.append(HistoryEntry(at="2020-01-02T00:00:00+00:00", event="rollback", production=target))
    assert state.rollback_target() == f"v{HISTORY_CHUNK - 2}"
