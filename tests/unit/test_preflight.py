"""`tuneloop run` and `tuneloop train` refuse, before Ray starts, data that would fail a job
only later: a missing seed or golden file, or a model with nothing to train v1 on."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from tuneloop.control.cli import app
from tuneloop.control.preflight import data_problems
from tuneloop.control.server import run_forever
from tuneloop.core.config import parse_config
from tuneloop.store.feedback_store import FeedbackStore
from tuneloop.store.storage import Storage
from tuneloop.core.tasks import model_tasks


def _cfg(tmp_path, **model):
    return parse_config({"models": [{"name": "m", "base_model": "some/model", "labels": ["a", "b"], **model}],
                         "storage": {"root": str(tmp_path / "store")}})


def test_a_missing_seed_or_golden_file_stops_run_before_ray_starts(tmp_path):
    cfg = _cfg(tmp_path, seed_dataset=str(tmp_path / "nope.tsv"), golden_dataset=str(tmp_path / "gold.tsv"))
    with pytest.raises(SystemExit) as info:  # conftest fails the test should Ray start
        run_forever(cfg)
    assert f"models.m.seed_dataset '{tmp_path / 'nope.tsv'}' does not exist" in str(info.value)
    assert "models.m.golden_dataset" in str(info.value)


def test_a_model_without_a_seed_needs_feedback_or_a_version(tmp_path):
    cfg = _cfg(tmp_path)
    assert "has no version yet and nothing to train v1 on" in data_problems(cfg)[0]
    feedback = FeedbackStore(Storage(cfg.storage.root), cfg.storage.journal_path(), model_tasks(cfg.models))
    feedback.open_writer()
    feedback.append(model="m", text="fine", label="a")  # journalled, not yet compacted
    assert data_problems(cfg) == []
    feedback.close()  # compacted into Parquet
    assert data_problems(cfg) == []


def test_train_refuses_a_missing_seed_naming_it(tmp_path):
    config = tmp_path / "tuneloop.yaml"
    config.write_text(yaml.safe_dump({"models": [{"name": "m", "base_model": "some/model", "labels": ["a", "b"],
                                                  "seed_dataset": "seed.tsv"}],
                                      "storage": {"root": str(tmp_path / "store")}}))
    result = CliRunner().invoke(app, ["train", "m", "--config", str(config)])
    assert result.exit_code == 2 and f"models.m.seed_dataset '{tmp_path / 'seed.tsv'}' does not exist" in result.output


def _published(tmp_path, task="text-classification", labels=("a", "b")):
    from tuneloop.store.manifest import Manifest
    from tuneloop.store.registry import Registry

    registry = Registry(Storage(str(tmp_path / "store")))
    weights = tmp_path / "w"
    weights.mkdir(exist_ok=True)
    registry.publish("m", str(weights), Manifest(version="pending", model="m", parent=None, base_model="some/model",
                                                 task=task, labels=list(labels)))
    registry.promote("m", "v1")
    return registry


def test_a_changed_task_or_a_dropped_label_is_refused_at_start_and_an_added_label_is_not(tmp_path):
    _published(tmp_path)
    assert data_problems(_cfg(tmp_path)) == []
    assert "trained for text-classification, the config says multi-label-classification" in data_problems(
        _cfg(tmp_path, task="multi-label-classification"))[0]
    dropped = data_problems(_cfg(tmp_path, labels=["a", "c"]))
    assert len(dropped) == 1 and "drops label(s) ['b'] of its production v1" in dropped[0]
    assert data_problems(_cfg(tmp_path, labels=["b", "a", "c"])) == []  # added: bootstrap trains a version


def test_entity_types_rewritten_as_their_bio_tags_are_the_same_labels(tmp_path):
    ner = {"task": "token-classification"}
    registry = _published(tmp_path, task="token-classification", labels=["PER", "LOC"])
    bio = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    assert data_problems(_cfg(tmp_path, **ner, labels=bio)) == []
    assert "drops label(s) ['LOC']" in data_problems(_cfg(tmp_path, **ner, labels=["PER"]))[0]
    assert registry.promote("m", "v1", labels=bio).production == "v1"


def test_a_base_model_path_with_nothing_there_and_a_ray_too_small_for_a_retrain_are_named(tmp_path):
    problems = data_problems(_cfg(tmp_path, base_model=str(tmp_path / "models" / "bert")))
    assert "base_model" in problems[0] and "is a path, and nothing is there" in problems[0]
    assert not any("base_model" in p for p in data_problems(_cfg(tmp_path, base_model="org/name")))  # a Hugging Face id
    (tmp_path / "notes").mkdir()  # a folder, but no saved model in it
    assert "folder without a config.json" in data_problems(_cfg(tmp_path, base_model=str(tmp_path / "notes")))[0]
    small = parse_config({"models": [{"name": "m", "base_model": "some/model", "labels": ["a", "b"]}],
                          "storage": {"root": str(tmp_path / "store")}, "ray": {"num_cpus": 2}})
    assert "raise ray.num_cpus to 4" in data_problems(small)[-1]
    assert not any("num_cpus" in p for p in data_problems(small, ["m"]))  # `tuneloop train` runs no replicas


def test_gpus_a_local_ray_would_not_find_are_named_before_ray_starts(tmp_path, monkeypatch):
    """check-config passed use_gpu: true on a machine without a GPU, and `run` refused only once Ray was up."""
    import tuneloop.control.preflight as preflight

    def cfg(**sections):
        return parse_config({"models": [{"name": "m", "base_model": "some/model", "labels": ["a", "b"]}],
                             "storage": {"root": str(tmp_path / "store")}, **sections})

    assert preflight.local_gpus() is not None  # Ray's detection answers here (0 on this CPU machine)
    monkeypatch.setenv("RAY_OVERRIDE_RESOURCES", '{"GPU": 2}')  # Ray's own override of what it detects
    assert preflight.local_gpus() == 2.0
    monkeypatch.delenv("RAY_OVERRIDE_RESOURCES")
    monkeypatch.setattr(preflight, "local_gpus", lambda: 0.0)
    trains = cfg(training={"use_gpu": True, "num_workers": 1})
    assert any("training.use_gpu is true, but Ray sees no GPU on this machine" in p for p in data_problems(trains))
    assert any("Ray sees no GPU" in p for p in data_problems(trains, ["m"]))  # `tuneloop train` too
    serves = cfg(serving={"num_gpus_per_replica": 1})
    assert any("serving needs 1 GPU" in p and "this machine has 0 GPU(s)" in p for p in data_problems(serves))
    assert not any("GPU" in p for p in data_problems(serves, ["m"]))  # a job alone runs no replica
    assert not any("GPU" in p for p in data_problems(cfg()))
    joined = cfg(training={"use_gpu": True, "num_workers": 1}, ray={"address": "ray://head:10001"})
    assert not any("GPU" in p for p in data_problems(joined, ["m"]))  # a cluster's GPUs are not this machine's
    for_a_cluster = cfg(training={"use_gpu": True, "num_workers": 1}, deploy={"name": "prod"})
    assert not any("GPU" in p for p in data_problems(for_a_cluster))  # checked on an operator's laptop
    assert not any("GPU" in p for p in data_problems(trains, offline=True))
    two = parse_config({"models": [{"name": "cpu", "base_model": "some/model", "labels": ["a", "b"]},
                                   {"name": "gpu", "base_model": "some/model", "labels": ["a", "b"],
                                    "training": {"use_gpu": True, "num_workers": 1}}],
                        "storage": {"root": str(tmp_path / "store")}})
    assert not any("GPU" in p for p in data_problems(two, ["cpu"]))  # another model's GPU job is not this one's
    assert any("Ray sees no GPU" in p for p in data_problems(two, ["gpu"]))
    assert not any("GPU" in p for p in data_problems(trains, ["m"], joins="ray://gpu-head:10001"))  # train --address
    monkeypatch.setattr(preflight, "local_gpus", lambda: 1.0)
    both = cfg(serving={"num_gpus_per_replica": 0.5},
               training={"use_gpu": True, "num_workers": 1, "gpus_per_worker": 0.5})  # one GPU, shared
    assert not any("GPU" in p for p in data_problems(both))
    assert any("a training job needs 1 GPU(s) beside the replicas' 1" in p
               for p in data_problems(cfg(serving={"num_gpus_per_replica": 1}, training={"use_gpu": True,
                                                                                          "num_workers": 1})))


def test_a_version_with_other_labels_than_production_is_promoted_not_rolled_out(tmp_path):
    from tuneloop.core.rollout import RolloutConfig
    from tuneloop.store.jobs import JobStore, hand_over
    from tuneloop.store.manifest import Manifest

    registry = _published(tmp_path)
    for labels in (["a", "b"], ["a", "b", "c"]):
        registry.publish("m", str(tmp_path / "w"), Manifest(version="pending", model="m", parent="v1",
                                                            base_model="some/model", task="text-classification",
                                                            labels=labels))
    jobs = JobStore(registry.storage)
    same, added = jobs.create("m", "bootstrap"), jobs.create("m", "bootstrap")
    hand_over(registry, same, "v2", "v1", "gate passed", RolloutConfig(mode="shadow"))
    assert not same.promoted and registry.state("m").rollout.version == "v2"
    registry.rollback("m")
    hand_over(registry, added, "v3", "v1", "gate passed", RolloutConfig(mode="shadow"))
    assert added.promoted and registry.production("m") == "v3"  # v1 cannot serve the new labels


def test_a_changed_base_model_is_named_at_start(tmp_path, caplog):
    import logging

    from tuneloop.control.server import bootstrap_versions

    _published(tmp_path)
    with caplog.at_level(logging.WARNING, logger="tuneloop"):
        bootstrap_versions(_cfg(tmp_path, base_model="other/model"))  # nothing to train: production serves
    assert "base_model is now other/model, but its versions descend from some/model" in caplog.text


def test_a_seed_a_job_could_not_read_is_refused_before_ray_naming_what_it_has(tmp_path):
    seed = tmp_path / "seed.csv"
    seed.write_text("sentence,label\nfine,a\nbad,b\n")
    problems = data_problems(_cfg(tmp_path, seed_dataset=str(seed)))
    assert len(problems) == 1 and "has no column(s) ['text']" in problems[0] and "'sentence'" in problems[0]
    seed.write_text("text;label\nfine;a\n")
    assert "has ['text;label']; one column read: a .csv is read comma-separated" in \
        data_problems(_cfg(tmp_path, seed_dataset=str(seed)))[0]
    tsv = tmp_path / "seed.tsv"
    tsv.write_text("text,label\nfine,a\n")
    assert "and a .tsv tab-separated" in data_problems(_cfg(tmp_path, seed_dataset=str(tsv)))[0]
    tsv.write_text("text\tlabel\nfine\tc\n")
    assert "'c'" in data_problems(_cfg(tmp_path, seed_dataset=str(tsv)))[0]
    tsv.write_text("text\tlabel\nfine\ta\nbad\t\n")  # an empty cell: "training data has labels ['']" before
    assert "row 2: an empty 'label' (1 such row(s))" in data_problems(_cfg(tmp_path, seed_dataset=str(tsv)))[0]
    tsv.write_text("text\tlabel\nfine\ta\nbad\tb\n")
    assert data_problems(_cfg(tmp_path, seed_dataset=str(tsv))) == []


def test_a_seed_of_no_row_or_one_class_is_refused_before_ray_while_it_is_all_v1_would_train_on(tmp_path):
    """check-config said "config OK"; run and train failed only once Ray had started."""
    tsv = tmp_path / "seed.tsv"
    for rows, says in [("", "has no row with visible text"), ("\u200b\ta\n \tb\n", "has no row with visible text"),
                       ("fine\ta\ngood\ta\n", "has rows of ['a'] alone")]:
        tsv.write_text("text\tlabel\n" + rows)
        problems = data_problems(_cfg(tmp_path, seed_dataset=str(tsv)))
        assert len(problems) == 1 and says in problems[0], problems
    cfg = _cfg(tmp_path, seed_dataset=str(tsv))  # one class, but feedback brings the other
    feedback = FeedbackStore(Storage(cfg.storage.root), cfg.storage.journal_path(), model_tasks(cfg.models))
    feedback.open_writer()
    feedback.append(model="m", text="bad", label="b")
    assert data_problems(cfg) == []
    feedback.close()


def test_a_label_no_seed_row_holds_is_said_before_ray_not_refused(tmp_path, caplog):
    """check-config said "config OK" for labels [ham, spam, phishing] and a seed without
    phishing; the job said so only once Ray had started, and v1 never answered phishing."""
    tsv = tmp_path / "seed.tsv"
    tsv.write_text("text\tlabel\nfine\tham\nbuy now\tspam\n")
    cfg = parse_config({"models": [{"name": "m", "base_model": "some/model", "labels": ["ham", "spam", "phishing"],
                                    "seed_dataset": str(tsv)}], "storage": {"root": str(tmp_path / "store")}})
    with caplog.at_level("WARNING", logger="tuneloop"):
        assert data_problems(cfg) == []
    assert any("has no row of ['phishing']: v1 cannot learn" in r.getMessage() for r in caplog.records)


def test_a_seed_is_not_read_again_once_the_model_has_a_version(tmp_path):
    _published(tmp_path)
    seed = tmp_path / "seed.csv"
    seed.write_text("sentence,label\nfine,a\n")
    assert data_problems(_cfg(tmp_path, seed_dataset=str(seed))) == []
    assert "golden_dataset" in data_problems(_cfg(tmp_path, seed_dataset=str(seed), golden_dataset=str(seed)))[0]


def test_a_seed_whose_labels_are_lists_for_a_classifier_is_a_problem_not_a_traceback(tmp_path):
    seed = tmp_path / "seed.jsonl"
    seed.write_text('{"text": "fine", "label": ["a"]}\n{"text": "bad", "label": ["b"]}\n')
    problems = data_problems(_cfg(tmp_path, seed_dataset=str(seed)))
    assert len(problems) == 1 and "are not of the types tuneloop reads" in problems[0] and "label: list" in problems[0]


def test_a_student_with_more_layers_than_its_teacher_is_named_before_ray(tmp_path):
    """Known from the teacher's config.json (here the bundled default model's, 6 layers):
    before, the job failed in its workers, after the teacher's v1 had trained."""
    def cfg(layers):
        return parse_config({"models": [{"name": "teacher", "labels": ["a", "b"], "seed_dataset": None},
                                        {"name": "student", "labels": ["a", "b"],
                                         "distill": {"teacher": "teacher", "student_layers": layers}}],
                             "storage": {"root": str(tmp_path / "store")}})
    problems = data_problems(cfg(8))
    assert any("model 'student': distill.student_layers 8 exceeds the teacher's 6 encoder layers" in p
               for p in problems), problems
    assert not any("student_layers" in p for p in data_problems(cfg(6)))


