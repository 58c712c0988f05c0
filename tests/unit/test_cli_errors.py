"""What the CLI says when something is off: one line and exit 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from tuneloop.control.cli import app
from tuneloop.control.operate import Step, StepFailed, plan, run_steps
from tuneloop.core.config import parse_config
from tuneloop.core.errors import CorruptStoredFile
from tuneloop.store.manifest import Manifest
from tuneloop.store.registry import Registry
from tuneloop.store.storage import Storage


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "tuneloop.yaml"
    path.write_text(yaml.safe_dump({"models": [{"name": "m", "base_model": "some/model", "labels": ["a", "b"],
                                                "seed_dataset": str(tmp_path / "seed.tsv")}],
                                    "storage": {"root": str(tmp_path / "store")}}))
    (tmp_path / "seed.tsv").write_text("text\tlabel\nx\ta\ny\tb\n")
    weights = tmp_path / "w"
    weights.mkdir()
    registry = Registry(Storage(str(tmp_path / "store")))
    registry.publish("m", str(weights), Manifest(version="pending", model="m", parent=None, base_model="some/model",
                                                 task="text-classification", labels=["a", "b"]))
    registry.promote("m", "v1")
    return str(path)


@pytest.mark.parametrize("content", ['{"production": "v1", "hist', '{"production": 3}'])
def test_a_cut_or_hand_edited_state_file_is_named_not_a_traceback(config, tmp_path, content):
    (tmp_path / "store/registry/m/state.json").write_text(content)
    with pytest.raises(CorruptStoredFile, match="state.json is not a file tuneloop can read"):
        Registry(Storage(str(tmp_path / "store"))).state("m")
    done = subprocess.run([sys.executable, "-m", "tuneloop.control", "versions", "m", "--config", config],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "state.json is not a file tuneloop can read" in done.stderr


@pytest.mark.parametrize("content", ['{"production": "v1", "hist', '{"production": 3}', '\udcff'])
def test_a_change_of_production_on_a_cut_state_file_names_it_and_writes_nothing(config, tmp_path, content):
    state = tmp_path / "store/registry/m/state.json"
    state.write_bytes(content.encode("utf-8", "surrogateescape"))
    registry = Registry(Storage(str(tmp_path / "store")))
    for change in (lambda: registry.promote("m", "v1", force=True), lambda: registry.rollback("m")):
        with pytest.raises(CorruptStoredFile, match="state.json is not a file tuneloop can read") as e:
            change()
        assert e.value.status == 503
    assert state.read_bytes() == content.encode("utf-8", "surrogateescape")


def test_misplaced_arguments_and_a_model_given_as_a_prediction_id_are_refused(config):
    runner = CliRunner()
    status = runner.invoke(app, ["rollout", "m", "status", "v9", "--stage", "canary", "--config", config])
    assert status.exit_code == 2 and "go with start, --at with step, not with status" in status.output
    start = runner.invoke(app, ["rollout", "m", "start", "--config", config])
    assert start.exit_code == 2 and "give the version to roll out: tuneloop rollout m start VERSION" in start.output
    pause = runner.invoke(app, ["rollout", "m", "pause", "--force", "--config", config])
    assert pause.exit_code == 2 and "--stage and --force go with start, not with pause" in pause.output
    lineage = runner.invoke(app, ["lineage", "m", "--config", config])
    assert lineage.exit_code == 2 and "'m' is a model: give a version too" in lineage.output


def test_check_config_says_ok_and_an_empty_key_list_says_so(config):
    checked = CliRunner().invoke(app, ["check-config", "--config", config])
    assert checked.exit_code == 0 and "config OK: 1 model(s), m" in checked.output
    listed = CliRunner().invoke(app, ["keys", "list", "--config", config])
    assert listed.exit_code == 0 and "no API keys" in listed.output


def test_check_config_fails_on_what_run_would_refuse(config, tmp_path):
    (tmp_path / "seed.tsv").unlink()
    checked = CliRunner().invoke(app, ["check-config", "--config", config])
    assert checked.exit_code == 2 and "seed_dataset" in checked.output and "does not exist" in checked.output


def test_check_config_of_a_bucket_config_opens_no_bucket_and_still_checks_the_local_files(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({
        "models": [{"name": "m", "base_model": "some/model", "labels": ["a", "b"], "seed_dataset": "seed.tsv"}],
        "storage": {"root": "s3://no-such-bucket/x?endpoint_override=127.0.0.1:9&scheme=http",
                    "journal_dir": str(tmp_path / "journal")}}))
    checked = CliRunner().invoke(app, ["check-config", "--config", str(path)])
    assert checked.exit_code == 2 and "models.m.seed_dataset" in checked.output and "does not exist" in checked.output
    (tmp_path / "seed.tsv").write_text("text\tlabel\nx\ta\ny\tb\n")
    assert CliRunner().invoke(app, ["check-config", "--config", str(path)]).exit_code == 0


def test_a_deploy_command_that_fails_or_is_missing_says_so_in_one_line(tmp_path):
    with pytest.raises(StepFailed, match=r"failed \(exit 3\)") as failed:
        run_steps([Step(["sh", "-c", "exit 3"])], dry_run=False, echo=lambda _: None)
    assert failed.value.code == 3
    with pytest.raises(StepFailed, match="no-such-tool is not installed"):
        run_steps([Step(["no-such-tool", "apply"])], dry_run=False, echo=lambda _: None)


def test_ray_steps_run_the_ray_beside_this_python_not_one_on_path(monkeypatch):
    """The README runs .venv/bin/tuneloop without activating the venv: `ray` was not on PATH
    (exit 127), or was another Ray release than the image's."""
    from pathlib import Path

    from tuneloop.control.operate import _beside_python

    assert _beside_python("ray") == str(Path(sys.executable).parent / "ray")
    assert _beside_python("kubectl") == "kubectl"
    monkeypatch.setenv("PATH", "/nonexistent")
    run_steps([Step(["ray", "--version"])], dry_run=False, echo=lambda _: None)


