"""The `tuneloop` command."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from datetime import datetime

import typer

from tuneloop.control.deploy_cli import deploy_app, known_model, stored_root
from tuneloop.core.config import ConfigError, TuneloopConfig, load_config
from tuneloop.core.log_lines import LOG_FORMAT

# Markdown: the docstrings' line breaks are not the help's (typer's default, rich markup, kept them,
# and every command's summary broke mid-sentence).
HELP_MARKUP = "markdown"
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=HELP_MARKUP,
                  help="Serve, collect feedback, fine-tune, roll out.")
ConfigOption = typer.Option(None, "--config", "-c", help="config file (default: $TUNELOOP_CONFIG or ./tuneloop.yaml)")


def _load(config: str | None) -> TuneloopConfig:
    try:
        return load_config(config)
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None


@app.command()
def run(config: str | None = ConfigOption) -> None:
    """Start Ray and serve every configured model (training v1 first where none exists)."""
    from tuneloop.control.server import run_forever

    run_forever(_load(config))


@app.command()
def train(
    model: str,
    config: str | None = ConfigOption,
    address: str | None = typer.Option(None, help="Ray address to join (default: a running `tuneloop run`, else a local Ray)"),
) -> None:
    """Fine-tune a new version of MODEL from its production (or, for the first, its base model)
    on the feedback new since then and a replay of earlier data, gate it, and hand it over as
    rollout.mode says (direct: production at once). A version the gate rejects exits 0 too;
    a failed job exits 1."""
    from tuneloop.core.config import ray_address_problem
    from tuneloop.store.jobs import JobStore
    from tuneloop.store.server_file import running_server_address
    from tuneloop.store.storage import Storage

    cfg = _load(config)
    known_model(cfg, model)
    if address and (problem := ray_address_problem(address)):
        typer.echo(f"--address: {problem}", err=True)
        raise typer.Exit(2)
    storage = Storage(cfg.storage.root)
    running = JobStore(storage).running(model)
    if running is not None and storage.is_local:
        # The lease a job holds dies with its process: free, that job was killed (its record
        # says running until its heartbeat is a minute old), and this one may start now.
        probe = storage.file_lock(f"jobs/{model}.lock", wait=False)
        if probe is not None:
            probe.release()
            running = None
    if running is not None:  # before Ray starts, and without a failed job record to alert on
        typer.echo(f"job {running.job_id} of {model} is running (started {running.created_at}): wait for it, "
                   f"or see `tuneloop jobs {model}`", err=True)
        raise typer.Exit(2)
    # In a Ray Job ($RAY_ADDRESS set) the job's cluster is the one to join.
    server = None if address or os.environ.get("RAY_ADDRESS") else running_server_address(storage)
    if server:
        # A local Ray started by `tuneloop run` uses token auth (Ray's default since 2.5x),
        # with the token in ~/.ray/auth_token; a joining driver opts in before anything
        # imports ray (control/server.py does).
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    from tuneloop.control.console_filter import LineFilter, worker_startup_warning
    from tuneloop.control.preflight import data_problems
    from tuneloop.control.server import init_ray

    problems = data_problems(cfg, [model], joins=address or server)
    if problems:
        typer.echo("cannot train:\n  " + "\n  ".join(problems), err=True)
        raise typer.Exit(2)
    if server:
        typer.echo(f"joining the Ray cluster of the running `tuneloop run` at {server}", err=True)
    from tuneloop.serving.optimize import optimize_version
    from tuneloop.training.launcher import run_training

    init_ray(cfg, address or server)
    # The job's handle to the ingress logs Serve's start-up of its router at info: not this command's news.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    # Ray's log monitor prints the workers' lines (the epochs, with their ETA) on this
    # process's stdout, and the lines it held back at its shutdown: to stderr, so that stdout
    # is the job's JSON alone (> job.json, jq).
    workers_lines = LineFilter(sys.stderr, worker_startup_warning)
    with contextlib.redirect_stdout(workers_lines):
        try:
            outcome = run_training(cfg, model, optimize=optimize_version)
        except KeyboardInterrupt:
            typer.echo("tuneloop train: interrupted; `tuneloop status` shows what the job had done", err=True)
            raise typer.Exit(130) from None
        finally:
            ray.shutdown()
            workers_lines.close_pending()
    if outcome.refused:  # another job took the model's lease after the check above
        typer.echo(f"{outcome.refused}; `tuneloop jobs {model}` lists it", err=True)
        raise typer.Exit(2)
    job = outcome.job
    typer.echo(json.dumps(job.model_dump(include={"job_id", "model", "state", "version", "promoted", "message",
                                                  "metrics", "error"}), indent=2))
    if outcome.manifest is not None and outcome.manifest.gate is not None:  # stdout stays one JSON document
        typer.echo(f"gate: {outcome.manifest.gate.reason}", err=True)
    raise typer.Exit(0 if job.state in ("succeeded", "rejected") else 1)


@app.command()
def versions(model: str, config: str | None = ConfigOption) -> None:
    """List MODEL's versions with their status and held-out accuracy (and the metric its
    gate compares, where that is another: entity F1 for token classification)."""
    from tuneloop.core.runtimes import serves_alone
    from tuneloop.core.tasks import model_task
    from tuneloop.store.registry import Registry

    cfg = _load(config)
    known_model(cfg, model)
    gated = model_task(cfg.model(model)).gate_metric
    registry = Registry(stored_root(cfg))
    production = registry.production(model)
    published = registry.versions(model)
    if not published:
        typer.echo(f"{model} has no versions yet: `tuneloop train {model}` makes one (`tuneloop run` makes v1 itself)")
    for m in published:
        scores = " ".join(f"{name}={getattr(m.metrics, name):.4f}" if m.metrics else f"{name}=-"
                          for name in dict.fromkeys(["accuracy", gated]))
        mark = "*" if m.version == production else " "
        artifacts = m.optimization.artifacts if m.optimization else {}
        # An artifact fit for lone texts only (serves_alone) is named so: replicas load it for them.
        passed = [r if a.parity.passed else f"{r}(alone)" for r, a in artifacts.items() if serves_alone(a)]
        teacher = f" teacher={m.distilled_from['model']}:{m.distilled_from['version']}" if m.distilled_from else ""
        typer.echo(f"{mark} {m.version:<5} {m.status:<9} {scores} parent={m.parent or '-'}{teacher} "
                   f"artifacts={','.join(passed) or '-'} {m.created_at}")


@app.command()
def optimize(model: str, version: str, config: str | None = ConfigOption) -> None:
    """Build VERSION's optimized artifacts (ONNX, int8: `optimize.runtimes`), check each
    against PyTorch on the golden set, measure every runtime's texts/s here, and record it
    all in the version's manifest; replicas serving the version (`serving.runtime: auto`, or
    the artifact named) swap onto the new build within 30 s. Exits 1 when no artifact passed
    parity."""
    import logging

    from tuneloop.core.errors import UnknownVersion
    from tuneloop.store.registry import Registry

    cfg = _load(config)
    known_model(cfg, model)
    registry = Registry(stored_root(cfg))
    try:
        manifest = registry.manifest(model, version)  # before torch is imported: a mistyped version says so at once
    except UnknownVersion as e:
        typer.echo(e.message, err=True)
        raise typer.Exit(2) from None
    labels = cfg.model(model).labels
    if not manifest.trained_for(labels):
        # No replica serves it (they refuse it at load): its artifacts would never serve. Its
        # parity reference failed to load with a 69-line traceback, exit 1 ("no artifact passed").
        typer.echo(f"{model} {version} was trained for labels {manifest.labels}, the config has {labels}: no "
                   "replica serves it, so there is nothing to optimize", err=True)
        raise typer.Exit(2)
    from tuneloop.serving.optimize import optimize_version

    logging.getLogger("torch").setLevel(logging.ERROR)  # the exporter's progress lines
    try:
        manifest = optimize_version(cfg, registry, model, version,
                                    progress=lambda line: typer.echo(line, err=True))
    except UnknownVersion as e:
        typer.echo(e.message, err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(manifest.optimization.model_dump(mode="json"), indent=2))
    raise typer.Exit(0 if any(a.parity.passed for a in manifest.optimization.artifacts.values()) else 1)


@app.command()
def lineage(
    target: str = typer.Argument(..., help="a prediction id, or a model name followed by a version"),
    version: str | None = typer.Argument(None, help="with a model name: the version"),
    rows: bool = typer.Option(False, "--rows", help="list every row each version trained on"),
    as_json: bool = typer.Option(False, "--json", help="print JSON (with every feedback id)"),
    config: str | None = ConfigOption,
) -> None:
    """Where a prediction or a version came from: the version that served it, its ancestry,
    the rows each version trained on, the golden set, and its feedback-to-serving time."""
    from tuneloop.control.lineage import describe, prediction_lineage, version_lineage
    from tuneloop.core.errors import UnknownPrediction, UnknownVersion
    from tuneloop.core.tasks import model_tasks
    from tuneloop.store.records import PredictionLog
    from tuneloop.store.registry import Registry

    cfg = _load(config)
    storage = stored_root(cfg)
    registry = Registry(storage)
    try:
        if version is not None:
            known_model(cfg, target)
            found = version_lineage(registry, target, version, with_rows=rows)
        elif target in {m.name for m in cfg.models}:
            typer.echo(f"{target!r} is a model: give a version too (tuneloop lineage {target} vN), or a "
                       "prediction id alone", err=True)
            raise typer.Exit(2)
        else:
            log = PredictionLog(storage, model_tasks(cfg.models))
            found = prediction_lineage(registry, log, [m.name for m in cfg.models], target, with_rows=rows)
    except (UnknownVersion, UnknownPrediction) as e:
        typer.echo(e.message, err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(found, indent=2, default=str) if as_json else "\n".join(describe(found)))


@app.command()
def rollout(
    model: str,
    action: str = typer.Argument("status", help="status, start, pause, resume, step or rollback"),
    version: str | None = typer.Argument(None, help="with start: the version to roll out"),
    stage: str | None = typer.Option(None, help="with start: shadow or canary (default: canary if rollout.mode is canary, else shadow)"),
    force: bool = typer.Option(False, "--force", help="with start: a version the gate rejected too"),
    at: float | None = typer.Option(None, "--at", help="with step: the percent you saw it at (refused if it moved since)"),
    config: str | None = ConfigOption,
) -> None:
    """MODEL's rollout: its state and recent decisions (status), or an operator's action. The
    retrain controller decides by itself between actions; these are written to the same
    state, and every replica follows within serving.reload_interval_s."""
    from tuneloop.core.errors import Conflict, InvalidBody, UnknownVersion
    from tuneloop.store.registry import Registry
    from tuneloop.store.rollout_actions import operate_rollout

    cfg = _load(config)
    known_model(cfg, model)
    if action not in ("status", "start", "pause", "resume", "step", "rollback"):
        typer.echo(f"unknown action {action!r}: status, start, pause, resume, step or rollback", err=True)
        raise typer.Exit(2)
    if stage not in (None, "shadow", "canary"):
        typer.echo(f"unknown stage {stage!r}: shadow or canary", err=True)
        raise typer.Exit(2)
    if action == "status" and (version is not None or stage is not None or force or at is not None):
        typer.echo("a version, --stage and --force go with start, --at with step, not with status", err=True)
        raise typer.Exit(2)
    # In the command's own words (operate_rollout's are the HTTP body's).
    if action == "start" and version is None:
        typer.echo(f"give the version to roll out: tuneloop rollout {model} start VERSION", err=True)
        raise typer.Exit(2)
    if action != "start" and (stage is not None or force):
        typer.echo(f"--stage and --force go with start, not with {action}", err=True)
        raise typer.Exit(2)
    if action != "step" and at is not None:
        typer.echo(f"--at goes with step, not with {action}", err=True)
        raise typer.Exit(2)
    registry = Registry(stored_root(cfg))
    if action == "status":
        state = registry.state(model)
    else:
        try:
            state = operate_rollout(registry, model, action, "by `tuneloop rollout`", cfg.rollout,
                                    cfg.model(model).labels, version, stage, force,
                                    logs_predictions=cfg.predictions.sample_rate > 0, at=at)
        except (Conflict, InvalidBody, UnknownVersion) as e:
            typer.echo(e.message, err=True)
            raise typer.Exit(2) from None
    for line in _describe_state(model, state, registry.rollout_look(model)):
        typer.echo(line)


def _describe_state(model: str, state, look: dict | None, last: int = 8) -> list[str]:
    """Production, the rollout under way and the rollout driver's latest ``look`` at it (why
    it holds), and the last changes with who or what made them and the numbers an automatic
    decision saw."""
    r = state.rollout
    lines = [f"{model}: production {state.production or 'none'}" + (
        f"; challenger {r.version} in {r.stage}" + (f" at {r.percent:g}%" if r.stage == "canary" else "")
        + f" since {r.stage_started_at}" + (" (paused)" if r.paused else "")
        + (" (alert: no decision yet)" if r.alerted else "") if r else "; no rollout under way")]
    if r and look and (look.get("version"), look.get("stage_started_at")) == (r.version, r.stage_started_at):
        lines.append(f"  last look {look.get('at')}: {look.get('action')}: {look.get('reason')}")
    for entry in [h for h in state.history if h.event != "candidate"][-last:]:
        lines.append(f"  {entry.at}  {entry.event:<8} {entry.version or '-':<5} {entry.reason}")
        if entry.numbers:
            lines.append("      " + " ".join(f"{k}={v}" for k, v in entry.numbers.items()))
    return lines


@app.command()
def status(
    model: str | None = typer.Argument(None, help="one model (default: every configured model)"),
    as_json: bool = typer.Option(False, "--json", help="print the registry's state as JSON"),
    config: str | None = ConfigOption,
) -> None:
    """Each model's production version, its rollout (stage, traffic share, paused or alerted)
    and its last changes: who or what decided, and the numbers an automatic decision saw."""
    from tuneloop.store.registry import Registry

    cfg = _load(config)
    if model is not None:
        known_model(cfg, model)
    registry = Registry(stored_root(cfg))
    names = [model] if model else [m.name for m in cfg.models]
    states = {name: registry.state(name) for name in names}
    if as_json:
        typer.echo(json.dumps({n: {**s.model_dump(), "rollout_look": registry.rollout_look(n)}
                               for n, s in states.items()}, indent=2, default=str))
        return
    for name, state in states.items():
        for line in _describe_state(name, state, registry.rollout_look(name)):
            typer.echo(line)


@app.command()
def jobs(
    model: str | None = typer.Argument(None, help="one model (default: every model's jobs)"),
    last: int = typer.Option(20, "--last", min=1, help="how many of the newest jobs"),
    as_json: bool = typer.Option(False, "--json", help="print the job records as JSON"),
    config: str | None = ConfigOption,
) -> None:
    """The newest training jobs, newest first: state, trigger, version, how long each took,
    and why a job failed or its version waits. A running job that stopped heartbeating is
    shown so, not marked failed: this machine's clock may be off the cluster's, whose
    controller marks it. `GET /v1/jobs/{id}` gives one job's whole record."""
    from tuneloop.control.text_columns import columns
    from tuneloop.store.jobs import JobStore

    cfg = _load(config)
    if model is not None:
        known_model(cfg, model)
    store = JobStore(stored_root(cfg))
    records = [j for j in store.all(settle=False) if model is None or j.model == model][-last:][::-1]
    if as_json:
        typer.echo(json.dumps([j.model_dump(mode="json") for j in records], indent=2))
        return
    if not records:
        typer.echo(f"no training jobs yet{f' of {model}' if model else ''}")
        return
    rows = [("JOB", "MODEL", "STATE", "TRIGGER", "VERSION", "CREATED", "TOOK", "WHY")]
    for j in records:
        took = "-"
        if j.finished_at:
            took = f"{(datetime.fromisoformat(j.finished_at) - datetime.fromisoformat(j.created_at)).total_seconds():.0f}s"
        why = " ".join((j.error or j.message or "").split())  # a worker's traceback: still one line a job
        why = f"{why[:160]}{'...' if len(why) > 160 else ''}"
        if store.is_stale(j):
            why = (f"no heartbeat since {j.heartbeat_at or j.created_at} by this machine's clock (lost if its "
                   "process died; the cluster's controller marks it failed)")
        rows.append((j.job_id, j.model, j.state, j.trigger, j.version or "-", j.created_at, took, why))
    typer.echo("\n".join(columns(rows)))