def test_freezing_more_layers_than_the_base_model_has_is_named_before_ray(tmp_path):
    """check-config said OK; the job failed once Ray, and maybe other models' jobs, had run."""
    def cfg(freeze, **training):
        return parse_config({"models": [{"name": "m", "labels": ["a", "b"], "seed_dataset": None,
                                         "training": {"freeze_layers": freeze, **training}}],
                             "storage": {"root": str(tmp_path / "store")}})
    assert any("model 'm': freeze_layers 7 exceeds the model's 6 encoder layers" in p
               for p in data_problems(cfg(7))), data_problems(cfg(7))
    assert not any("freeze_layers" in p for p in data_problems(cfg(6)))
    assert not any("freeze_layers" in p for p in data_problems(cfg(7, feature_extraction=True)))


def test_a_second_server_on_this_machine_is_refused_before_ray_starts_naming_haproxys_port(tmp_path, monkeypatch):
    """Another `tuneloop run` holds HAProxy's side listeners: a second one on another port
    started Ray, then died in a 35-line traceback of HAProxy's bind."""
    import socket

    from tuneloop.control.preflight import check_ports_free

    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen()
        port = held.getsockname()[1]
        monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", str(port))
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            serving = free.getsockname()[1]
        with pytest.raises(SystemExit) as info:
            check_ports_free("127.0.0.1", serving, local_ray=True)
        assert f"Ray Serve's HAProxy needs port {port} (RAY_SERVE_HAPROXY_STATS_PORT)" in str(info.value)
        assert "RAY_SERVE_HAPROXY_METRICS_PORT" in str(info.value)
        check_ports_free("127.0.0.1", serving, local_ray=False)  # a cluster's HAProxy runs on its nodes
        with pytest.raises(SystemExit, match=f"cannot serve on 0.0.0.0:{port}"):
            check_ports_free("0.0.0.0", port, local_ray=False)