def test_a_step_whose_probe_fails_is_skipped_and_the_rest_run(tmp_path):
    """The PodMonitor needs the Prometheus Operator, which README calls optional."""
    echoed, marker = [], tmp_path / "ran"
    run_steps([Step(["sh", "-c", "exit 3"], only_if=["sh", "-c", "exit 1"]),
               Step(["sh", "-c", "exit 3"], only_if=["no-such-probe"]),
               Step(["touch", str(marker)])], dry_run=False, echo=echoed.append)
    assert marker.exists() and sum("skipped" in line for line in echoed) == 2
    with pytest.raises(StepFailed):
        run_steps([Step(["sh", "-c", "exit 3"], only_if=["true"])], dry_run=False, echo=lambda _: None)


def test_kuberay_up_and_down_apply_the_podmonitor_only_where_its_kind_exists(tmp_path):
    cfg = parse_config({"models": [{"name": "m", "labels": ["a", "b"]}]}, base_dir=tmp_path)
    for verb in ("up", "down"):
        steps = [s for s in plan(cfg, "kuberay", verb, tmp_path) if "podmonitor.yaml" in str(s)]
        assert len(steps) == 1 and "--api-group=monitoring.coreos.com" in steps[0].only_if[-1]
    assert any("rayservice.yaml" in str(s) for s in plan(cfg, "kuberay", "down", tmp_path))


