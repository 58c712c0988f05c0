import re
from pathlib import Path

import pytest
import yaml

from tuneloop.core.config import DEFAULT_BASE_MODEL, ConfigError, TrainingConfig, load_config, parse_config
from tuneloop.core.storage_config import without_credentials

ROOT = Path(__file__).resolve().parents[2]
MODEL = {"name": "sentiment", "base_model": "some/model", "labels": ["negative", "positive"]}


def test_shipped_config_is_valid_and_resolves_paths():
    cfg = load_config(str(ROOT / "tuneloop.yaml"))
    m = cfg.model("sentiment")
    assert m.labels == ["negative", "positive"]
    assert m.base_model == "sentence-transformers/all-MiniLM-L6-v2"  # an id, not a path
    assert Path(m.seed_dataset).is_file()
    assert Path(cfg.storage.root).is_absolute()
    assert {m.name: m.task for m in cfg.models} == {
        "sentiment": "text-classification", "intent": "text-classification", "ner": "token-classification"}
    assert all(Path(m.seed_dataset).is_file() for m in cfg.models)


def test_a_model_overrides_training_keys_and_keeps_the_rest():
    cfg = parse_config({"models": [{**MODEL, "training": {"epochs": 9}}, {**MODEL, "name": "other"}],
                        "training": {"learning_rate": 1e-4, "epochs": 2}})
    own, other = cfg.training_for("sentiment"), cfg.training_for("other")
    assert (own.epochs, own.learning_rate, other.epochs, other.learning_rate) == (9, 1e-4, 2, 1e-4)


@pytest.mark.parametrize("training, fragment", [
    ({"epochs": 0}, "models.sentiment.training.epochs: Input should be greater than or equal to 1 (got 0)"),
    ({"epoch": 3}, "models.sentiment.training.epoch: unknown key (value 3); did you mean 'epochs'?"),
    ({"precision": "bf16"}, "models.sentiment.training: precision 'bf16' needs use_gpu")])
def test_a_models_bad_training_key_is_refused_naming_the_model(training, fragment):
    with pytest.raises(ConfigError) as e:
        parse_config({"models": [{**MODEL, "training": training}]})
    assert fragment in str(e.value) and "<root>" not in str(e.value)


def test_the_top_level_training_keys_are_checked_together_as_each_model_trains_with_them():
    """The section's keys are defaults: a GPU precision there is fine when every model says
    use_gpu, and refused, naming the section, once a model trains with it as it is."""
    gpu = {"use_gpu": True, "num_workers": 1}
    cfg = parse_config({"models": [{**MODEL, "training": gpu}, {**MODEL, "name": "other", "training": gpu}],
                        "training": {"precision": "bf16"}})
    assert cfg.training_for("other").precision == "bf16" and cfg.training_for("other").use_gpu
    with pytest.raises(ConfigError) as e:
        parse_config({"models": [{**MODEL, "training": gpu}, {**MODEL, "name": "other"}], "training": {"precision": "bf16"}})
    assert "  training: precision 'bf16' needs use_gpu" in str(e.value)


def test_unknown_key_is_named_with_its_value():
    with pytest.raises(ConfigError) as e:
        parse_config({"models": [MODEL], "serving": {"prot": 8000}})
    assert "serving.prot: unknown key (value 8000)" in str(e.value)


def test_bad_value_is_quoted():
    with pytest.raises(ConfigError) as e:
        parse_config({"models": [MODEL], "training": {"zero_stage": 5}})
    assert "training.zero_stage" in str(e.value) and "(got 5)" in str(e.value)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ({"labels": ["a", "a"]}, "repeated: ['a']"),
        ({"labels": ["only"]}, "labels"),
        ({"name": "Bad Name"}, "'Bad Name'"),
        ({"task": "token-classification", "labels": ["O"]}, "labels ['O'] name no entity type"),
        ({"task": "multi-label-classification", "labels": ["billing|refund", "other"]}, "may not hold '|'"),
        ({"task": "multi-label-classification", "labels": ["urgent ", "other"]}, "start or end with a space"),
    ],
)
def test_model_validation(override, fragment):
    with pytest.raises(ConfigError) as e:
        parse_config({"models": [{**MODEL, **override}]})
    assert fragment in str(e.value)