def test_a_storage_root_that_is_a_file_or_a_host_of_no_interface_here_is_named_by_check_config(tmp_path):
    """check-config said "config OK" for a serving.host that run then refused, blaming
    "another tuneloop run?"; a storage.root naming a file gave a NotADirectoryError."""
    seed = tmp_path / "seed.tsv"
    seed.write_text("text\tlabel\nfine\ta\nbad\tb\n")
    doc = {"models": [{"name": "m", "base_model": "some/model", "labels": ["a", "b"], "seed_dataset": str(seed)}],
           "storage": {"root": str(seed)}}
    config = tmp_path / "tuneloop.yaml"
    config.write_text(yaml.safe_dump(doc))
    shown = CliRunner().invoke(app, ["check-config", "-c", str(config)])
    assert shown.exit_code == 2 and f"storage.root '{seed}' is a file, not a folder" in shown.output
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        run_forever(parse_config(doc))
    doc["storage"]["root"] = str(tmp_path / "store")
    for host, why in [("not a host!", "serving.host 'not a host!': "), ("203.0.113.77", "serving.host '203.0.113.77': ")]:
        config.write_text(yaml.safe_dump({**doc, "serving": {"host": host}}))
        shown = CliRunner().invoke(app, ["check-config", "-c", str(config)])
        assert shown.exit_code == 2 and why in shown.output and "another tuneloop run" not in shown.output
    config.write_text(yaml.safe_dump({**doc, "serving": {"host": "0.0.0.0"}}))
    assert CliRunner().invoke(app, ["check-config", "-c", str(config)]).exit_code == 0


