"""The `tuneloop deploy …` commands (operate.py does the work)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer

from tuneloop.control import operate
from tuneloop.control.manifests import NotClusterable
from tuneloop.core.config import ConfigError, TuneloopConfig, load_config_and_document

deploy_app = typer.Typer(no_args_is_help=True, rich_markup_mode="markdown", help=(
    "Run tuneloop on a GPU cluster: KubeRay (kubectl) or the Ray cluster launcher (ray up) on AWS or GCP. "
    "Every command renders the cluster's files from the config first (into .tuneloop/deploy/, or --dir); "
    "the verbs that run commands take --dry-run, which renders the files, prints their paths and the commands, and runs nothing."))

ConfigOption = typer.Option(None, "--config", "-c", help="config file (default: $TUNELOOP_CONFIG or ./tuneloop.yaml)")
TargetOption = typer.Option("kuberay", "--target", "-t", help="kuberay, aws or gcp (render also: serve)")
DirOption = typer.Option(None, "--dir", help=(
    "where the rendered files go (default .tuneloop/deploy/kuberay, .tuneloop/deploy/launcher/{cloud}, "
    ".tuneloop/deploy/serve)"))
DryRunOption = typer.Option(False, "--dry-run", help=(
    "render the files and print their paths and the commands (rollout: check the switch); run nothing"))


def known_model(cfg: TuneloopConfig, model: str) -> None:
    if model not in {m.name for m in cfg.models}:
        typer.echo(f"unknown model {model!r}; configured: {[m.name for m in cfg.models]}", err=True)
        raise typer.Exit(2)


def stored_root(cfg: TuneloopConfig):
    """The storage root a command reads: a local one that is not there is said so (a typo
    in storage.root read as a fresh install: "no versions yet", "production none")."""
    from tuneloop.store.storage import Storage

    root = cfg.storage.root
    if "://" not in root and not os.path.isdir(root):
        why = ("is a file, not a folder" if os.path.exists(root) else
               "does not exist: nothing has run with this config (or storage.root is not where it ran)")
        typer.echo(f"tuneloop: storage root {root} {why}", err=True)
        raise typer.Exit(2)
    return Storage(root)


def _load(config: str | None, clients_here: bool = True) -> tuple[TuneloopConfig, dict[str, Any]]:
    try:
        return load_config_and_document(config, clients_here)
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None


def _render(cfg: TuneloopConfig, doc: dict[str, Any], target: str, folder: str | None) -> Path:
    if target not in (*operate.TARGETS, "serve"):
        typer.echo(f"unknown target {target!r}; choose one of {[*operate.TARGETS, 'serve']}", err=True)
        raise typer.Exit(2)
    out = Path(folder) if folder else Path(operate.DEFAULT_ROOT, operate.FOLDERS[target])
    try:
        written = operate.render(cfg, doc, target, out)
    except NotClusterable as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None
    for path in written:
        typer.echo(f"rendered {path}")
    return out


def _verb(verb: str, config: str | None, target: str, folder: str | None, dry_run: bool,
          model: str | None = None) -> TuneloopConfig:
    # Only `status` reads the storage root from here; the others render and run kubectl or ray.
    cfg, doc = _load(config, clients_here=verb == "status" and not dry_run)
    if model is not None and model not in {m.name for m in cfg.models}:
        typer.echo(f"unknown model {model!r}; configured: {[m.name for m in cfg.models]}", err=True)
        raise typer.Exit(2)
    if target == "serve":
        typer.echo("target serve only renders (`tuneloop deploy render --target serve`; deploy it with "
                   "`serve deploy`)", err=True)
        raise typer.Exit(2)
    out = _render(cfg, doc, target, folder)
    try:
        operate.run_steps(operate.plan(cfg, target, verb, out, model), dry_run, typer.echo)
    except operate.StepFailed as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(e.code or 1) from None
    return cfg


@deploy_app.command("render")
def render_cmd(config: str | None = ConfigOption, target: str = TargetOption, folder: str | None = DirOption) -> None:
    """Write the target's files: kuberay (ConfigMap, journal volume, RayService, a RayJob per
    model, PodMonitor), aws or gcp (cluster launcher YAML, the cluster's config, Serve's
    config) or serve (a Serve config file). The storage root's client library (boto3,
    google-cloud-storage) need not be installed here: the image has it."""
    cfg, doc = _load(config, clients_here=False)
    _render(cfg, doc, target, folder)


@deploy_app.command("up")
def up_cmd(config: str | None = ConfigOption, target: str = TargetOption, folder: str | None = DirOption,
           dry_run: bool = DryRunOption) -> None:
    """Create the cluster and start serving every model."""
    _verb("up", config, target, folder, dry_run)


@deploy_app.command("deploy")
def deploy_cmd(config: str | None = ConfigOption, target: str = TargetOption, folder: str | None = DirOption,
               dry_run: bool = DryRunOption) -> None:
    """Apply a changed config to the running cluster, without downtime."""
    _verb("deploy", config, target, folder, dry_run)


@deploy_app.command("status")
def status_cmd(config: str | None = ConfigOption, target: str = TargetOption, folder: str | None = DirOption,
               dry_run: bool = DryRunOption) -> None:
    """The cluster's and Serve's state, then per model: production, newest job, online
    accuracy, feedback since production's training (read from the storage root)."""
    cfg = _verb("status", config, target, folder, dry_run)
    if dry_run:
        typer.echo(f"# then reads production, jobs and feedback from {cfg.storage.root}")
        return
    for row in operate.model_status(cfg):
        typer.echo("  ".join(f"{k}={v}" for k, v in row.items()))