def test_autoscaling_bounds():
    with pytest.raises(ConfigError) as e:
        parse_config({"models": [MODEL], "serving": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}})
    assert "min_replicas (3) exceeds max_replicas (2)" in str(e.value)


def test_duplicate_model_names():
    with pytest.raises(ConfigError) as e:
        parse_config({"models": [MODEL, MODEL]})
    assert "repeated: ['sentiment']" in str(e.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(str(tmp_path / "absent.yaml"))
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("models:\n  - name: t\n    labels: [café, b]\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"cannot read config .*latin.yaml: not UTF-8 text \(byte 0xe9 at 36\)"):
        load_config(str(latin))  # a traceback from every command
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(str(scalar))


def test_a_key_written_twice_is_refused_with_its_lines(tmp_path):
    """PyYAML keeps the last of two equal keys: a section appended below the shipped one
    replaced it whole, its other keys falling back to defaults without a word."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("models: []\ntraining:\n  max_length: 64\n  num_workers: 2\ntraining:\n  use_gpu: true\n")
    with pytest.raises(ConfigError, match=r"key 'training' appears twice in one mapping, at lines 2 and 5"):
        load_config(str(twice))
    nested = tmp_path / "nested.yaml"
    nested.write_text("models:\n  - name: a\n    labels: [x, y]\n    labels: [z]\n")
    with pytest.raises(ConfigError, match=r"'labels' appears twice .* lines 3 and 4"):
        load_config(str(nested))
    anchors = tmp_path / "anchors.yaml"  # a merge key's override is not a repeat
    anchors.write_text("base: &b {x: 1}\nother:\n  <<: *b\n  x: 2\n")
    from tuneloop.core.config import read_config_yaml
    assert read_config_yaml(anchors)["other"] == {"x": 2}


def test_env_var_selects_config(tmp_path, monkeypatch):
    (tmp_path / "seed.tsv").write_text("text\tlabel\n")
    (tmp_path / "alt.yaml").write_text(
        "models:\n  - {name: spam, base_model: x/y, labels: [ham, spam], seed_dataset: seed.tsv}\n"
        "storage: {root: state}\n"
    )
    monkeypatch.setenv("TUNELOOP_CONFIG", str(tmp_path / "alt.yaml"))
    cfg = load_config()
    assert cfg.models[0].name == "spam"
    assert cfg.models[0].seed_dataset == str(tmp_path / "seed.tsv")
    assert cfg.storage.root == str(tmp_path / "state")


@pytest.mark.parametrize("root", ["s3://AKIAXYZ:s3cr3t@bucket/prefix?endpoint_override=minio:9000",
                                  "s3://bucket/prefix?access_key=AKIAXYZ&secret_key=s3cr3t",
                                  "s3://AKIAXYZ:s3cr3t@bucket/prefix?session_token=s3cr3t",
                                  "s3://AKIAXYZ:abc/s3cr3t@bucket/prefix",  # a secret key with a "/"
                                  "s3://bucket/prefix?Secret%5FKey=s3cr3t",
                                  "gs://user:s3cr3t@bucket/prefix"])
def test_credentials_in_a_storage_uri_are_refused_without_printing_them(root):
    with pytest.raises(ConfigError, match="carries credentials: give them to every node as environment") as e:
        parse_config({"models": [MODEL], "storage": {"root": root, "journal_dir": "/wal"}})
    assert "s3cr3t" not in str(e.value) and "bucket/prefix" in str(e.value)
    assert parse_config({"models": [MODEL], "storage": {"root": "s3://bucket/p?region=eu-west-1&scheme=http",
                                                        "journal_dir": "/wal"}}).storage.root.endswith("scheme=http")


def test_an_at_sign_in_a_storage_roots_path_is_a_folders_not_keys():
    """pyarrow reads s3://bucket/team@corp/ as bucket ``bucket``: the root was refused as
    carrying credentials, and the message quoted another bucket (``s3://corp/...``)."""
    root = "s3://bucket/team@corp/tuneloop"  # (boto3 is installed here; google-cloud-storage is not)
    assert parse_config({"models": [MODEL], "storage": {"root": root, "journal_dir": "/wal"}}).storage.root == root
    assert without_credentials(root) == root
    assert without_credentials("gs://bucket/users/alice@example.com/t") == "gs://bucket/users/alice@example.com/t"
    assert without_credentials("s3://KEY@bucket/team@corp/x") == "s3://bucket/team@corp/x"
    assert without_credentials("s3://KEY:se/cret@bucket/x") == "s3://bucket/x"
    assert without_credentials("s3://KEY:SECRET@bucket/team@corp/x") == "s3://bucket/team@corp/x"
    assert parse_config({"models": [MODEL], "storage": {"root": "s3://bucket/runs/12:00@x", "journal_dir": "/wal"}})


def test_keys_in_a_dataset_uri_or_in_any_quoted_uri_are_never_printed():
    """The seed's URI went into every version's manifest and the job's log."""
    for key, uri in [("seed_dataset", "s3://AKIAXYZ:s3cr3t@bucket/seed.tsv"),
                     ("golden_dataset", "s3://bucket/golden.tsv?secret_key=s3cr3t")]:
        with pytest.raises(ConfigError, match=f"models.0.{key}: {key} .* carries credentials") as e:
            parse_config({"models": [{**MODEL, key: uri}]})
        assert "s3cr3t" not in str(e.value)
    assert parse_config({"models": [{**MODEL, "seed_dataset": "gs://bucket/team@corp/seed.csv"}]})  # an @ in the path
    with pytest.raises(ConfigError, match="carries credentials") as e:  # a secret key holding a "/"
        parse_config({"models": [{**MODEL, "seed_dataset": "s3://AKIAXYZ:s3cr/3t@bucket/seed.csv"}]})
    assert "s3cr" not in str(e.value)
    with pytest.raises(ConfigError) as e:  # a misspelt key holding a list of URIs
        parse_config({"models": [{**MODEL, "seed_datasets": ["s3://AKIAXYZ:s3cr3t@bucket/x"]}]})
    assert "s3cr3t" not in str(e.value) and "s3://bucket/x" in str(e.value)
    for storage in [{"rot": "s3://AKIAXYZ:s3cr3t@bucket/x"},  # a misspelt key quotes its value
                    {"root": "/x", "journal_dir": "s3://AKIAXYZ:s3cr3t@bucket/j"}]:
        with pytest.raises(ConfigError) as e:
            parse_config({"models": [MODEL], "storage": storage})
        assert "s3cr3t" not in str(e.value) and "s3://bucket/" in str(e.value)


def test_an_empty_path_is_refused_not_read_as_left_out():
    """journal_dir "" passed here, became None, and the replicas then refused the config inside Ray."""
    with pytest.raises(ConfigError, match="'file://' names no folder"):
        parse_config({"models": [MODEL], "storage": {"root": "s3://b/t", "journal_dir": "file://"}})
    for config in [{"storage": {"root": "s3://b/t", "journal_dir": ""}}, {"storage": {"root": ""}},
                   {"models": [{**MODEL, "seed_dataset": ""}]}, {"models": [{**MODEL, "golden_dataset": ""}]}]:
        with pytest.raises(ConfigError, match="String should have at least 1 character"):
            parse_config({"models": [MODEL], **config})


def test_an_unquoted_numeric_key_id_says_to_quote_it_and_an_empty_key_list_is_none():
    with pytest.raises(ConfigError, match=r"auth.keys.0.id: YAML read this id as a number: quote it"):
        parse_config({"models": [MODEL], "auth": {"keys": [{"id": 342391, "role": "admin", "sha256": "a" * 64}]}})
    cfg = parse_config({"models": [MODEL], "auth": {"keys": None}, "serving": {"resources_per_replica": None}})
    assert cfg.auth.keys == [] and cfg.serving.resources_per_replica == {}


def test_a_key_digest_in_upper_case_is_the_same_digest():
    """PowerShell's Get-FileHash prints upper-case hex: it was refused as no SHA-256."""
    cfg = parse_config({"models": [MODEL], "auth": {"keys": [{"id": "0123abcd", "role": "admin", "sha256": "AB" * 32}]}})
    assert cfg.auth.keys[0].sha256 == "ab" * 32


def test_a_name_or_quantity_ending_in_a_line_break_is_refused():
    """Python's ``$`` matches before a final newline: a YAML block scalar (``name: |``)
    gave the model ``sentiment\n``, its route ``/v1/models/sentiment\n/predict``."""
    with pytest.raises(ConfigError, match=r"models.0.name: model name 'sentiment\\n'"):
        parse_config({"models": [{**MODEL, "name": "sentiment\n"}]})
    with pytest.raises(ConfigError, match="not a Kubernetes quantity"):
        parse_config({"models": [MODEL], "deploy": {"head_memory": "16Gi\n"}})


@pytest.mark.parametrize(("section", "key", "value"), [("rollout", "evaluate_every_s", 1e10),
                                                       ("predictions", "retention_days", 1_000_000)])
def test_periods_past_what_a_clock_can_sleep_or_subtract_are_refused(section, key, value):
    """Valid before, they overflowed later: time.sleep(1e10) killed the controller's rollout
    thread at its first look, and a million days' cutoff failed every hourly prune."""
    with pytest.raises(ConfigError, match=f"{section}.{key}: Input should be less than or equal to"):
        parse_config({"models": [MODEL], section: {key: value}})


def test_a_batch_target_past_half_the_timeout_is_refused_and_auto_replicas_is_autoscaling():
    with pytest.raises(ConfigError, match="target_batch_latency_s 5 is more than half of request_timeout_s 2"):
        parse_config({"models": [MODEL], "serving": {"target_batch_latency_s": 5, "request_timeout_s": 2}})
    assert parse_config({"models": [MODEL], "serving": {"target_batch_latency_s": 1, "request_timeout_s": 2}})
    auto = parse_config({"models": [MODEL], "serving": {"num_replicas": "auto", "autoscaling": {"max_replicas": 4}}})
    assert auto.serving.num_replicas is None and auto.serving.autoscaling.max_replicas == 4


def test_uri_storage_root_is_kept_and_needs_a_local_journal():
    cfg = parse_config({"models": [MODEL], "storage": {"root": "s3://bucket/prefix", "journal_dir": "wal"}},
                       base_dir=Path("/x"))
    assert cfg.storage.root == "s3://bucket/prefix" and cfg.storage.journal_path() == "/x/wal"
    with pytest.raises(ConfigError, match="journal_dir is required when root is not a local path"):
        parse_config({"models": [MODEL], "storage": {"root": "s3://bucket/prefix"}})
    local = parse_config({"models": [MODEL], "storage": {"root": "store"}}, base_dir=Path("/x"))
    assert local.storage.journal_path() == "/x/store/journal/feedback"


@pytest.mark.parametrize("section", [{"rollout": {"mode": "shadow"}}, {"trigger": {"accuracy_drop": 0.05}}])
def test_logging_no_prediction_is_refused_where_feedback_on_predictions_decides(section):
    assert parse_config({"models": [MODEL], "predictions": {"sample_rate": 0}}).predictions.sample_rate == 0
    with pytest.raises(ConfigError, match="predictions.sample_rate 0 logs no prediction, but"):
        parse_config({"models": [MODEL], "predictions": {"sample_rate": 0}, **section})


def test_home_and_file_uri_paths_are_the_local_paths_they_name(monkeypatch):
    monkeypatch.setenv("HOME", "/home/someone")
    cfg = parse_config({"models": [{**MODEL, "seed_dataset": "~/seed.tsv"}], "storage": {"root": "~/tl"}},
                       base_dir=Path("/x"))
    assert cfg.storage.root == "/home/someone/tl" and cfg.models[0].seed_dataset == "/home/someone/seed.tsv"
    uri = parse_config({"models": [MODEL], "storage": {"root": "file:///data/tl"}})
    assert uri.storage.root == "/data/tl" and uri.storage.journal_path() == "/data/tl/journal/feedback"


def test_auth_keys_in_the_config_are_hashes_with_known_roles():
    good = {"id": "0a1b2c3d", "role": "feedback", "sha256": "a" * 64}
    assert parse_config({"models": [MODEL], "auth": {"keys": [good]}}).auth.keys[0].role == "feedback"
    with pytest.raises(ConfigError, match="auth.keys.0.role"):
        parse_config({"models": [MODEL], "auth": {"keys": [{**good, "role": "owner"}]}})
    with pytest.raises(ConfigError, match="auth.keys.0.sha256"):
        parse_config({"models": [MODEL], "auth": {"keys": [{**good, "sha256": "tl_plain_secret"}]}})


def test_autoscaling_is_on_by_default_and_bounded_by_the_machine():
    cfg = parse_config({"models": [MODEL], "serving": {"num_cpus_per_replica": 2}})
    assert cfg.serving.num_replicas is None
    auto = cfg.serving.autoscaling.serve_config(cfg.serving.num_cpus_per_replica, cores=2)
    assert (auto["min_replicas"], auto["max_replicas"]) == (1, 1)
    assert cfg.serving.autoscaling.serve_config(2, cores=16)["max_replicas"] == 8
    assert cfg.serving.autoscaling.serve_config(0.5, cores=2)["max_replicas"] == 4
    fixed = parse_config({"models": [MODEL], "serving": {"autoscaling": {"min_replicas": 3, "max_replicas": 5}}})
    assert fixed.serving.autoscaling.serve_config(1, cores=2)["max_replicas"] == 5
    # Three models beside a 2-worker job (3 CPUs) on 16 cores share 13: 2 replicas of 2 CPUs each.
    assert cfg.serving.autoscaling.serve_config(2, cores=16, models=3, reserved_cpus=3)["max_replicas"] == 2
    assert cfg.serving.autoscaling.serve_config(2, cores=2, models=3, reserved_cpus=3)["max_replicas"] == 1
    assert fixed.serving.autoscaling.serve_config(1, cores=16, models=3, reserved_cpus=3)["max_replicas"] == 5
    # Half-GPU replicas beside a job on half of the one GPU: one replica, not the 14 the cores allow
    # (a second took the job's half, and every retrain waited for a GPU and failed).
    assert cfg.serving.autoscaling.serve_config(1, cores=16, reserved_cpus=2, num_gpus_per_replica=0.5, gpus=1,
                                                reserved_gpus=0.5)["max_replicas"] == 1
    assert cfg.serving.autoscaling.serve_config(1, cores=16, reserved_cpus=2, num_gpus_per_replica=0.5,
                                                gpus=4)["max_replicas"] == 8


def test_digest_is_the_same_wherever_the_config_is_loaded(tmp_path):
    """The ingress and the controller's keeper each load the config and must agree on its
    digest: it names the controller (core/names.controller_name)."""
    import yaml

    cfg = parse_config({"models": [MODEL], "storage": {"root": str(tmp_path)}})
    path = tmp_path / "tuneloop.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    again = parse_config(cfg.model_dump())
    assert cfg.digest() == again.digest() == load_config(str(path)).digest()
    changed = parse_config({"models": [MODEL], "storage": {"root": str(tmp_path)}, "trigger": {"every_n_feedback": 7}})
    assert changed.digest() != cfg.digest()


@pytest.mark.parametrize("model, serving, fragment", [
    ({"threshold": 0.7}, {}, "{'threshold': 0.7} apply to other tasks, not 'text-classification'"),
    ({"task": "token-classification", "labels": ["PER"], "threshold": {"PER": 0.9}}, {},
     "apply to other tasks, not 'token-classification' (it takes ['aggregation', 'window_stride'])"),
    ({"window_stride": 8}, {}, "{'window_stride': 8} apply to other tasks"),
    ({"task": "token-classification", "labels": ["PER"], "window_stride": 65}, {"max_length": 128},
     "window_stride 65 exceeds half of serving.max_length (128)"),
    ({"task": "token-classification", "labels": ["PER"], "window_stride": 40, "training": {"max_length": 64}},
     {"max_length": 128}, "window_stride 40 exceeds half of models.sentiment.training.max_length (64)"),  # training's
    ({}, {"num_replicas": 2, "autoscaling": {"max_replicas": 4}}, "num_replicas 2 is a fixed count"),
    ({}, {"max_batch_size": 2, "max_queued_requests": 4, "autoscaling": {"target_ongoing_requests": 32}},
     "target_ongoing_requests 32 is never reached: a replica holds at most 12 requests"),
])
def test_settings_that_would_be_ignored_are_refused(model, serving, fragment):
    with pytest.raises(ConfigError) as e:
        parse_config({"models": [{**MODEL, **model}], "serving": serving})
    assert fragment in str(e.value)


def test_a_target_left_out_is_one_full_batch_of_a_small_max_batch_size():
    small = parse_config({"models": [MODEL], "serving": {"max_batch_size": 2, "max_queued_requests": 4}})
    assert small.serving.autoscaling.target_ongoing_requests == 2
    auto = parse_config({"models": [MODEL], "serving": {"max_batch_size": 2, "max_queued_requests": 4,
                                                        "num_replicas": "auto"}})  # as Ray Serve writes autoscaling
    assert auto.serving.autoscaling.target_ongoing_requests == 2 and auto.serving.num_replicas is None
    assert parse_config(small.model_dump()) == small  # as replicas re-read it
    for serving in ({"max_batch_size": 256}, {"max_batch_size": 8}):  # 32 reachable: kept
        assert parse_config({"models": [MODEL], "serving": serving}).serving.autoscaling.target_ongoing_requests == 32


def test_an_unreachable_target_is_fine_where_replicas_cannot_scale_anyway():
    small = {"max_batch_size": 2, "max_queued_requests": 4}
    assert parse_config({"models": [MODEL], "serving": {**small, "autoscaling": {"min_replicas": 2,
                                                                                "max_replicas": 2}}})


def test_settings_of_the_task_and_defaults_written_out_are_taken():
    cfg = parse_config({"models": [{**MODEL, "threshold": 0.5, "aggregation": "first"},
                                   {**MODEL, "name": "ner", "task": "token-classification", "labels": ["PER"],
                                    "window_stride": 64}],
                        "serving": {"num_replicas": 2, "autoscaling": {}}})
    assert parse_config(cfg.model_dump()) == cfg  # as replicas re-read it: every key written out


def test_repeated_key_ids_are_refused_and_a_check_across_keys_does_not_print_the_section():
    key = {"id": "0a1b2c3d", "role": "admin", "sha256": "ab" * 32}
    with pytest.raises(ConfigError) as e:
        parse_config({"models": [MODEL], "auth": {"keys": [key, {**key, "role": "feedback"}]}})
    assert "repeated: ['0a1b2c3d']" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_config({"models": [MODEL], "serving": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}})
    assert "min_replicas (3) exceeds max_replicas (2)" in str(e.value) and "got {" not in str(e.value)


def test_a_named_runtime_must_be_built_and_servable_and_gpu_replicas_build_no_cpu_artifacts():
    with pytest.raises(ConfigError, match=r"'onnx-int8' is an artifact that optimize.runtimes \['onnx'\] never builds"):
        parse_config({"models": [MODEL], "serving": {"runtime": "onnx-int8"}, "optimize": {"runtimes": ["onnx"]}})
    with pytest.raises(ConfigError, match="an artifact for CPUs, but replicas serve on GPUs"):
        parse_config({"models": [MODEL], "serving": {"runtime": "onnx", "num_gpus_per_replica": 1}})
    assert parse_config({"models": [MODEL]}).builds_artifacts()
    assert not parse_config({"models": [MODEL], "serving": {"num_gpus_per_replica": 1}}).builds_artifacts()
    assert parse_config({"models": [MODEL], "serving": {"num_gpus_per_replica": 1},
                         "optimize": {"enabled": True}}).builds_artifacts()
    assert not parse_config({"models": [MODEL], "optimize": {"runtimes": []}}).builds_artifacts()


@pytest.mark.parametrize("sections, fragment", [
    ({"training": {"seed": -1}}, "seed: Input should be greater than or equal to 0"),
    ({"training": {"use_gpu": True, "gpus_per_worker": 2}}, "gpus_per_worker 2: a worker trains on one GPU"),
    ({"training": {"resources_per_worker": {"GPU": 1}}}, "['GPU'] are not custom resources; set cpus_per_worker"),
    ({"serving": {"resources_per_replica": {"cpu": 2}}}, "['cpu'] are not custom resources; set num_cpus_per_replica"),
    ({"serving": {"resources_per_replica": {"node-a": 0}}},
     "amounts must be at least 0.0001 (Ray's precision), got {'node-a': 0.0}"),
    ({"serving": {"resources_per_replica": {"node-a": 0.00001}}}, "got {'node-a': 1e-05}"),
    ({"serving": {"num_cpus_per_replica": 0.00001}}, "num_cpus_per_replica: Input should be greater than or equal to"),
    ({"serving": {"num_gpus_per_replica": 1.5}}, "num_gpus_per_replica: Input should be less than or equal to 1"),
])
def test_resources_a_worker_cannot_use_are_refused(sections, fragment):
    with pytest.raises(ConfigError) as e:
        parse_config({"models": [MODEL], **sections})
    assert fragment in str(e.value)


def test_config_errors_read_as_tuneloops_own():
    with pytest.raises(ConfigError) as e:
        parse_config({"models": [MODEL], "servng": {"port": 1}, "serving": {"prot": 8000}})
    assert "servng: unknown key; did you mean 'serving'?" in str(e.value) and "{'port'" not in str(e.value)
    assert "serving.prot: unknown key (value 8000); did you mean 'port'?" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_config({"models": [{"name": "m", "labels": ["a"]}]})
    assert "Value error" not in str(e.value) and "models.0: " in str(e.value)


def test_a_minimal_config_starts_from_the_default_model_and_empty_sections_count_as_left_out():
    cfg = parse_config({"models": [{"name": "m", "labels": ["a", "b"], "training": None}], "training": None,
                        "serving": None, "rollout": None, "deploy": {"workers": None}})
    assert cfg.model("m").base_model == DEFAULT_BASE_MODEL and cfg.training_for("m") == TrainingConfig()
    assert cfg.serving.port == 8000 and cfg.rollout.mode == "direct" and cfg.deploy.workers.max_workers >= 1
    nested = parse_config({"models": [{"name": "m", "labels": ["a", "b"]}], "serving": {"autoscaling": None}})
    assert nested.serving.autoscaling.min_replicas == 1


def _yaml(text: str):
    return parse_config(yaml.safe_load(text))


def test_labels_yaml_read_as_numbers_are_strings_and_as_booleans_are_refused():
    cfg = _yaml("models: [{name: m, labels: [0, 1, '2.5'], task: multi-label-classification, threshold: {1: 0.7}}]")
    assert cfg.model("m").labels == ["0", "1", "2.5"] and cfg.model("m").threshold == {"1": 0.7}
    with pytest.raises(ConfigError, match=r"YAML read \[1.0\] as numbers with decimals: quote such labels"):
        _yaml("models: [{name: m, labels: [0, 1.0]}]")
    with pytest.raises(ConfigError, match=r"YAML read \[True, False\] as true/false: quote such labels"):
        _yaml("models: [{name: m, labels: [yes, no]}]")


@pytest.mark.parametrize("name", ["ingress", "controller"])
def test_names_of_tuneloops_own_applications_are_not_model_names(name):
    with pytest.raises(ConfigError, match=f"model name '{name}' is reserved"):
        parse_config({"models": [{"name": name, "labels": ["a", "b"]}]})


def test_a_models_own_training_errors_name_its_key_and_suggest_one():
    with pytest.raises(ConfigError) as e:
        parse_config({"models": [{"name": "m", "labels": ["a", "b"], "training": {"epoch": 5}}]})
    assert "models.m.training.epoch: unknown key (value 5); did you mean 'epochs'?" in str(e.value)
    assert "<root>" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_config({"models": [{"name": "m", "labels": ["a", "b"], "training": {"precision": "bf16"}}]})
    assert "<root>" not in str(e.value) and "models.m.training: " in str(e.value)


def test_an_ipv6_host_is_refused_saying_what_to_give():
    with pytest.raises(ConfigError, match="host '::': tuneloop listens on IPv4"):
        parse_config({"models": [MODEL], "serving": {"host": "::"}})


def test_a_job_that_could_leave_a_worker_without_rows_is_refused():
    with pytest.raises(ConfigError, match="max_rows_per_job 1 is fewer than num_workers 2"):
        parse_config({"models": [MODEL], "training": {"max_rows_per_job": 1}})


@pytest.mark.parametrize("sections, fragment", [
    ({"serving": {"max_inputs_per_request": 10000, "max_chars_per_input": 1000000}},
     "max_inputs_per_request 10000 x max_chars_per_input 1000000 allows request bodies of 114,441 MiB"),
    ({"auth": {"open_roles": ["predict", "admin"]}}, "open_roles ['predict', 'admin']: admin cannot be open"),
    ({"rollout": {"min_feedback": 100, "min_feedback_to_roll_back": 1000}},
     "min_feedback_to_roll_back 1000 exceeds min_feedback 100"),
    ({"serving": {"port": 8404}}, "port 8404 is Ray Serve's HAProxy listener (RAY_SERVE_HAPROXY_STATS_PORT)"),
    ({"models": [{**MODEL, "task": "multi-label-classification", "threshold": 1.5}]},
     "model 'sentiment' (multi-label-classification): thresholds must be between 0 and 1"),
])
def test_settings_that_would_fail_once_running_are_refused_naming_key_and_value(sections, fragment, monkeypatch):
    for var in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
        monkeypatch.delenv(var, raising=False)  # a Serve started in this session moved them
    with pytest.raises(ConfigError) as e:
        parse_config({"models": [MODEL], **sections})
    assert fragment in str(e.value)


@pytest.mark.parametrize("config_dir, journal_dir", [("/data", "/data"), ("/etc/tuneloop", "/etc/tuneloop/journal"),
                                                     ("/", "/var/lib/journal")])
def test_the_heads_two_mounts_lie_apart(config_dir, journal_dir):
    from tuneloop.core.deploy_config import DeployConfig

    with pytest.raises(ValueError, match="mounted apart|a folder below /"):
        DeployConfig(config_dir=config_dir, journal_dir=journal_dir)


def test_a_min_feedback_below_the_rollback_default_takes_it_down_with_it():
    from tuneloop.core.rollout import RolloutConfig

    assert RolloutConfig(min_feedback=20).min_feedback_to_roll_back == 20  # a key left out never fails
    assert RolloutConfig().min_feedback_to_roll_back == 30


def test_local_is_a_ray_of_our_own_not_a_cluster_to_join():
    """``ray.address: local`` went the joining way: ``ray.num_cpus`` ignored, the resource
    checks skipped, a job that could not fit left waiting for an autoscaler."""
    from tuneloop.core.config import cluster_to_join

    assert cluster_to_join(None, None, None) is None
    assert cluster_to_join(None, "local", "10.0.0.5:6379") is None  # the config's local wins over $RAY_ADDRESS
    assert cluster_to_join(None, None, "10.0.0.5:6379") == "10.0.0.5:6379"  # a Ray Job's entrypoint
    assert cluster_to_join("auto", "local", None) == "auto"  # the flag's first
    assert cluster_to_join("", None, "local") is None


@pytest.mark.parametrize("section, key, value, says", [
    ("training", "replay_ratio", float("inf"), "less than or equal to 1000 (got inf)"),  # every job after v1 failed
    ("training", "cpus_per_worker", 1e-5, "greater than or equal to 0.0001 (got 1e-05)"),  # Ray refused it at the job
    ("training", "gpus_per_worker", 1e-5, "greater than or equal to 0.0001 (got 1e-05)"),
    ("serving", "num_gpus_per_replica", 1e-5, "must be 0, or at least 0.0001"),  # Ray refused it at the deployment
])
def test_amounts_ray_cannot_place_or_rows_it_cannot_count_are_refused_with_their_key(section, key, value, says):
    with pytest.raises(ConfigError, match=rf"{section}\.{key}: .*{re.escape(says)}"):
        parse_config({"models": [MODEL], section: {key: value}})


def test_a_check_of_several_training_keys_blames_the_section_that_set_them():
    """A top-level ``precision: bf16`` without a GPU was put down to a model's own training keys."""
    with pytest.raises(ConfigError, match=r"\n  training: precision 'bf16' needs use_gpu"):
        parse_config({"models": [{**MODEL, "training": {"epochs": 5}}], "training": {"precision": "bf16"}})
    with pytest.raises(ConfigError, match=r"models\.sentiment\.training: precision 'bf16' needs use_gpu"):
        parse_config({"models": [{**MODEL, "training": {"precision": "bf16"}}]})


def test_a_boolean_where_a_number_goes_is_refused_not_read_as_1_or_0():
    """YAML reads yes/no/true/false as booleans and pydantic took them for 1 and 0:
    ``sample_rate: false`` turned the prediction log off, ``port: yes`` asked for port 1."""
    doc = {"models": [{**MODEL, "window_stride": True}], "serving": {"port": True},
           "predictions": {"sample_rate": False},
           "training": {"epochs": True, "use_gpu": False, "zero_stage": True, "resources_per_worker": {"x": True}},
           "rollout": {"min_feedback": True, "canary_steps": [True, 50]}}
    with pytest.raises(ConfigError) as e:
        parse_config(doc)
    for key in ("serving.port", "predictions.sample_rate", "training.epochs", "window_stride", "training.zero_stage",
                "rollout.min_feedback", "rollout.canary_steps"):
        assert re.search(rf"{re.escape(key)}: a boolean where a number goes .*\(got \[?(True|False)", str(e.value)), key
    assert "use_gpu" not in str(e.value)  # a boolean where one goes