feedback_app = typer.Typer(no_args_is_help=True, rich_markup_mode=HELP_MARKUP,
                           help="What users said: statistics of the feedback, and the keys held out of training.")
keys_app = typer.Typer(no_args_is_help=True, rich_markup_mode=HELP_MARKUP,
                       help="API keys: create, list and revoke (secrets are shown once, stored hashed).")
app.add_typer(feedback_app, name="feedback")
app.add_typer(keys_app, name="keys")
app.add_typer(deploy_app, name="deploy")


@feedback_app.command("stats")
def feedback_stats_cmd(
    model: str,
    as_json: bool = typer.Option(False, "--json", help="print the statistics as JSON"),
    config: str | None = ConfigOption,
) -> None:
    """Counts by label, version and day, each version's online accuracy (the share of
    feedback on its answers that agreed), and its labels' online precision and recall."""
    from tuneloop.control.feedback_report import feedback_lines
    from tuneloop.core.feedback_stats import feedback_stats
    from tuneloop.core.tasks import model_tasks
    from tuneloop.store.feedback_store import FeedbackStore

    cfg = _load(config)
    known_model(cfg, model)
    tasks = model_tasks(cfg.models)
    store = FeedbackStore(stored_root(cfg), cfg.storage.journal_path(), tasks)
    stats = feedback_stats(model, tasks[model], store.read_all(model, without_text=True))
    typer.echo(json.dumps(stats, indent=2) if as_json else "\n".join(feedback_lines(stats)))


