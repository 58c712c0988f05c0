"""deploy/: every rendered file validates against the schema of what reads it, the committed
examples are what the example config renders (no drift), and every --dry-run prints
commands that parse. No Ray cluster: Ray's and Serve's schemas are imported, not run."""

from __future__ import annotations

import copy
import filecmp
import json
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from tuneloop.control import launcher_yaml, manifests, operate
from tuneloop.control.cli import app
from tuneloop.core.config import parse_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "tuneloop.cluster.yaml"
SCHEMAS = ROOT / "tests" / "schemas"
CRDS = {("ray.io/v1", "RayService"): "kuberay-rayservice-v1.json", ("ray.io/v1", "RayJob"): "kuberay-rayjob-v1.json",
        ("monitoring.coreos.com/v1", "PodMonitor"): "prometheus-operator-podmonitor-v1.json"}


def _example():
    doc = yaml.safe_load(EXAMPLE.read_text())
    return parse_config(doc, base_dir=EXAMPLE.parent), doc


def _strict(schema):
    """As `kubectl --validate=strict`: an unknown field is an error, not silently pruned."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(v) for v in schema]
    return schema


def _validate_k8s(doc: dict) -> None:
    key = (doc["apiVersion"], doc["kind"])
    if key in CRDS:
        schema = _strict(json.loads((SCHEMAS / CRDS[key]).read_text()))
        jsonschema.Draft7Validator(schema).validate(doc)
    else:
        kubernetes_validate.validate(doc, "1.33.0", strict=True)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    cfg, doc = _example()
    out = tmp_path_factory.mktemp("deploy")
    for target in ("kuberay", "aws", "serve"):
        operate.render(cfg, doc, target, out / operate.FOLDERS[target])
    # GCP's from the same file with its buckets on GCS, as `make deploy-files` renders it
    doc = yaml.safe_load(EXAMPLE.read_text().replace("s3://", "gs://"))
    operate.render(parse_config(doc, base_dir=EXAMPLE.parent, clients_here=False), doc, "gcp",
                   out / operate.FOLDERS["gcp"])
    return out


def test_the_committed_files_are_what_the_example_config_renders(rendered):
    for folder in ("kuberay", "launcher/aws", "launcher/gcp", "serve"):
        diff = filecmp.dircmp(rendered / folder, ROOT / "deploy" / folder)
        assert not (diff.left_only or diff.right_only or diff.diff_files), (
            f"deploy/{folder} drifted from the config: run `make deploy-files` ({diff.report()})")


def test_every_kubernetes_manifest_validates_against_its_schema(rendered):
    docs = [d for f in sorted((rendered / "kuberay").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())]
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "NetworkPolicy", "PersistentVolumeClaim", "PodMonitor",
                                               "PodMonitor", "RayJob", "RayService"]
    for doc in docs:
        _validate_k8s(doc)
    service = next(d for d in docs if d["kind"] == "RayService")
    broken = copy.deepcopy(service)
    broken["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicee"] = "x"
    with pytest.raises(jsonschema.ValidationError, match="imagePullPolicee"):
        _validate_k8s(broken)


def test_the_rayservice_serves_from_gpu_workers_and_keeps_the_journal_on_the_head(rendered):
    docs = {d["kind"]: d for f in (rendered / "kuberay").glob("*.yaml") for d in yaml.safe_load_all(f.read_text())}
    monitors = [d for d in yaml.safe_load_all((rendered / "kuberay/podmonitor.yaml").read_text())]
    tuneloop_monitor = next(m for m in monitors if m["metadata"]["name"].endswith("-tuneloop"))
    head_labels = docs["RayService"]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"]
    # /metrics already covers every node: scraped on the serving head alone, with a key.
    assert tuneloop_monitor["spec"]["selector"]["matchLabels"].items() <= head_labels.items()
    assert tuneloop_monitor["spec"]["podMetricsEndpoints"][0]["authorization"]["credentials"]["key"] == \
        manifests.METRICS_KEY
    cluster = docs["RayService"]["spec"]["rayClusterConfig"]
    head, (workers,) = cluster["headGroupSpec"], cluster["workerGroupSpecs"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no replica and no training worker on the head
    assert json.loads(json.loads(head["rayStartParams"]["resources"])) == {manifests.JOURNAL_RESOURCE: 1}
    head_pod = head["template"]["spec"]
    assert {v["name"] for v in head_pod["volumes"]} == {"config", "journal", "dshm", "home"}
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in head_pod["volumes"]  # Ray's object store: not 64 MB
    assert {"name": "dshm", "mountPath": "/dev/shm"} in head_pod["containers"][0]["volumeMounts"]
    # A NewCluster upgrade's second head lands beside the first, where the journal volume is.
    (term,) = head_pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["labelSelector"]["matchLabels"] == head_labels and term["topologyKey"] == "kubernetes.io/hostname"
    gpu = workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert gpu == "1" and (workers["minReplicas"], workers["maxReplicas"]) == (1, 4)
    assert cluster["enableInTreeAutoscaling"] is True
    config_map = docs["ConfigMap"]["metadata"]["name"]
    assert head_pod["volumes"][0]["configMap"]["name"] == config_map  # the config's content names it
    inside = parse_config(yaml.safe_load(docs["ConfigMap"]["data"]["tuneloop.yaml"]))
    assert inside.storage.journal_dir == inside.deploy.journal_dir and inside.serving.host == "0.0.0.0"
    assert inside.serving.autoscaling.max_replicas == 4  # as the example config says
    job = docs["RayJob"]["spec"]
    assert shlex.split(job["entrypoint"])[:5] == ["python", "-m", "tuneloop.control", "train", "sentiment"]
    # Kubernetes' default pull policy: an image rebuilt under :latest reaches restarted pods.
    pods = [head_pod, workers["template"]["spec"], job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]]
    assert all("imagePullPolicy" not in c for pod in pods for c in pod["containers"])


def test_serve_configs_validate_and_route_every_model(rendered):
    from ray.serve.schema import ServeDeploySchema

    for path in [rendered / "serve/serve.yaml", rendered / "launcher/aws/etc/serve.yaml"]:
        schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
        routes = {a.name: a.route_prefix for a in schema.applications}
        assert routes == {"tuneloop-model-sentiment": "/v1/models/sentiment/predict", "tuneloop-controller": None,
                          "tuneloop": "/"}


def test_launcher_yamls_validate_against_rays_schema(rendered):
    from ray.autoscaler._private.util import prepare_config, validate_config

    for cloud in ("aws", "gcp"):
        doc = yaml.safe_load((rendered / f"launcher/{cloud}/cluster.yaml").read_text())
        validate_config(prepare_config(copy.deepcopy(doc)))
        assert doc["available_node_types"]["head"]["resources"] == {"CPU": 0, manifests.JOURNAL_RESOURCE: 1}
        with pytest.raises(jsonschema.ValidationError):
            validate_config(prepare_config({**copy.deepcopy(doc), "max_workerz": 3}))
    aws = yaml.safe_load((rendered / "launcher/aws/cluster.yaml").read_text())
    assert aws["available_node_types"]["gpu_worker"]["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}


def test_a_config_that_only_this_machine_can_run_is_refused(tmp_path):
    cfg = parse_config({"models": [{"name": "m", "base_model": "b", "labels": ["a", "b"], "seed_dataset": "seed.tsv"}]})
    with pytest.raises(manifests.NotClusterable, match="storage.root.*local path") as refused:
        manifests.kuberay(cfg, {})
    assert "seed_dataset 'seed.tsv'" in str(refused.value)
    for base in ("./mymodel", str(tmp_path)):  # weights in a folder of this machine: on no node
        cfg = parse_config({"models": [{"name": "m", "base_model": base, "labels": ["a", "b"]}],
                            "storage": {"root": "s3://b/tl", "journal_dir": "/j"}})
        assert any(f"base_model {base!r} is a folder of this machine" in p for p in manifests.cluster_problems(cfg))
    for base in ("sentence-transformers/all-MiniLM-L6-v2", "/app/models/minilm"):  # the hub's, the image's
        cfg = parse_config({"models": [{"name": "m", "base_model": base, "labels": ["a", "b"]}],
                            "storage": {"root": "s3://b/tl", "journal_dir": "/j"}})
        assert manifests.cluster_problems(cfg) == []


@pytest.mark.parametrize(("serving", "workers", "expected"), [
    ({}, {}, 21),  # 1 CPU a replica, 7 CPUs a worker, 4 workers, one of them the retrain's
    ({"num_cpus_per_replica": 2, "num_gpus_per_replica": 0.5}, {"gpus_per_worker": 1}, 6),  # 2 a GPU
    ({"num_cpus_per_replica": 1, "num_gpus_per_replica": 1}, {"gpus_per_worker": 2, "max_workers": 3}, 4),
    ({"autoscaling": {"min_replicas": 20}}, {}, 21),  # a minimum within the room (past it: refused, below)
    (None, {}, 21),  # every key of a section commented out: YAML's null
    ({"autoscaling": None}, {}, 21),
])
def test_left_out_max_replicas_becomes_what_the_workers_hold(serving, workers, expected):
    doc = {"models": [{"name": "m", "base_model": "b", "labels": ["a", "b"]}], "storage": {"root": "s3://b/tl", "journal_dir": "/j"},
           "serving": serving, "deploy": {"workers": workers}}
    inside = parse_config(manifests.cluster_config_doc(doc, parse_config(doc)))
    assert inside.serving.autoscaling.max_replicas == expected


def test_several_models_share_the_replicas_the_workers_hold():
    """Each model's ceiling was all the room: three models scaled to three times what the
    workers hold beside a retrain, which then waited until it failed."""
    models = [{"name": n, "base_model": "b", "labels": ["a", "b"]} for n in ("m1", "m2", "m3")]
    doc = {"models": models, "storage": {"root": "s3://b/tl", "journal_dir": "/j"},
           "serving": {"num_cpus_per_replica": 2, "num_gpus_per_replica": 0.5}, "training": {"use_gpu": True},
           "deploy": {"workers": {"gpus_per_worker": 1}}}
    inside = parse_config(manifests.cluster_config_doc(doc, parse_config(doc)))
    assert inside.serving.autoscaling.max_replicas == 1  # 4 replicas beside the 2-node retrain, for 3 models
    doc["serving"]["autoscaling"] = {"max_replicas": 2}
    with pytest.raises(manifests.NotClusterable, match="3 models' 2 replicas each"):
        manifests.cluster_config_doc(doc, parse_config(doc))
    doc["serving"]["autoscaling"] = {"min_replicas": 5}  # always on, past the room
    with pytest.raises(manifests.NotClusterable, match=r"3 models' 5 replicas each \(serving.autoscaling.min_replicas"):
        manifests.cluster_config_doc(doc, parse_config(doc))
    # Five models, max_replicas left out: one replica each is more than the 4 the room holds.
    doc["models"] = [{"name": f"m{i}", "base_model": "b", "labels": ["a", "b"]} for i in range(5)]
    doc["serving"]["autoscaling"] = {}
    with pytest.raises(manifests.NotClusterable, match=r"5 models' 1 replicas each \(serving.autoscaling.min_replicas"):
        manifests.cluster_config_doc(doc, parse_config(doc))


@pytest.mark.parametrize(("sections", "message"), [
    ({"serving": {"num_gpus_per_replica": 1}, "deploy": {"workers": {"gpus_per_worker": 0}}},
     "serving.num_gpus_per_replica is 1 but a worker node has 0 (deploy.workers.gpus_per_worker)"),
    ({"serving": {"num_cpus_per_replica": 16}}, "serving.num_cpus_per_replica is 16 but a worker node has 7"),
    ({"training": {"use_gpu": True}, "deploy": {"workers": {"gpus_per_worker": 0}}},
     "training.gpus_per_worker is 1 but a worker node has 0"),
    ({"training": {"cpus_per_worker": 12}}, "training.cpus_per_worker is 12 but a worker node has 7"),
    ({"serving": {"resources_per_replica": {"serving-node": 1}}},
     "serving.resources_per_replica asks for {'serving-node': 1.0}, which no rendered node offers"),
    ({"training": {"resources_per_worker": {"trainer": 1}}}, "training.resources_per_worker asks for"),
    # 8 replicas of half a GPU fill the 4 one-GPU nodes: a GPU retrain (2 workers) waited until it failed.
    ({"serving": {"num_cpus_per_replica": 2, "num_gpus_per_replica": 0.5, "autoscaling": {"max_replicas": 8}},
      "training": {"use_gpu": True}},
     "a model's 8 replicas (serving.autoscaling.max_replicas) and the largest retraining job (2 worker node(s)) "
     "need more than deploy.workers.max_workers 4 nodes hold (4 replicas beside the job)"),
])
def test_what_no_rendered_worker_node_can_hold_is_refused(sections, message):
    doc = {"models": [{"name": "m", "base_model": "b", "labels": ["a", "b"]}],
           "storage": {"root": "s3://b/tl", "journal_dir": "/j"}, **sections}
    with pytest.raises(manifests.NotClusterable) as refused:
        manifests.cluster_config_doc(doc, parse_config(doc))
    assert message in str(refused.value)


def test_what_no_node_holds_is_blamed_on_the_section_that_set_it():
    """A model overriding only its epochs was blamed for the top level's cpus_per_worker too,
    under a key (models.intent.training.cpus_per_worker) the config never had."""
    doc = {"models": [{"name": "m", "base_model": "b", "labels": ["a", "b"]},
                      {"name": "intent", "base_model": "b", "labels": ["a", "b"], "training": {"epochs": 10}},
                      {"name": "big", "base_model": "b", "labels": ["a", "b"], "training": {"cpus_per_worker": 9}}],
           "storage": {"root": "s3://b/tl", "journal_dir": "/j"}, "training": {"cpus_per_worker": 8}}
    with pytest.raises(manifests.NotClusterable) as refused:
        manifests.cluster_config_doc(doc, parse_config(doc))
    said = str(refused.value)
    assert said.count("training.cpus_per_worker is 8 but a worker node has 7") == 1
    assert "models.intent.training" not in said
    assert "models.big.training.cpus_per_worker is 9 but a worker node has 7" in said


def test_an_aws_cluster_on_a_bucket_needs_the_workers_instance_profile():
    """The launcher gives the head an instance profile, never the workers: they could not
    read a version or write a checkpoint."""
    doc = {"models": [{"name": "m", "base_model": "b", "labels": ["a", "b"]}],
           "storage": {"root": "s3://b/tl", "journal_dir": "/j"}}
    with pytest.raises(manifests.NotClusterable, match="deploy.aws.worker_instance_profile_arn"):
        launcher_yaml.launcher(parse_config(doc), "aws")
    doc["deploy"] = {"aws": {"worker_instance_profile_arn": "arn:aws:iam::1:instance-profile/w",
                             "head_instance_profile_arn": "arn:aws:iam::1:instance-profile/h"}}  # may pass the workers' role
    nodes = launcher_yaml.launcher(parse_config(doc), "aws")["available_node_types"]
    assert nodes["gpu_worker"]["node_config"]["IamInstanceProfile"] == {"Arn": "arn:aws:iam::1:instance-profile/w"}
    assert nodes["head"]["node_config"]["IamInstanceProfile"] == {"Arn": "arn:aws:iam::1:instance-profile/h"}
    assert "ImageId" not in nodes["head"]["node_config"]  # Ray's default AMI, unless named
    doc["deploy"]["aws"]["image_id"] = "ami-0123456789abcdef0"
    nodes = launcher_yaml.launcher(parse_config(doc), "aws")["available_node_types"]
    assert {n["node_config"]["ImageId"] for n in nodes.values()} == {"ami-0123456789abcdef0"}


def test_a_launcher_cluster_is_refused_what_its_nodes_cannot_reach_or_launch():
    """A gcp cluster on an s3:// root (or aws on gs://) rendered, and no node had credentials
    for the bucket; workers with an instance profile beside a head without one rendered, and
    Ray's default head role, without iam:PassRole, could launch none of them."""
    doc = {"models": [{"name": "m", "base_model": "b", "labels": ["a", "b"], "seed_dataset": "s3://b/seed.tsv"}],
           "storage": {"root": "gs://b/tl", "journal_dir": "/j"}}
    with pytest.raises(manifests.NotClusterable, match=r"models.m.seed_dataset 's3://b/seed.tsv' on another cloud "
                                                       r"than gcp.*use gs:// paths"):
        launcher_yaml.launcher(parse_config(doc, clients_here=False), "gcp")
    with pytest.raises(manifests.NotClusterable, match=r"storage.root 'gs://b/tl' on another cloud than aws"):
        launcher_yaml.launcher(parse_config(doc, clients_here=False), "aws")
    doc["models"][0]["seed_dataset"] = "gs://b/seed.tsv"
    gcp = launcher_yaml.launcher(parse_config(doc, clients_here=False), "gcp")["available_node_types"]
    assert gcp["gpu_worker"]["node_config"]["scheduling"] == {  # an object, as GCE takes it
        "onHostMaintenance": "TERMINATE", "preemptible": True, "automaticRestart": False}
    assert gcp["head"]["node_config"]["scheduling"]["automaticRestart"] is True
    doc = {"models": [{"name": "m", "base_model": "b", "labels": ["a", "b"]}],
           "storage": {"root": "s3://b/tl", "journal_dir": "/j"},
           "deploy": {"aws": {"worker_instance_profile_arn": "arn:aws:iam::1:instance-profile/w"}}}
    with pytest.raises(manifests.NotClusterable, match="needs deploy.aws.head_instance_profile_arn too"):
        launcher_yaml.launcher(parse_config(doc), "aws")


