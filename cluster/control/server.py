"""`tuneloop run`: start Ray, make sure every model has a version, serve until Ctrl-C.

Also records where the running cluster is (<storage>/servers/<host>.json), so `tuneloop train`
in another terminal joins this Ray cluster instead of starting a second one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable

import httpx
import ray
from ray import serve

from tuneloop.control import worker_setup
from tuneloop.control.console_filter import without_stop_noise
from tuneloop.control.preflight import check_ports_free, data_problems, fewest_replicas, storage_root_problem
from tuneloop.store.jobs import JobStore
from tuneloop.store.keys import KeyRing, ensure_admin_key, save_admin_key
from tuneloop.core.config import ConfigError, TuneloopConfig, cluster_to_join
from tuneloop.core.names import deploy_failures, not_running
from tuneloop.core.tasks import label_set
from tuneloop.core.resources import (gpu_retraining_shortfall, local_ray_cpus, retraining_shortfall,
                                     serving_shortfall)
from tuneloop.store.registry import Registry
from tuneloop.store.server_file import remove_server_file, write_server_file
from tuneloop.store.storage import Storage, private_temp_dir

log = logging.getLogger("tuneloop")


def init_ray(cfg: TuneloopConfig, address: str | None = None) -> None:
    """Join ``address`` (or the config's, or $RAY_ADDRESS: set for a Ray Job's entrypoint)
    if there is one, else start a local Ray in-process."""
    address = cluster_to_join(address, cfg.ray.address, os.environ.get("RAY_ADDRESS"))
    # "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to
    # opt out" at every run and train: tuneloop keeps Ray's default on purpose (the dashboard
    # and GCS of a local Ray are not anyone's), and the line invited turning it off.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    worker_setup.quiet_driver_logs()
    if address:
        # The hook quiets the library logs of this driver's job's workers (Ray Train's own
        # actors among them), as it does for a local Ray's.
        ray.init(address=address, include_dashboard=False, log_to_driver=True,
                 runtime_env={"worker_process_setup_hook": worker_setup.HOOK})
    else:
        s = cfg.serving
        num_cpus = cfg.ray.num_cpus or local_ray_cpus(os.cpu_count() or 1, len(cfg.models), fewest_replicas(cfg),
                                                      s.num_cpus_per_replica, cfg.largest_job_cpus())
        # "local": a new Ray whatever $RAY_ADDRESS says (the config's local outranks it).
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                 runtime_env={"worker_process_setup_hook": worker_setup.HOOK})


def bootstrap_versions(cfg: TuneloopConfig) -> None:
    """Train v1 of every model that has no production version yet."""
    from tuneloop.serving.optimize import optimize_version
    from tuneloop.training.launcher import run_training

    registry = Registry(Storage(cfg.storage.root))
    for m in cfg.in_training_order():
        production = registry.production(m.name)
        if production is None:
            log.info("model %s has no version yet: fine-tuning v1 from %s", m.name, m.starts_from())
        elif added := sorted(label_set(m.task, m.labels)
                             - label_set(m.task, registry.manifest(m.name, production).labels)):
            # Its replicas refuse a version without the config's labels: nothing would serve.
            log.info("model %s: the config adds label(s) %s to production %s's: fine-tuning a version with them",
                     m.name, added, production)
        else:
            first = registry.versions(m.name)[:1]
            if m.base_model and first and first[0].base_model not in (None, m.base_model):
                log.warning("model %s: base_model is now %s, but its versions descend from %s: jobs go on from "
                            "production's weights; to start over from %s, give the model a new name", m.name,
                            m.base_model, first[0].base_model, m.base_model)
            continue
        outcome = run_training(cfg, m.name, trigger="bootstrap", optimize=optimize_version)
        if outcome.job.state != "succeeded" or not outcome.job.promoted:
            raise SystemExit(f"could not train a version of {m.name} to serve: "
                             f"{outcome.job.error or outcome.job.message or outcome.job.state}")


class _NotTheReconnects(logging.Filter):
    """Drops Serve's line at every application deployed into the Serve just started
    ("Connecting to existing Serve app ... New http_options/controller_options will not be
    applied"): five of them at each start read as if the config's options were ignored."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Connecting to existing Serve app")


def start_serving(cfg: TuneloopConfig, metrics_dir: str | None) -> None:
    """Start Serve's proxy and deploy every application (control/apps.py), the retrain
    controller's keeper included: what a Serve config file or a RayService deploys."""
    from tuneloop.control.apps import deploy

    serve.start(http_options={"host": cfg.serving.host, "port": cfg.serving.port})
    serve_log, quiet = logging.getLogger("ray.serve"), _NotTheReconnects()
    serve_log.addFilter(quiet)
    try:
        deploy(cfg, metrics_dir)
    finally:
        serve_log.removeFilter(quiet)


def wait_ready(url: str, timeout_s: float = 300.0, alive: Callable[[], bool] | None = None,
               apps: list[str] | None = None) -> None:
    """Until GET /readyz answers 200; ``alive`` (optional) says whether the server still runs.
    ``apps``: Serve applications of this Ray that must be running too (the retrain
    controller's, which /readyz does not cover); one Serve could not deploy fails the wait
    with Serve's reason, where the wait alone would say only "not ready"."""
    deadline = time.monotonic() + timeout_s
    ready, waiting = False, []
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError(f"the server behind {url} exited before it was ready")
        statuses = serve.status().applications if apps else {}
        failed = deploy_failures(statuses, apps or [])
        if failed:
            raise RuntimeError("Serve could not deploy " + "; ".join(failed))
        try:
            ready = ready or httpx.get(f"{url}/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            pass
        waiting = not_running(statuses, apps or [])
        if ready and not waiting:
            return
        time.sleep(0.5)
    raise TimeoutError(f"{url} was not ready within {timeout_s:.0f}s" + (f"; not running: {', '.join(waiting)}"
                                                                       if waiting else ""))


def metrics_dir_for(cfg: TuneloopConfig) -> str:
    path = os.path.join(private_temp_dir("tuneloop-metrics"), str(cfg.serving.port))
    shutil.rmtree(path, ignore_errors=True)  # counters restart with the server
    os.makedirs(path)
    return path


def run_forever(cfg: TuneloopConfig) -> None:
    if problem := storage_root_problem(cfg.storage.root):
        raise SystemExit(f"tuneloop: cannot start: {problem}")
    storage = Storage(cfg.storage.root)
    try:
        # First of all: a bad key file or $TUNELOOP_API_KEYS stops the start, rather than
        # failing every request that needs a key once the server is up.
        KeyRing(cfg.auth, storage).keys()
    except ConfigError as e:
        raise SystemExit(f"tuneloop: cannot start: {e}") from None
    problems = data_problems(cfg)
    if problems:
        raise SystemExit("tuneloop: cannot start:\n  " + "\n  ".join(problems))
    local_ray = cfg.ray.address in (None, "local")
    # Ray this process starts (a joined cluster's processes are not its own to watch or size).
    own_ray = cluster_to_join(cfg.ray.address, os.environ.get("RAY_ADDRESS")) is None
    if local_ray:
        stop_haproxy_of_killed_servers()
    check_ports_free(cfg.serving.host, cfg.serving.port, local_ray=local_ray)
    announce_admin_key(cfg, storage)
    metrics_dir = metrics_dir_for(cfg)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    started = time.monotonic()
    init_ray(cfg)
    if own_ray:  # a joined cluster may autoscale
        s = cfg.serving
        short = serving_shortfall(len(cfg.models), fewest_replicas(cfg),
                                  {"CPU": s.num_cpus_per_replica, "GPU": s.num_gpus_per_replica,
                                   **s.resources_per_replica}, ray.cluster_resources())
        short = short or retraining_shortfall(len(cfg.models), fewest_replicas(cfg), s.num_cpus_per_replica,
                                              cfg.largest_job_cpus(), ray.cluster_resources().get("CPU", 0.0))
        short = short or gpu_retraining_shortfall(len(cfg.models), fewest_replicas(cfg), s.num_gpus_per_replica,
                                                  cfg.largest_job_gpus(), ray.cluster_resources().get("GPU", 0.0))
        if short:
            ray.shutdown()
            raise SystemExit(f"tuneloop: cannot start: {short}")
    # Set by the signal handler, which takes no lock: a handler that called ``Event.set``
    # deadlocked the server for good when it ran while the main thread held that Event's
    # lock (Python runs handlers in the main thread between bytecodes, and a signal that
    # another of its 40 threads took ran there as the main thread's 5-second wait ended).
    stopping: list[int] = []
    ready = threading.Event()  # read by the handler with ``is_set``, which takes no lock either
    serving = False  # Serve started: stopped at the end (its shutdown logs a line when there is none)
    ray_died = None

    def on_signal(signum: int, _frame) -> None:
        if not ready.is_set():
            # Still starting: Serve waits for replicas with no deadline (one that cannot be
            # placed waits for good), and a handler that only asked to stop left Ctrl-C and
            # SIGTERM unheard there. Unwind through the clean-up below instead.
            raise KeyboardInterrupt
        stopping.append(signum)

    try:
        write_server_file(storage, ray.get_runtime_context().gcs_address)
        # SIGTERM from here on, as Ctrl-C is: during v1's training its default ended the
        # process at once, no clean-up run (the server file left, the job said running).
        signal.signal(signal.SIGTERM, on_signal)
        try:
            bootstrap_versions(cfg)
        except KeyboardInterrupt:  # the job's record says interrupted; what is published stays
            print("tuneloop: interrupted while training a first version; stopping", flush=True)
            raise SystemExit(130) from None
        # After bootstrap: Ray Train's fit() installs its own SIGINT handler while it runs.
        signal.signal(signal.SIGINT, on_signal)
        url = f"http://{cfg.serving.host}:{cfg.serving.port}"
        from tuneloop.serving.app import application_names

        serving = True
        try:
            start_serving(cfg, metrics_dir)  # Serve raises RuntimeError for an application it could not deploy
            wait_ready(url, apps=application_names(cfg))
        except (RuntimeError, TimeoutError) as e:
            raise SystemExit(f"tuneloop: cannot start: {e}") from None
        except KeyboardInterrupt:
            print("tuneloop: interrupted while starting; stopping", flush=True)
            raise SystemExit(130) from None
        ready.set()
        print(f"tuneloop ready at {url} after {time.monotonic() - started:.1f}s "
              f"(metrics at {url}/metrics; Ctrl-C stops)", flush=True)
        registry = Registry(storage)
        for m in cfg.models:  # what serves where: the first thing a user of a fresh server asks
            print(f"  {m.name} {registry.production(m.name)} ({m.task}): POST {url}/v1/models/{m.name}/predict",
                  flush=True)
        ray_died = wait_for_stop(stopping, dead_ray_process if own_ray else lambda: None)
        if ray_died:
            print(f"tuneloop: the local Ray stopped ({ray_died}): nothing serves any more; stopping, "
                  "exit 1 (start `tuneloop run` again)", flush=True)
            # Ray's shutdown may wait on a dead GCS for its reconnect timeout: a supervisor
            # restarts a process that has exited, not one that hangs.
            deadline = threading.Timer(CLEAN_UP_AFTER_RAY_DIED_S, os._exit, args=(1,))
            deadline.daemon = True  # a clean-up that ends in time exits at once
            deadline.start()
        else:
            print("tuneloop: stopping", flush=True)
    finally:
        ready.set()  # a second Ctrl-C now only asks to stop: raised here, it cut the clean-up short
        stop_began = time.monotonic()
        remove_server_file(storage)
        if ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
            try:
                with without_stop_noise():
                    try:
                        if serving and not (own_ray and dead_ray_process()):  # Serve's shutdown waits on a dead GCS
                            drain(cfg)
                            serve.shutdown()
                    finally:
                        ray.shutdown()
            finally:
                stop_orphaned_haproxy(node_id)
                if own_ray:  # the jobs that ran in it stopped with it
                    try:
                        JobStore(storage).fail_running_on_node(node_id, "interrupted: `tuneloop run` stopped while "
                                                                        "it ran")
                    except Exception as e:  # noqa: BLE001 - storage out of reach: their heartbeats go stale instead
                        log.warning("could not mark the jobs that stopped with Ray: %s: %s", type(e).__name__, e)
    # The last line: without it the console ended at "stopping" and a line of the retrain
    # controller's, and whether the stop was over was a guess.
    print(f"tuneloop: stopped ({time.monotonic() - stop_began:.1f} s)", flush=True)
    if ray_died:
        raise SystemExit(1)


def drain(cfg: TuneloopConfig) -> None:
    """Delete the applications and wait while their replicas answer what they hold, before
    Serve's shutdown: that stops the HTTP proxy first, and every request in flight at a
    Ctrl-C or SIGTERM was cut off ("server disconnected") within 0.2 s. A replica gets
    ``graceful_shutdown_timeout_s`` (``serving/app.py``), so this ends within it."""
    from tuneloop.serving.app import SHUTDOWN_SLACK_S, undeploy

    s = cfg.serving
    serve_log = logging.getLogger("ray.serve")
    level = serve_log.level
    serve_log.setLevel(logging.WARNING)  # not a "Deleting app" line per application at each stop
    try:
        undeploy(cfg, timeout_s=s.body_timeout_s + s.request_timeout_s + 2 * SHUTDOWN_SLACK_S)
    except Exception as e:  # noqa: BLE001 - Serve's shutdown still stops what is left
        log.warning("stopping: the applications did not drain (%s: %s); stopping them anyway", type(e).__name__, e)
    finally:
        serve_log.setLevel(level)


RAY_CHECK_S = 5.0  # how often a serving `tuneloop run` checks that the Ray it started lives
STOP_POLL_S = 0.2  # how soon it notices a Ctrl-C or SIGTERM that another thread of the process took
CLEAN_UP_AFTER_RAY_DIED_S = 20.0  # then its clean-up gets this long before the process exits anyway


def wait_for_stop(stopping: list[int], ray_died: Callable[[], str | None]) -> str | None:
    """Until a signal's handler appends to ``stopping`` (then None), or ``ray_died`` says
    why the Ray this process started is gone (asked every ``RAY_CHECK_S``)."""
    next_check = time.monotonic() + RAY_CHECK_S
    while not stopping:
        time.sleep(STOP_POLL_S)
        if time.monotonic() >= next_check:
            next_check = time.monotonic() + RAY_CHECK_S
            if why := ray_died():
                return why
    return None


def dead_ray_process() -> str | None:
    """Which of the local Ray's raylet and GCS (the node `tuneloop run` started) exited, or
    None. A raylet killed, or one that followed an agent killed from outside, left the
    server process alive with nothing behind it: /healthz said ok, /readyz named no
    version while predicts answered, /metrics never answered. Ray's own ``Node`` watches
    these processes (``ray start --block`` asks it the same), a private API: if it is not
    there, nothing is said."""
    node = getattr(ray._private.worker, "_global_node", None)
    try:
        dead = node.dead_processes() if node is not None else []
    except Exception:  # noqa: BLE001 - Ray's internals moved: no check rather than a false alarm
        return None
    for kind, process in dead:
        if kind in ("raylet", "gcs_server"):
            return f"its {kind} (pid {process.pid}) exited with code {process.returncode}"
    return None


def announce_admin_key(cfg: TuneloopConfig, storage: Storage) -> None:
    """On first run, create the admin key and say where it is. The key itself goes to a
    file only its owner can read, never to stdout, which ends up in service logs."""
    admin_key = ensure_admin_key(cfg.auth, storage)
    if admin_key:
        path = save_admin_key(storage, admin_key)
        print(f"created an admin API key in {path} (not shown here: this output may end up in logs); "
              f"read it with `cat {path}`, keep it somewhere safe, then delete the file.", flush=True)


def stop_haproxy_of_killed_servers() -> None:
    """A `tuneloop run` killed with SIGKILL runs none of its clean-up, and an HAProxy that
    Serve had reloaded under load (a new process, ``-sf``) outlives it, orphaned: it kept the
    API port and HAProxy's two side ports, answered every request with a plain 500, and the
    next `tuneloop run` could not start ("Address already in use"). Before a start, stop
    every HAProxy of tuneloop's private folder whose parent died (a live server's HAProxy is
    its Serve proxy's child), and remove node folders no HAProxy uses that are older than
    ``STALE_HAPROXY_DIR_S`` (one a start, never reused; a starting server's is newer)."""
    import psutil

    from tuneloop.serving.fast_path import haproxy_dir

    orphans, in_use, roots = [], set(), _haproxy_roots()
    for proc in psutil.process_iter(["name", "cmdline", "ppid"]):
        try:
            folder = _haproxy_node_folder(proc.info["name"], proc.info["cmdline"], roots)
            if folder is None:
                continue
            in_use.add(folder)
            if proc.info["ppid"] == 1 or not psutil.pid_exists(proc.info["ppid"]):
                orphans.append(proc)
        except psutil.Error:
            continue
    orphans = _stopped(orphans)
    if orphans:
        print(f"tuneloop: stopped {len(orphans)} HAProxy process(es) left by a tuneloop run that was killed "
              f"(pid {', '.join(str(p.pid) for p in orphans)})", flush=True)
    for entry in os.scandir(haproxy_dir()):
        try:
            if entry.is_dir() and entry.name not in in_use and time.time() - entry.stat().st_mtime > STALE_HAPROXY_DIR_S:
                shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:
            continue


STALE_HAPROXY_DIR_S = 600.0


def _haproxy_roots() -> list[str]:
    """tuneloop's private HAProxy folder as Serve's command lines may name it: as given, and
    resolved. Serve writes it as it was given, a temp dir behind a symlink (macOS's /var, a
    linked TMPDIR) included: matching the resolved form alone found no HAProxy there,
    stopped no orphan and removed live servers' folders."""
    from tuneloop.serving.fast_path import haproxy_dir

    return list(dict.fromkeys((haproxy_dir().rstrip("/"), os.path.realpath(haproxy_dir()).rstrip("/"))))


def _haproxy_node_folder(name: str | None, cmdline: list[str] | None, roots: list[str]) -> str | None:
    """The node folder under one of ``roots`` (``_haproxy_roots``) an HAProxy process's
    command line names, or None for any other process."""
    if "haproxy" not in (name or ""):
        return None
    line = " ".join(cmdline or ())
    for root in roots:
        if f"{root}/" in line:
            return line.split(f"{root}/", 1)[1].split("/", 1)[0]
    return None


def _stopped(procs: list) -> list:
    """``procs`` (psutil processes) terminated, then killed if still there after 5 s; those
    that did not exit by themselves before they could be signalled (a draining HAProxy)."""
    import psutil

    signalled = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
            signalled.append(proc)
    _, alive = psutil.wait_procs(signalled, timeout=5)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return signalled


def stop_orphaned_haproxy(node_id: str) -> None:
    """HAProxy runs detached from Ray's process tree. When Serve's controller misses its
    30 s shutdown deadline (seen after training jobs ran beside the server), the HAProxy it
    started keeps the port, and the next `tuneloop run` cannot start. Stop what is left of
    this node's HAProxy (its config lives under a folder named after the node, inside
    tuneloop's private HAProxy folder)."""
    import psutil

    from tuneloop.serving.fast_path import haproxy_dir

    leftovers, roots = [], _haproxy_roots()
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            if _haproxy_node_folder(proc.info["name"], proc.info["cmdline"], roots) == node_id:
                leftovers.append(proc)
        except psutil.Error:
            continue
    leftovers = _stopped(leftovers)
    if leftovers:
        log.info("stopped %d HAProxy process(es) that Serve's shutdown left behind", len(leftovers))
    shutil.rmtree(f"{haproxy_dir()}/{node_id}", ignore_errors=True)  # its config and state: a folder a start, never reused