@feedback_app.command("keys")
def feedback_keys_cmd(
    model: str,
    as_json: bool = typer.Option(False, "--json", help="print the keys' numbers and verdicts as JSON"),
    config: str | None = ConfigOption,
) -> None:
    """Each feedback key's agreement with production and with other keys over all of MODEL's
    feedback, and the quarantine's verdicts."""
    from tuneloop.control.feedback_report import key_lines
    from tuneloop.core.feedback_stats import arrival_order, superseded
    from tuneloop.core.quarantine import task_key_stats
    from tuneloop.core.tasks import model_tasks
    from tuneloop.store.quarantine import QuarantineBook
    from tuneloop.store.feedback_store import FeedbackStore

    cfg = _load(config)
    known_model(cfg, model)
    tasks, storage = model_tasks(cfg.models), stored_root(cfg)
    task = tasks[model]
    # In arrival order, as a job reads them: a key's vote on a text is its newest answer.
    rows = sorted(FeedbackStore(storage, cfg.storage.journal_path(), tasks).read_all(model), key=arrival_order)
    dropped = superseded(rows)
    verdicts = QuarantineBook(storage).verdicts(model)
    held = {k for k, v in verdicts.items() if v.state == "quarantined"}
    stats = task_key_stats(task, [r for r in rows if r["feedback_id"] not in dropped], held)
    out = [{**s.as_dict(), "quarantine": verdicts[k].model_dump() if k in verdicts else None}
           for k, s in sorted(stats.items())]
    typer.echo(json.dumps({"model": model, "keys": out}, indent=2) if as_json else "\n".join(key_lines(model, out)))