def test_a_gpu_count_the_instance_type_lacks_is_refused_and_mounts_keep_clear_of_the_image():
    """gpus_per_worker 2 beside the default one-GPU instance rendered a cluster GCP refused
    (acceleratorCount) and AWS workers declaring a GPU they lacked; a zone outside the region
    failed at `ray up`; a volume at /app hid tuneloop's code from every pod."""
    from tuneloop.core.config import ConfigError

    doc = {"models": [{"name": "m", "base_model": "b", "labels": ["a", "b"]}],
           "storage": {"root": "s3://b/tl", "journal_dir": "/j"},
           "deploy": {"workers": {"gpus_per_worker": 2}, "aws": {"worker_instance_profile_arn": "arn:aws:iam::1:instance-profile/w"}}}
    on_gcs = {**doc, "storage": {"root": "gs://b/tl", "journal_dir": "/j"}}
    for cloud, instance, d in [("gcp", "g2-standard-8", on_gcs), ("aws", "g5.2xlarge", doc)]:
        with pytest.raises(manifests.NotClusterable, match=f"gpus_per_worker is 2, but a {instance} has 1"):
            launcher_yaml.launcher(parse_config(d, clients_here=False), cloud)
    on_gcs["deploy"]["gcp"] = {"worker_instance": "g2-standard-24"}
    gcp = launcher_yaml.launcher(parse_config(on_gcs, clients_here=False), "gcp")
    assert gcp["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 2
    on_gcs["deploy"]["gcp"] = {"worker_instance": "custom-gpu-box"}  # a type not in the table: taken as said
    assert launcher_yaml.launcher(parse_config(on_gcs, clients_here=False), "gcp")
    for deploy, message in [({"gcp": {"region": "europe-west4"}}, "zone 'us-central1-a' is not in region"),
                            ({"config_dir": "/app"}, "mounted over the image's /app"),
                            ({"journal_dir": "/var"}, "mounted over the image's /var/lib/dpkg"),
                            ({"config_dir": "/usr/local"}, "mounted over the image's /usr"),  # its Python
                            ({"config_dir": "//app"}, "mounted over the image's /app"),
                            ({"config_dir": "/etc/ssl"}, "mounted over the image's /etc/ssl")]:
        with pytest.raises(ConfigError, match=message):
            parse_config({**doc, "deploy": deploy})


def test_a_models_own_training_settings_are_checked_against_the_nodes_too():
    doc = {"models": [{"name": "m", "base_model": "b", "labels": ["a", "b"], "training": {"cpus_per_worker": 9}}],
           "storage": {"root": "s3://b/tl", "journal_dir": "/j"}}
    with pytest.raises(manifests.NotClusterable, match="models.m.training.cpus_per_worker is 9"):
        manifests.cluster_config_doc(doc, parse_config(doc))


@pytest.mark.parametrize("model", ["intent_v2", "m" * 64, "a-" * 20 + "b"])
def test_a_rayjob_is_named_as_kuberay_takes_whatever_the_model_is_called(tmp_path, model):
    import re

    doc = {"models": [{"name": model, "base_model": "b", "labels": ["a", "b"]}],
           "storage": {"root": "s3://bucket/tl", "journal_dir": "/j"}, "deploy": {"name": "n" * 40}}
    cfg = parse_config(doc)
    operate.render(cfg, doc, "kuberay", tmp_path)
    (job,) = yaml.safe_load_all((tmp_path / f"rayjob-{model}.yaml").read_text())
    name = job["metadata"]["name"]
    assert len(name) <= 47 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name
    assert name != manifests.rayjob_name(cfg, model[:-1] + "z")  # shortened names stay apart
    steps = [step.argv for step in operate.plan(cfg, "kuberay", "retrain", tmp_path, model)]
    assert f"get rayjob {name} " in steps[0][2]  # first: a job of that name still running stops the retrain
    assert ["kubectl", "-n", "default", "delete", "rayjob", name, "--ignore-not-found"] in steps


def test_a_config_without_a_deploy_section_renders_with_the_defaults(tmp_path):
    doc = {"models": [{"name": "intent", "base_model": "b", "labels": ["a", "b"]}],
           "storage": {"root": "s3://bucket/tl", "journal_dir": "/j"}}
    files = operate.render(parse_config(doc), doc, "kuberay", tmp_path)
    assert sorted(p.name for p in files) == ["config.yaml", "podmonitor.yaml", "rayjob-intent.yaml", "rayservice.yaml"]
    for path in files:
        for manifest in yaml.safe_load_all(path.read_text()):
            _validate_k8s(manifest)


def test_every_pod_runs_as_the_configured_service_account(tmp_path):
    """Bucket access through IRSA or GKE Workload Identity, without keys in the Secret."""
    doc = {"models": [{"name": "intent", "base_model": "b", "labels": ["a", "b"]}],
           "storage": {"root": "s3://bucket/tl", "journal_dir": "/j"}, "deploy": {"service_account": "tuneloop-s3"}}
    files = operate.render(parse_config(doc), doc, "kuberay", tmp_path)
    pods = []
    for path in files:
        for manifest in yaml.safe_load_all(path.read_text()):
            _validate_k8s(manifest)
            spec = manifest.get("spec", {})
            cluster = spec.get("rayClusterConfig") or spec.get("rayClusterSpec")
            if cluster:
                pods += [g["template"]["spec"] for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]]
    assert len(pods) == 4 and all(pod["serviceAccountName"] == "tuneloop-s3" for pod in pods)
    with pytest.raises(ValueError, match="service_account"):
        parse_config({**doc, "deploy": {"service_account": "Not_A_Name"}})