@deploy_app.command("rollout")
def rollout_cmd(model: str, version: str | None = typer.Argument(None, help="the version to make production"),
                rollback: bool = typer.Option(False, "--rollback", help="back to the production before this one"),
                force: bool = typer.Option(False, "--force", help="a version the gate rejected too"),
                config: str | None = ConfigOption, dry_run: bool = DryRunOption) -> None:
    """Make VERSION production (or roll back): replicas on every node switch to it within
    serving.reload_interval_s, without a restart and without dropping a request."""
    from tuneloop.core.errors import Conflict, UnknownVersion
    from tuneloop.store.registry import Registry

    cfg, _ = _load(config)
    known_model(cfg, model)
    if (version is None) == (not rollback):
        typer.echo("give a VERSION or --rollback" + (", not both" if rollback else ""), err=True)
        raise typer.Exit(2)
    what = "roll back" if rollback else f"promote {version}"
    typer.echo(f"# {what} of {model} in {cfg.storage.root}")
    try:
        registry = Registry(stored_root(cfg))  # a mistyped local root is said so, not made by the state's lock
        before = registry.state(model) if dry_run else None  # for what the dry run says
        # --dry-run: the same checks on the state as it is, nothing written
        state = (registry.rollback(model, reason="tuneloop deploy rollout --rollback", labels=cfg.model(model).labels,
                                   dry_run=dry_run)
                 if rollback else
                 registry.promote(model, version, reason="tuneloop deploy rollout", force=force,
                                  labels=cfg.model(model).labels, dry_run=dry_run))
    except (Conflict, UnknownVersion) as e:
        typer.echo(getattr(e, "message", str(e)), err=True)
        raise typer.Exit(2) from None
    except OSError as e:
        if not dry_run:
            raise
        # The cluster's bucket, out of this machine's reach: the plan is printed all the same.
        typer.echo(f"# not checked against the registry, which this machine cannot read: {e}")
        return
    if dry_run:  # promote and rollback both end a rollout under way
        ends = f"; the rollout of {before.rollout.version} would end" if before.rollout else ""
        typer.echo(f"# production is {before.production or 'none'}; it would be {state.production}{ends}; "
                   "nothing changed (--dry-run)")
        return
    typer.echo(f"{model}: production is {state.production} (generation {state.generation})")


@deploy_app.command("retrain")
def retrain_cmd(model: str, config: str | None = ConfigOption, target: str = TargetOption,
                folder: str | None = DirOption, dry_run: bool = DryRunOption) -> None:
    """Train MODEL now as a Ray Job (KubeRay: its own RayJob cluster on GPU workers)."""
    _verb("retrain", config, target, folder, dry_run, model=model)


@deploy_app.command("logs")
def logs_cmd(config: str | None = ConfigOption, target: str = TargetOption, folder: str | None = DirOption,
             dry_run: bool = DryRunOption) -> None:
    """The head's log and Serve's logs."""
    _verb("logs", config, target, folder, dry_run)


@deploy_app.command("down")
def down_cmd(config: str | None = ConfigOption, target: str = TargetOption, folder: str | None = DirOption,
             dry_run: bool = DryRunOption) -> None:
    """Tear the cluster down (KubeRay keeps the journal's volume; the bucket keeps everything else)."""
    _verb("down", config, target, folder, dry_run)