@feedback_app.command("release")
def feedback_release_cmd(model: str, key_id: str = typer.Argument(..., help="a quarantined key's id"),
                         config: str | None = ConfigOption) -> None:
    """Let a quarantined key's feedback be trained on again, from MODEL's next job on."""
    from tuneloop.core.errors import NotQuarantined
    from tuneloop.store.quarantine import QuarantineBook

    cfg = _load(config)
    known_model(cfg, model)
    try:
        verdict = QuarantineBook(stored_root(cfg)).release(model, key_id)
    except NotQuarantined as e:
        typer.echo(e.message, err=True)
        raise typer.Exit(2) from None
    typer.echo(f"released {key_id} for {model} (quarantined {verdict.since}: {verdict.reason})")


@keys_app.command("create")
def keys_create(role: str = typer.Argument(..., help="predict, feedback, admin, or metrics (Prometheus' scrape key)"),
                config: str | None = ConfigOption) -> None:
    """Create a key with ROLE; prints it once. A running server picks it up within seconds."""
    from tuneloop.core.auth import KEY_ROLES
    from tuneloop.store.keys import add_stored_key
    from tuneloop.store.storage import Storage

    if role not in KEY_ROLES:
        typer.echo(f"role must be one of {list(KEY_ROLES)}, not {role!r}", err=True)
        raise typer.Exit(2)
    cfg = _load(config)
    try:
        key = add_stored_key(Storage(cfg.storage.root), role)
    except ConfigError as e:  # a corrupt key file is reported, never overwritten
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None
    typer.echo(key)