def test_a_storage_root_that_cannot_be_read_is_one_line_not_a_traceback(tmp_path):
    (tmp_path / "file").write_text("x")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"models": [{"name": "m", "labels": ["a", "b"]}],
                                      "storage": {"root": str(tmp_path / "file")}}))
    done = subprocess.run([sys.executable, "-m", "tuneloop.control", "versions", "m", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"tuneloop: storage root {tmp_path / 'file'} is a file, not a folder" in done.stderr
    # A storage error past that check (here: a registry folder that is a file) is one line too.
    (tmp_path / "store").mkdir()
    (tmp_path / "store/registry").write_text("x")
    config.write_text(yaml.safe_dump({"models": [{"name": "m", "labels": ["a", "b"]}],
                                      "storage": {"root": str(tmp_path / "store")}}))
    done = subprocess.run([sys.executable, "-m", "tuneloop.control", "versions", "m", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("tuneloop: ") and "Not a directory" in done.stderr and "Error:" not in done.stderr


def test_a_read_of_a_storage_root_that_is_not_there_says_so(tmp_path):
    """A typo in storage.root read as a fresh install: "no versions yet", "production none"."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"models": [{"name": "m", "labels": ["a", "b"]}],
                                      "storage": {"root": str(tmp_path / "nope")}}))
    for command in (["versions", "m"], ["status"], ["feedback", "stats", "m"], ["keys", "list"],
                    ["keys", "revoke", "aaaaaaaa"]):  # a revoke made the mistyped root, and reads then found it
        done = CliRunner().invoke(app, [*command, "--config", str(config)])
        assert done.exit_code == 2 and "storage root" in done.output and "does not exist" in done.output, command
    assert not (tmp_path / "nope").exists()


def test_train_while_a_job_of_the_model_runs_is_refused_before_ray_and_writes_no_record(config, tmp_path):
    """It started Ray, wrote a failed job record (the training-failed alert fired) and exited 1."""
    from tuneloop.store.jobs import JobStore

    from tuneloop.store.jobs import take_lease

    storage = Storage(str(tmp_path / "store"))
    jobs = JobStore(storage)
    running = jobs.create("m", "feedback")
    lease = take_lease(storage, jobs, running)  # as its live process holds it
    shown = CliRunner().invoke(app, ["train", "m", "-c", config])
    assert shown.exit_code == 2 and f"job {running.job_id} of m is running" in shown.output
    assert [j.job_id for j in jobs.all()] == [running.job_id]
    lease.release()  # its process was killed: the record still says running, but a job may start at once
    shown = CliRunner().invoke(app, ["train", "m", "-c", config])
    assert "unit tests must not start Ray" in str(shown.exception)  # past the check, on to Ray


def test_a_version_given_as_a_number_is_refused_with_its_name_and_before_torch_loads(config):
    shown = CliRunner().invoke(app, ["optimize", "m", "3", "-c", config])
    assert shown.exit_code == 2 and "has no version '3'; versions are named v1, v2, ...: did you mean 'v3'?" in shown.output
    shown = CliRunner().invoke(app, ["rollout", "m", "start", "3", "-c", config])
    assert shown.exit_code == 2 and "did you mean 'v3'?" in shown.output


def test_optimizing_a_version_of_other_labels_than_the_configs_is_refused_in_a_line(config, tmp_path):
    """No replica serves it; its parity reference failed to load: a 69-line traceback and
    exit 1, which says no artifact passed parity."""
    doc = yaml.safe_load(open(config))
    doc["models"][0]["labels"] = ["a", "b", "c"]
    grown = tmp_path / "grown.yaml"
    grown.write_text(yaml.safe_dump(doc))
    shown = CliRunner().invoke(app, ["optimize", "m", "v1", "-c", str(grown)])
    assert shown.exit_code == 2 and "m v1 was trained for labels ['a', 'b'], the config has ['a', 'b', 'c']" in shown.output
    assert "Traceback" not in shown.output


def test_a_ray_address_without_its_port_is_refused_in_a_line(config):
    """Ray raised a bare ValueError ("Invalid address format"): a traceback."""
    from tuneloop.core.config import ConfigError

    shown = CliRunner().invoke(app, ["train", "m", "--address", "10.0.0.5", "-c", config])
    assert shown.exit_code == 2 and "--address: Ray address '10.0.0.5' is not host:port" in shown.output
    with pytest.raises(ConfigError, match="ray.address: Ray address 'head' is not host:port .*head:6379"):
        parse_config({"models": [{"name": "m", "labels": ["a", "b"]}], "ray": {"address": "head"}})
    with pytest.raises(ConfigError, match="Ray address '::1' is not host:port"):  # its last group is no port
        parse_config({"models": [{"name": "m", "labels": ["a", "b"]}], "ray": {"address": "::1"}})
    for fine in ("auto", "local", "10.0.0.5:6379", "[::1]:6379", "ray://head:10001"):
        assert parse_config({"models": [{"name": "m", "labels": ["a", "b"]}], "ray": {"address": fine}})


def test_jobs_lists_the_newest_first_with_why_each_failed(config, tmp_path):
    """An operator saw a failed job only in the log or its file, or by its id if known."""
    import json

    from tuneloop.store.jobs import JobStore

    jobs = JobStore(Storage(str(tmp_path / "store")))
    assert CliRunner().invoke(app, ["jobs", "--config", config]).output.strip() == "no training jobs yet"
    done = jobs.create("m", "manual")
    done.state, done.version, done.finished_at = "succeeded", "v2", jobs.now()
    jobs.save(done)
    failed = jobs.create("m", "every_n_feedback")
    failed.state, failed.finished_at = "failed", jobs.now()
    failed.error = "WorkerGroupError: Traceback (most recent call last):\n  File ...\nValueError: " + "x" * 500
    jobs.save(failed)
    listed = CliRunner().invoke(app, ["jobs", "m", "--config", config])
    assert listed.exit_code == 0, listed.output
    header, *lines = listed.output.splitlines()
    assert header.split() == ["JOB", "MODEL", "STATE", "TRIGGER", "VERSION", "CREATED", "TOOK", "WHY"]
    assert lines[0].split()[:5] == [failed.job_id, "m", "failed", "every_n_feedback", "-"] and lines[0].endswith("x...")
    assert "WorkerGroupError: Traceback (most recent call last): File ... ValueError: x" in lines[0]  # one line
    assert len(lines[0]) < 320 and lines[1].split()[:5] == [done.job_id, "m", "succeeded", "manual", "v2"]
    assert lines[1].index("manual") == lines[0].index("every_n_feedback") == header.index("TRIGGER")  # columns
    assert len(CliRunner().invoke(app, ["jobs", "--last", "1", "--config", config]).output.splitlines()) == 2
    records = json.loads(CliRunner().invoke(app, ["jobs", "--json", "--config", config]).output)
    assert [r["job_id"] for r in records] == [failed.job_id, done.job_id] and records[0]["error"].startswith("WorkerGroupError")
    assert CliRunner().invoke(app, ["jobs", "nope", "--config", config]).exit_code != 0


def test_feedback_stats_prints_each_versions_online_accuracy_in_columns_and_json_on_request(config, tmp_path):
    """It printed the statistics' JSON document alone, which `status` and `jobs` print as
    lines (their JSON behind --json)."""
    import json

    from tuneloop.core.tasks import model_tasks
    from tuneloop.store.feedback_store import FeedbackStore

    cfg = parse_config(yaml.safe_load(open(config)))
    assert CliRunner().invoke(app, ["feedback", "stats", "m", "--config", config]).output.strip() == "m: no feedback yet"
    store = FeedbackStore(Storage(str(tmp_path / "store")), cfg.storage.journal_path(), model_tasks(cfg.models))
    store.open_writer()
    for i, (said, served) in enumerate([("a", "a"), ("a", "b"), ("b", "b"), ("b", "b")]):
        store.append(model="m", text=f"t{i}", label=said, prediction_id=f"{i:032x}", version="v1",
                     predicted_label=served)
    store.append(model="m", text="t0", label="b", prediction_id=f"{0:032x}", version="v1", predicted_label="a")
    store.append(model="m", text="unserved", label="a")
    store.close()
    shown = CliRunner().invoke(app, ["feedback", "stats", "m", "--config", config])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[0] == ("m: 5 feedback record(s) count; 1 earlier answer(s) on the same predictions were replaced by "
                        "newer ones (latest wins)")
    assert lines[1] == "labels: a 2, b 3"
    header = lines.index("VERSION  FEEDBACK  AGREED  ONLINE ACCURACY")
    assert lines[header + 1].split() == ["v1", "4", "2", "0.5000"]  # t0 now says b where v1 served a
    label_header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["LABEL", "RIGHT"])
    assert lines[label_header + 1].split()[:4] == ["a", "0", "1", "1"] and lines[-1].startswith("days: ")
    document = json.loads(CliRunner().invoke(app, ["feedback", "stats", "m", "--json", "--config", config]).output)
    assert document["total"] == 5 and document["by_version"]["v1"]["online_accuracy"] == 0.5
    # The keys, a row each, with the quarantine's verdict; their JSON behind --json too.
    from tuneloop.store.quarantine import QuarantineBook

    QuarantineBook(Storage(str(tmp_path / "store"))).quarantine("m", {"(no key)": "flipped every label"}, {})
    keys = CliRunner().invoke(app, ["feedback", "keys", "m", "--config", config])
    assert keys.exit_code == 0, keys.output
    header, row = keys.output.splitlines()
    assert header.split()[:3] == ["KEY", "ROWS", "JUDGED"] and row.startswith("(no key)")
    assert row.split()[2:4] == ["5", "4"] and "held since" in row and row.endswith("flipped every label")
    listed = json.loads(CliRunner().invoke(app, ["feedback", "keys", "m", "--json", "--config", config]).output)
    assert listed["keys"][0]["quarantine"]["state"] == "quarantined"


def test_jobs_shows_a_job_without_heartbeat_and_leaves_marking_it_lost_to_the_cluster(config, tmp_path):
    """Read by this machine's clock, a minute ahead of the cluster's (a laptop after a sleep),
    `tuneloop jobs` marked a live job lost, and that job then never published its version."""
    from datetime import timedelta

    from tuneloop.store.jobs import JobStore, _utcnow

    jobs = JobStore(Storage(str(tmp_path / "store")), clock=lambda: _utcnow() - timedelta(seconds=90))
    job = jobs.create("m", "manual")  # its heartbeat by the cluster's clock, 90 s behind this one's
    listed = CliRunner().invoke(app, ["jobs", "m", "--config", config])
    assert listed.exit_code == 0, listed.output
    assert listed.output.splitlines()[1].split()[:3] == [job.job_id, "m", "running"]
    assert "no heartbeat since" in listed.output
    assert "the cluster's controller marks it failed" in listed.output
    assert jobs.stored(job.job_id).state == "running"  # not marked: only the cluster's readers do