@pytest.mark.parametrize("linked", [False, True])
def test_an_haproxy_a_killed_server_left_is_stopped_before_a_start_and_a_live_ones_is_not(tmp_path, monkeypatch,
                                                                                          linked):
    """`kill -9` of `tuneloop run` under load left Serve's reloaded HAProxy running, orphaned:
    it held the port, answered every request with a 500, and the next run could not start.
    ``linked``: the folder named through a symlink (macOS's /var, a linked TMPDIR), as
    Serve's command lines then name it: no orphan was found, and live servers' folders went."""
    import os
    import shutil
    import subprocess
    import time

    import psutil

    from tuneloop.control.server import STALE_HAPROXY_DIR_S, stop_haproxy_of_killed_servers

    root = tmp_path / "haproxy"
    for node in ("killed", "live", "old", "starting"):
        (root / node).mkdir(parents=True)
    if linked:
        (tmp_path / "link").symlink_to(root)
        root = tmp_path / "link"
    monkeypatch.setenv("TUNELOOP_HAPROXY_DIR", str(root))
    for node in ("killed", "live"):  # a stand-in named haproxy, its command line in the node's folder
        shutil.copy("/bin/sleep", root / node / "haproxy")
    # The killed server's: its parent gone (the shell exits at once), re-parented.
    subprocess.run(["sh", "-c", f"'{root / 'killed' / 'haproxy'}' 300 >/dev/null 2>&1 &"], check=True)
    live = subprocess.Popen([str(root / "live" / "haproxy"), "300"])  # a live server's: its parent lives
    old = time.time() - STALE_HAPROXY_DIR_S - 60
    for node in ("old", "live"):  # a live server's folder is as old as the server: kept while its HAProxy runs
        os.utime(root / node, (old, old))
    try:
        orphan = next(p for p in psutil.process_iter(["cmdline"]) if str(root / "killed") in " ".join(p.info["cmdline"] or ()))
        stop_haproxy_of_killed_servers()
        assert not orphan.is_running() or orphan.status() == psutil.STATUS_ZOMBIE
        assert live.poll() is None
        assert sorted(p.name for p in root.iterdir()) == ["killed", "live", "starting"]  # the old, unused one goes
    finally:
        live.kill()
        live.wait()