@keys_app.command("list")
def keys_list(config: str | None = ConfigOption) -> None:
    """Key ids and roles (never the keys)."""
    from tuneloop.store.keys import KeyRing

    cfg = _load(config)
    try:
        keys = KeyRing(cfg.auth, stored_root(cfg)).keys()
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None
    for key in keys:
        typer.echo(f"{key.id}  {key.role}")
    if not keys:
        typer.echo("no API keys (tuneloop keys create ROLE makes one)", err=True)


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="the key's id, as `tuneloop keys list` shows it"),
                config: str | None = ConfigOption) -> None:
    """Remove a key from the key file; a running server refuses it within 5 s. Keys of the
    config or $TUNELOOP_API_KEYS are removed there (and the server restarted)."""
    from tuneloop.core.auth import RevokeError
    from tuneloop.store.keys import revoke_stored_key

    cfg = _load(config)
    try:  # a root that is not there holds no key, and a mistyped one is not made
        key = revoke_stored_key(cfg.auth, stored_root(cfg), key_id)
    except (RevokeError, ConfigError) as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None
    typer.echo(f"revoked key {key.id} (role {key.role}); a running server refuses it within 5 s")


@app.command("check-config")
def check_config(config: str | None = ConfigOption) -> None:
    """Validate the config file and print it with defaults filled in; then check what `tuneloop
    run` checks before it starts (seed and golden files, something to train v1 on)."""
    from tuneloop.control.preflight import data_problems

    cfg = _load(config)
    typer.echo(json.dumps(cfg.model_dump(), indent=2))
    # An object-store root is not opened: validating a cluster's config works offline.
    problems = data_problems(cfg, offline="://" in cfg.storage.root)
    if problems:
        typer.echo("tuneloop run would refuse to start:\n  " + "\n  ".join(problems), err=True)
        raise typer.Exit(2)
    typer.echo(f"config OK: {len(cfg.models)} model(s), {', '.join(m.name for m in cfg.models)}", err=True)