def _parses(argv: list[str]) -> None:
    """Parse (not run) a `ray …` or `serve …` command line with Ray's own click CLIs."""
    import click
    from ray.scripts.scripts import cli as ray_cli
    from ray.serve.scripts import cli as serve_cli

    command, args = {"ray": ray_cli, "serve": serve_cli}[argv[0]], argv[1:]
    name = argv[0]
    while isinstance(command, click.Group):
        name, args = args[0], args[1:]
        command = command.get_command(click.Context(command), name)
        assert command is not None, f"no command {name!r} in {shlex.join(argv)}"
    command.make_context(name, list(args))


@pytest.mark.parametrize("target", operate.TARGETS)
def test_every_dry_run_prints_commands_that_parse_and_files_that_exist(target, tmp_path):
    cfg, _ = _example()
    example = EXAMPLE
    if target == "gcp":  # on GCS, as `make deploy-files` renders it (no google-cloud-storage needed here)
        example = tmp_path / "gcp.yaml"
        example.write_text(EXAMPLE.read_text().replace("s3://", "gs://"))
        cfg = parse_config(yaml.safe_load(example.read_text()), base_dir=tmp_path, clients_here=False)
    runner = CliRunner()
    for verb, model in [("up", None), ("deploy", None), ("status", None), ("retrain", "sentiment"), ("logs", None),
                        ("down", None)]:
        result = runner.invoke(app, ["deploy", verb, *([model] if model else []), "--config", str(example),
                                     "--target", target, "--dir", str(tmp_path), "--dry-run"])
        assert result.exit_code == 0, result.output
        steps = operate.plan(cfg, target, verb, tmp_path, model)
        printed = [line[2:] for line in result.output.splitlines() if line.startswith("$ ")]
        assert steps and printed == [str(step) for step in steps]
        for step in steps:
            argv = step.argv
            if argv[0] == "kubectl":
                assert argv[:3] == ["kubectl", "-n", "tuneloop"], step
            elif argv[0] == "sh":  # a guard or probe around kubectl
                assert "kubectl" in argv[2], step
            else:
                _parses(argv)
                if argv[:2] == ["ray", "exec"]:  # the command it runs on the head
                    inner = shlex.split(argv[3])
                    if inner[0] in ("ray", "serve"):
                        _parses(inner)
                    for arg in inner:  # files on the nodes: the rendered etc/, mounted at deploy.config_dir
                        if arg.startswith(cfg.deploy.config_dir + "/"):
                            assert Path(step.cwd, manifests.LAUNCHER_ETC, Path(arg).name).exists(), step
            for arg in argv:
                if arg.endswith(".yaml") and " " not in arg:
                    assert Path(step.cwd or ".", arg).exists(), f"{step} names {arg}, which was not rendered"
    rollout = runner.invoke(app, ["deploy", "rollout", "sentiment", "v2", "--config", str(EXAMPLE), "--dry-run"])
    assert rollout.exit_code == 0 and "promote v2 of sentiment in s3://my-tuneloop-bucket/tuneloop" in rollout.output
    assert "# not checked against the registry" in rollout.output  # the example's bucket: out of reach here