def test_a_signal_another_thread_takes_stops_the_server_and_so_does_its_ray_dying(monkeypatch):
    """The handler set a threading.Event the main thread was waiting on: run while that wait
    held the Event's lock (a signal taken by another of the server's threads runs in the main
    thread at its next bytecode), it blocked on the lock for good, and Ctrl-C and SIGTERM
    never stopped the server. Now it only appends to a list the wait polls."""
    import os
    import signal
    import threading
    import time

    from tuneloop.control import server

    monkeypatch.setattr(server, "RAY_CHECK_S", 0.05)
    stopping: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))
    try:
        sender = threading.Timer(0.3, os.kill, args=(os.getpid(), signal.SIGTERM))
        sender.start()
        started = time.monotonic()
        assert server.wait_for_stop(stopping, lambda: None) is None
        assert stopping == [signal.SIGTERM] and time.monotonic() - started < 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    looks = iter([None, None, "its raylet (pid 7) exited with code 1"])
    assert server.wait_for_stop([], lambda: next(looks)) == "its raylet (pid 7) exited with code 1"


def test_an_empty_golden_file_is_refused_before_ray(tmp_path):
    """A header-only golden_dataset passed check-config; every gate then said the model had no
    golden_dataset, and every version scored 0.0 on it."""
    golden = tmp_path / "gold.tsv"
    golden.write_text("text\tlabel\n\n")
    problems = data_problems(_cfg(tmp_path, golden_dataset=str(golden)))
    assert any("models.m.golden_dataset" in p and "the gate would judge every version on nothing" in p
               for p in problems), problems
    golden.write_text("text\tlabel\ngood\ta\n")
    assert not any("golden_dataset" in p for p in data_problems(_cfg(tmp_path, golden_dataset=str(golden))))