def main() -> None:
    from tuneloop.serving.fast_path import enable_fast_path

    enable_fast_path()  # before anything imports ray
    # tuneloop's own lines at info; libraries' at warning: botocore said where it found
    # credentials on every command, httpx logged each readiness poll of `run`.
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT,
                        stream=sys.stderr)
    logging.getLogger("tuneloop").setLevel(logging.INFO)
    from tuneloop.core.errors import CorruptStoredFile

    try:
        app()
    except CorruptStoredFile as e:  # a hand-edited or cut file: say which, not a traceback
        print(f"tuneloop: {e.message}", file=sys.stderr)
        sys.exit(2)
    except ConfigError as e:  # found past the config's validation: a storage root pyarrow cannot open
        print(f"tuneloop: {e}", file=sys.stderr)
        sys.exit(2)
    except SystemExit as e:  # `run` refusing to start says why: exit 2, as every other refusal
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            sys.exit(2)
        raise
    except OSError as e:  # the storage root a file, unreadable, or a bucket out of reach: say so in a line
        # The system's words and the path ("FileNotFoundError: [Errno 2] ..." read as a crash);
        # pyarrow's errors carry their message alone.
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        print(f"tuneloop: {e.strerror}: {where}" if e.strerror and where else f"tuneloop: {e or type(e).__name__}",
              file=sys.stderr)
        sys.exit(2)