def test_rendering_without_a_folder_writes_under_dot_tuneloop_never_over_the_examples(tmp_path, monkeypatch):
    """An operator renders their own config from the clone: the committed examples under
    deploy/ must stay the example's (a test compares them), so the default is git-ignored."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "deploy" / "kuberay").mkdir(parents=True)
    result = CliRunner().invoke(app, ["deploy", "up", "--config", str(EXAMPLE), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / ".tuneloop/deploy/kuberay/rayservice.yaml").exists()
    assert not any((tmp_path / "deploy" / "kuberay").iterdir())
    assert "kubectl -n tuneloop apply -f .tuneloop/deploy/kuberay/config.yaml" in result.output


def test_a_fixed_replica_count_renders_a_config_the_cluster_accepts():
    doc = {"models": [{"name": "m", "base_model": "b", "labels": ["a", "b"]}],
           "storage": {"root": "s3://b/tl", "journal_dir": "/j"}, "serving": {"num_replicas": 2}}
    inside = parse_config(manifests.cluster_config_doc(doc, parse_config(doc)))
    assert inside.serving.num_replicas == 2


@pytest.mark.parametrize("answers, done", [
    (["2/1/", "2/2/True", "2/2/False"], True),  # the spec read, a new cluster starting, then switched
    (["", "3/3/"], True),  # kubectl failed once (no answer is no "done"); a KubeRay without the condition
    (["2/1/", "2/1/", "2/1/"], False),  # never read: gives up, saying so
])
def test_deploy_waits_until_kuberay_has_read_the_spec_and_no_upgrade_is_in_progress(tmp_path, answers, done):
    """The RayService stays Ready while a NewCluster upgrade starts its second cluster, so
    waiting on Ready alone returned before the new config served anything."""
    states = tmp_path / "states"
    states.write_text("".join(a + "\n" for a in answers))
    kubectl = tmp_path / "kubectl"  # stands in for the cluster: prints the next state, one per call
    kubectl.write_text(f'#!/bin/sh\nline=$(head -n 1 "{states}"); sed -i 1d "{states}"\n'
                       '[ -n "$line" ] || exit 1\nprintf %s "$line"\n')
    kubectl.chmod(0o755)
    script = operate.wait_for_the_upgrade(str(kubectl), "svc", poll_s=0, tries=len(answers))
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert (result.returncode == 0) is done, result.stderr
    assert states.read_text() == ""  # asked once per try, and stopped at the first done
    if not done:
        assert "rayservice svc: upgrade not done after 0 s" in result.stderr
    cfg, _ = _example()
    steps = [" ".join(step.argv) for step in operate.plan(cfg, "kuberay", "deploy", tmp_path)]
    assert any("UpgradeInProgress" in step for step in steps) and "wait --for=condition=Ready" in steps[-1]


@pytest.mark.parametrize("ready_at", [3, None])
def test_waiting_for_ready_says_how_the_pods_stand_between_tries(tmp_path, ready_at):
    """`kubectl wait --timeout=30m` said nothing for up to 30 minutes while nodes joined."""
    import subprocess

    tries = tmp_path / "tries"
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(f'#!/bin/sh\ncase "$1" in\n  wait) echo x >> "{tries}"; n=$(wc -l < "{tries}"); '
                       f'[ "$n" -ge "{ready_at or 99}" ];;\n  get) echo "head-0 0/1 Pending 0 1m"; '
                       'echo "worker-0 1/1 Running 0 1m";;\nesac\n')
    kubectl.chmod(0o755)
    result = subprocess.run(["sh", "-c", operate.wait_until_ready(str(kubectl), "svc", poll_s=0, tries=4)],
                            capture_output=True, text=True, timeout=30)
    assert (result.returncode == 0) is (ready_at is not None), result.stderr
    assert re.search(r"rayservice svc: not Ready after \d+ s \(try 1 of 4\); pods: head-0=Pending worker-0=Running",
                     result.stderr), result.stderr
    assert len(tries.read_text().split()) == (ready_at or 4)
    if ready_at:
        assert "rayservice svc is Ready" in result.stdout
    else:
        assert re.search(r"not Ready after \d+ s \(kubectl describe rayservice svc\)", result.stderr)
    assert "kubectl: " not in result.stderr  # a wait that timed out (here: said nothing) is no error
    failing = tmp_path / "kubectl-failing"
    failing.write_text('#!/bin/sh\necho "error: the server doesn\x27t have a resource type rayservice" >&2; exit 1\n')
    failing.chmod(0o755)
    result = subprocess.run(["sh", "-c", operate.wait_until_ready(str(failing), "svc", poll_s=0, tries=2)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "kubectl: error: the server doesn't have a resource type rayservice" in result.stderr


def test_podmonitors_carry_the_labels_a_prometheus_selects_on():
    """A stock kube-prometheus-stack selects PodMonitors labelled release: <its release>, and
    ignored tuneloop's silently: no series, and only TuneloopDown to say so."""
    doc = {"models": [{"name": "m", "base_model": "b", "labels": ["a", "b"]}],
           "storage": {"root": "s3://b/tl", "journal_dir": "/j"},
           "deploy": {"monitor_labels": {"release": "kube-prometheus-stack"}}}
    cfg = parse_config(doc)
    monitors = [d for d in manifests.kuberay(cfg, doc)["podmonitor.yaml"] if d["kind"] == "PodMonitor"]
    assert len(monitors) == 2
    for monitor in monitors:
        labels = monitor["metadata"]["labels"]
        assert labels["release"] == "kube-prometheus-stack" and labels["app.kubernetes.io/part-of"] == "tuneloop"