def test_training_a_student_whose_teachers_production_lacks_its_labels_is_refused_before_ray(tmp_path):
    """Labels added to teacher and student, `tuneloop train student` before the teacher: the
    job died inside Ray Data's scoring actor, a Ray traceback asking to report a Ray bug."""
    from tuneloop.store.manifest import Manifest
    from tuneloop.store.registry import Registry

    registry = Registry(Storage(str(tmp_path / "store")))
    weights = tmp_path / "w"
    weights.mkdir()
    registry.publish("teacher", str(weights), Manifest(version="pending", model="teacher", parent=None,
                                                       base_model="some/model", task="text-classification",
                                                       labels=["a", "b"]))
    registry.promote("teacher", "v1")
    cfg = parse_config({"models": [{"name": "teacher", "base_model": "some/model", "labels": ["a", "b", "c"]},
                                   {"name": "student", "base_model": "some/model", "labels": ["a", "b", "c"],
                                    "distill": {"teacher": "teacher"}}],
                        "storage": {"root": str(tmp_path / "store")}})
    problems = data_problems(cfg, ["student"])
    assert any("its teacher teacher's production v1 answers ['a', 'b']" in p and "tuneloop train teacher" in p
               for p in problems), problems
    assert not any("its teacher" in p for p in data_problems(cfg, ["teacher", "student"]))  # run: teacher first
