"""`tuneloop deploy`: one command for operators of a GPU cluster.

Every verb first renders the cluster's files from the config (``manifests.py``), so what is
applied is what the config says; then runs ``kubectl`` (KubeRay) or ``ray`` (the cluster
launcher on AWS or GCP). ``--dry-run`` renders the files, prints their paths and exactly the commands, and runs
nothing. ``status`` and ``rollout`` also read and change the registry in the storage root
directly: the operator's machine reaches the same bucket as the cluster.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from tuneloop.control import launcher_yaml, manifests
from tuneloop.core.config import TuneloopConfig

TARGETS = ("kuberay", "aws", "gcp")
# A target's folder under a root: deploy/ for the example files (`make deploy-files`), and by
# default .tuneloop/deploy/ (git-ignored), so that rendering an operator's own config never
# overwrites the committed examples.
FOLDERS = {"kuberay": "kuberay", "aws": "launcher/aws", "gcp": "launcher/gcp", "serve": "serve"}
DEFAULT_ROOT = ".tuneloop/deploy"
SERVE_LOGS = "tail -n 200 /tmp/ray/session_latest/logs/serve/*.log"


@dataclass(frozen=True)
class Step:
    """One command. ``only_if``: a probe run first; where it fails the step is skipped (what
    a cluster may lack, such as the Prometheus Operator's PodMonitor kind)."""
    argv: list[str]
    cwd: str | None = None
    only_if: list[str] | None = None

    def __str__(self) -> str:
        line = f"(cd {shlex.quote(self.cwd)} && {shlex.join(self.argv)})" if self.cwd else shlex.join(self.argv)
        return f"{line}  # only if `{shlex.join(self.only_if)}` succeeds" if self.only_if else line


def render(cfg: TuneloopConfig, doc: dict[str, Any], target: str, out: Path) -> list[Path]:
    """Write ``target``'s files into ``out``; returns them."""
    files: dict[str, Any]
    if target == "kuberay":
        files = {name: docs for name, docs in manifests.kuberay(cfg, doc).items()}
    elif target in ("aws", "gcp"):
        cluster_doc = manifests.cluster_config_doc(doc, cfg)
        etc = manifests.LAUNCHER_ETC
        files = {"cluster.yaml": [launcher_yaml.launcher(cfg, target)], f"{etc}/{manifests.CONFIG_FILE}": [cluster_doc],
                 f"{etc}/{manifests.SERVE_FILE}": [manifests.serve_config(cfg, f"{cfg.deploy.config_dir}/"
                                                                               f"{manifests.CONFIG_FILE}")]}
    elif target == "serve":
        files = {manifests.SERVE_FILE: [manifests.serve_config(cfg, f"{cfg.deploy.config_dir}/{manifests.CONFIG_FILE}")]}
    else:
        raise ValueError(f"unknown target {target!r}; choose one of {[*TARGETS, 'serve']}")
    written = []
    for name, docs in files.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        header = f"# Rendered by `tuneloop deploy render --target {target}` from the tuneloop config: edit that, not this.\n"
        path.write_text(header + manifests.dump_all(docs))
        written.append(path)
    return written


# Exits 1 naming the job while a RayJob of that name is still at work (KubeRay's deployment
# status); a finished, failed or absent one lets the retrain go on.
_REFUSE_A_RUNNING_JOB = (
    'status=$({k} get rayjob {job} -o jsonpath="{{.status.jobDeploymentStatus}}" 2>/dev/null); '
    'case "$status" in Initializing|Waiting|Running|Retrying|Suspending) '
    'echo "rayjob {job} is still $status: wait for it (tuneloop deploy status)" >&2; exit 1;; esac')

# A NewCluster upgrade serves from the old cluster while the new one starts (minutes): the
# RayService stays Ready throughout, so `kubectl wait --for=condition=Ready` returned at once.
# Done is KubeRay having read the applied spec (observedGeneration) with no UpgradeInProgress
# condition True (KubeRay >= 1.3); an in-place Serve update then waits on Ready below.
_WAIT_FOR_THE_UPGRADE = (
    'i=0; while [ $i -lt {tries} ]; do '
    's=$({k} get rayservice {name} -o jsonpath=\'{{.metadata.generation}}/{{.status.observedGeneration}}/'
    '{{.status.conditions[?(@.type=="UpgradeInProgress")].status}}\') || s=; '  # unreachable: ask again
    'case "$s" in ""|*/*/True) ;; *) g=${{s%%/*}}; r=${{s#*/}}; [ "$g" = "${{r%%/*}}" ] && exit 0;; esac; '
    'if [ $((i % 12)) = 0 ]; then echo "rayservice {name}: waiting for the upgrade (generation/seen/upgrading: $s)" >&2; fi; '
    'i=$((i + 1)); sleep {poll_s}; done; '
    'echo "rayservice {name}: upgrade not done after $((i * {poll_s})) s (kubectl describe rayservice {name})" >&2; exit 1')


# `kubectl wait --for=condition=Ready` for 30 minutes said nothing while GPU nodes joined and
# images were pulled: waited for a minute at a time, with a line of the pods' phases between,
# and kubectl's own error when it failed for another reason than the wait (no cluster, RBAC).
_WAIT_FOR_READY = (
    'start=$(date +%s); i=0; while [ $i -lt {tries} ]; do '
    'out=$({k} wait --for=condition=Ready rayservice/{name} --timeout={poll_s}s 2>&1) '
    '&& {{ echo "rayservice {name} is Ready"; exit 0; }}; '
    'i=$((i + 1)); '
    'case "$out" in ""|*"timed out"*) ;; *) echo "kubectl: $out" >&2; sleep {poll_s};; esac; '
    'echo "rayservice {name}: not Ready after $(($(date +%s) - start)) s (try $i of {tries}); pods:" '
    '$({k} get pods -l app.kubernetes.io/instance={name} --no-headers 2>/dev/null | awk \'{{printf "%s=%s ", $1, $3}}\') >&2; '
    'done; echo "rayservice {name}: not Ready after $(($(date +%s) - start)) s (kubectl describe rayservice {name})" >&2; '
    'exit 1')


def wait_until_ready(kubectl: str, name: str, poll_s: int = 60, tries: int = 30) -> str:
    """The shell loop that waits (``tries`` x ``poll_s``: 30 minutes) for ``name`` to be Ready,
    saying how it stands every ``poll_s``."""
    return _WAIT_FOR_READY.format(k=kubectl, name=name, poll_s=poll_s, tries=tries)


def wait_for_the_upgrade(kubectl: str, name: str, poll_s: int = 5, tries: int = 360) -> str:
    """The shell loop that waits (``tries`` x ``poll_s``: 30 minutes) for ``name``'s upgrade."""
    return _WAIT_FOR_THE_UPGRADE.format(k=kubectl, name=name, poll_s=poll_s, tries=tries)


def plan(cfg: TuneloopConfig, target: str, verb: str, folder: Path, model: str | None = None) -> list[Step]:
    """The commands ``verb`` runs, in order (``status`` and ``rollout`` add work of their own)."""
    d = cfg.deploy
    if target == "kuberay":
        k = ["kubectl", "-n", d.namespace]
        head = f"svc/{d.name}-head-svc"
        job = manifests.rayjob_name(cfg, model) if model else ""
        files = {name: str(folder / name) for name in ("config.yaml", "rayservice.yaml", "podmonitor.yaml")}
        # The Prometheus Operator is optional: without its PodMonitor kind, kubectl refuses
        # the file (--ignore-not-found does not cover an unknown kind), and up or down would
        # stop there.
        # api-resources: any logged-in user may list kinds (reading CRDs needs cluster rights).
        has_podmonitor = ["sh", "-c", "kubectl api-resources --api-group=monitoring.coreos.com -o name "
                                      "| grep -q '^podmonitors'"]
        steps = {
            "up": [Step([*k, "apply", "-f", files["config.yaml"]]), Step([*k, "apply", "-f", files["rayservice.yaml"]]),
                   Step([*k, "apply", "-f", files["podmonitor.yaml"]], only_if=has_podmonitor),
                   Step(["sh", "-c", wait_until_ready(shlex.join(k), d.name)])],
            "deploy": [Step([*k, "apply", "-f", files["config.yaml"]]), Step([*k, "apply", "-f", files["rayservice.yaml"]]),
                       Step(["sh", "-c", wait_for_the_upgrade(shlex.join(k), d.name)]),
                       Step(["sh", "-c", wait_until_ready(shlex.join(k), d.name)])],
            "status": [Step([*k, "get", "rayservice", d.name, "-o", "wide"]),
                       Step([*k, "get", "pods", "-l", f"app.kubernetes.io/instance={d.name}", "-o", "wide"]),
                       Step([*k, "exec", head, "--", "serve", "status"])],
            "rollout": [],
            # The job mounts the ConfigMap named after the config's content: applied first, as
            # a config changed since `up` names one that is not there yet. A job of the same
            # name still running is left alone (deleting it killed a training run midway).
            "retrain": [Step(["sh", "-c", _REFUSE_A_RUNNING_JOB.format(k=shlex.join(k), job=job)]),
                        Step([*k, "apply", "-f", files["config.yaml"]]),
                        Step([*k, "delete", "rayjob", job, "--ignore-not-found"]),
                        Step([*k, "apply", "-f", str(folder / f"rayjob-{model}.yaml")])],
            "logs": [Step([*k, "logs", "-l",
                           f"app.kubernetes.io/instance={d.name},app.kubernetes.io/component={manifests.SERVING_HEAD}",
                           "--tail=200"]),
                     Step([*k, "exec", head, "--", "sh", "-c", SERVE_LOGS])],
            # The journal's volume is kept: unacknowledged nothing, but compacted-not-yet
            # feedback lives there. `kubectl delete pvc <name>-journal` once it is drained.
            "down": [Step([*k, "delete", "-f", files["podmonitor.yaml"], "--ignore-not-found"], only_if=has_podmonitor),
                     Step([*k, "delete", "-f", files["rayservice.yaml"], "--ignore-not-found"]),
                     # Retrain jobs, the ConfigMap each config change left (content-named), the
                     # NetworkPolicy.
                     Step([*k, "delete", "rayjob,configmap,networkpolicy", "-l",
                           f"app.kubernetes.io/instance={d.name},app.kubernetes.io/part-of=tuneloop",
                           "--ignore-not-found"])],
        }
    elif target in ("aws", "gcp"):
        here = str(folder)
        config_path = f"{d.config_dir}/{manifests.CONFIG_FILE}"

        def on_head(command: str) -> Step:
            return Step(["ray", "exec", "cluster.yaml", command], cwd=here)

        deploy_serve = on_head(f"serve deploy {d.config_dir}/{manifests.SERVE_FILE}")
        steps = {
            "up": [Step(["ray", "up", "-y", "cluster.yaml"], cwd=here), deploy_serve],
            "deploy": [Step(["ray", "up", "-y", "--no-restart", "cluster.yaml"], cwd=here), deploy_serve],
            "status": [on_head("serve status")],
            "rollout": [],
            "retrain": [on_head(shlex.join(["ray", "job", "submit", "--address", "http://127.0.0.1:8265", "--no-wait",
                                            "--", "python", "-m", "tuneloop.control", "train", str(model),
                                            "--config", config_path]))],
            "logs": [on_head(SERVE_LOGS)],
            "down": [Step(["ray", "down", "-y", "cluster.yaml"], cwd=here)],
        }
    else:
        raise ValueError(f"unknown target {target!r}; choose one of {list(TARGETS)}")
    if verb not in steps:
        raise ValueError(f"unknown verb {verb!r}; choose one of {sorted(steps)}")
    return steps[verb]


class StepFailed(RuntimeError):
    """A command a verb runs failed or is not installed: its message says which."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def run_steps(steps: list[Step], dry_run: bool, echo) -> None:
    for step in steps:
        echo(f"$ {step}")
        if dry_run:
            continue
        if step.only_if and not _succeeds(step.only_if, step.cwd):
            echo(f"  skipped: `{shlex.join(step.only_if)}` failed")
            continue
        try:
            subprocess.run([_beside_python(step.argv[0]), *step.argv[1:]], cwd=step.cwd, check=True)
        except FileNotFoundError:
            raise StepFailed(f"{step.argv[0]} is not installed (or not on PATH); it runs: {step}", 127) from None
        except subprocess.CalledProcessError as e:
            raise StepFailed(f"failed (exit {e.returncode}): {step}", e.returncode) from None


def _beside_python(program: str) -> str:
    """``ray`` (or ``serve``) installed beside this Python, where there is one: the README runs
    `.venv/bin/tuneloop` without activating the venv, and a `ray` from PATH was missing, or
    another Ray release than the image's."""
    beside = Path(sys.executable).parent / program
    return str(beside) if program in ("ray", "serve") and beside.is_file() else program


def _succeeds(argv: list[str], cwd: str | None) -> bool:
    try:
        return subprocess.run(argv, cwd=cwd, capture_output=True, timeout=60).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False


def model_status(cfg: TuneloopConfig) -> list[dict[str, Any]]:
    """Per model, from the storage root: production, the newest job, online accuracy (users'
    agreement with production on its predictions that got feedback) and the feedback
    arrived since production's training data was taken."""
    from tuneloop.core.feedback_stats import feedback_stats
    from tuneloop.core.tasks import model_tasks
    from tuneloop.store.jobs import JobStore
    from tuneloop.store.feedback_store import FeedbackStore
    from tuneloop.store.registry import Registry
    from tuneloop.store.storage import Storage, private_temp_dir

    storage = Storage(cfg.storage.root)
    registry, jobs = Registry(storage), JobStore(storage)
    # Compacted feedback only: the journal is the ingress's, on the cluster.
    tasks = model_tasks(cfg.models)
    feedback = FeedbackStore(storage, private_temp_dir("tuneloop-status-journal"), tasks)
    records = jobs.all(settle=False)  # a reader off the cluster: its clock must not mark live jobs lost
    rows = []
    for m in cfg.models:
        state = registry.state(m.name)
        production, r = state.production, state.rollout
        mark = registry.manifest(m.name, production).watermark() if production else None
        fresh = feedback.read_since(m.name, mark).to_pylist()
        online = feedback_stats(m.name, tasks[m.name], fresh)["by_version"].get(production or "")
        last = next((j for j in reversed(records) if j.model == m.name), None)
        rows.append({"model": m.name, "production": production or "-",
                     "rollout": (f"{r.version} {r.stage}" + (f" {r.percent:g}%" if r.stage == "canary" else "")
                                 + (" paused" if r.paused else "") + (" ALERT" if r.alerted else "")) if r else "-",
                     "job": f"{last.state} ({last.job_id[:8]}, {last.version or '-'})" if last else "-",
                     "online_accuracy": f"{online['online_accuracy']:.3f} of {online['feedback']}" if online else "-",
                     "feedback_since": len(fresh)})
    return rows