def _pods(files) -> list[dict]:
    """Every pod template of the rendered KubeRay files: Ray's heads and workers, and the
    RayJobs' submitters."""
    pods = []
    for path in files:
        for manifest in yaml.safe_load_all(path.read_text()):
            spec = manifest.get("spec", {})
            cluster = spec.get("rayClusterConfig") or spec.get("rayClusterSpec")
            if cluster:
                pods += [g["template"] for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]]
            if "submitterPodTemplate" in spec:
                pods.append(spec["submitterPodTemplate"])
    return pods


def test_no_container_runs_as_root_and_ray_answers_only_the_deployment(tmp_path):
    doc = {"models": [{"name": "intent", "base_model": "b", "labels": ["a", "b"]}],
           "storage": {"root": "s3://bucket/tl", "journal_dir": "/j"}}
    files = operate.render(parse_config(doc), doc, "kuberay", tmp_path)
    pods = _pods(files)
    assert len(pods) == 5  # the RayService's head and workers, the RayJob's, its submitter
    for pod in pods:
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert pod["spec"]["securityContext"]["runAsUser"] == pod["spec"]["securityContext"]["fsGroup"] == 1000
        (container,) = pod["spec"]["containers"]
        assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["USER"] == "tuneloop" and env["HOME"]  # getpass and the caches, for a uid /etc/passwd may lack
    policy = next(m for m in yaml.safe_load_all((tmp_path / "config.yaml").read_text()) if m["kind"] == "NetworkPolicy")
    _validate_k8s(policy)
    selected = policy["spec"]["podSelector"]["matchLabels"]
    # It selects every pod rendered, the submitters included (they reach a job's dashboard as the deployment's).
    assert all(selected.items() <= pod["metadata"]["labels"].items() for pod in pods)
    among_us, anyone, operator = policy["spec"]["ingress"]
    assert among_us == {"from": [{"podSelector": policy["spec"]["podSelector"]}]} and "ports" not in among_us
    assert "from" not in anyone and {p["port"] for p in anyone["ports"]} == {manifests.SERVE_PORT, manifests.METRICS_PORT}
    assert operator["ports"] == [{"protocol": "TCP", "port": manifests.DASHBOARD_PORT}]
    assert {"app.kubernetes.io/name": "kuberay-operator"} in [p["podSelector"]["matchLabels"] for p in operator["from"]]
    assert all(p["namespaceSelector"] == {} for p in operator["from"])  # no namespace given: any
    assert all(pod["spec"]["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch" for pod in pods)
    service = yaml.safe_load((tmp_path / "rayservice.yaml").read_text())
    autoscaler = service["spec"]["rayClusterConfig"]["autoscalerOptions"]  # the sidecar KubeRay adds to the head
    assert autoscaler["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    # With the operator's namespace, only its pods there: labels alone can be worn by any pod.
    pinned = {**doc, "deploy": {"network_policy": {"operator_namespace": "kuberay-system"}}}
    operate.render(parse_config(pinned), pinned, "kuberay", tmp_path / "pinned")
    policy = next(m for m in yaml.safe_load_all((tmp_path / "pinned" / "config.yaml").read_text())
                  if m["kind"] == "NetworkPolicy")
    _validate_k8s(policy)
    assert all(p["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}}
               for p in policy["spec"]["ingress"][2]["from"])
    # `deploy down` removes it with the rest.
    down = operate.plan(parse_config(doc), "kuberay", "down", tmp_path)
    assert any("networkpolicy" in ",".join(step.argv) for step in down)

    # Turned off: the image's own user and no policy, as before.
    off = {**doc, "deploy": {"run_as_user": None, "network_policy": {"enabled": False}}}
    files = operate.render(parse_config(off), off, "kuberay", tmp_path / "off")
    assert all("securityContext" not in pod["spec"] for pod in _pods(files))
    assert "NetworkPolicy" not in (tmp_path / "off" / "config.yaml").read_text()
    for bad, message in [({"run_as_user": 0}, "run_as_user"),
                         ({"network_policy": {"operator_labels": [{}]}}, "selects every pod")]:
        with pytest.raises(ValueError, match=message):
            parse_config({**doc, "deploy": bad})


@pytest.mark.parametrize("name", ["9lives", "-x", "x-", "Tuneloop", "tune_loop"])
def test_a_deploy_name_kuberay_would_refuse_is_refused_by_the_config(name):
    """A name starting with a digit passed the check, and the cluster refused its RayService,
    RayJob and Services (DNS-1035: a letter first) at `deploy up`."""
    with pytest.raises(ValueError, match=rf"deploy.name: .*\(got '{name}'\)"):
        parse_config({"models": [{"name": "m", "base_model": "b", "labels": ["a", "b"]}], "deploy": {"name": name}})
    assert parse_config({"models": [{"name": "m", "base_model": "b", "labels": ["a", "b"]}],
                         "deploy": {"name": "lives9-a"}}).deploy.name == "lives9-a"
