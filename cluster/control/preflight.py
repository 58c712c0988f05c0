"""What `tuneloop run`, `tuneloop train` and `tuneloop check-config` refuse before Ray starts:
data a job would fail on only later (a seed or golden file missing or unreadable, a model with
nothing to train v1 on, a base model path with nothing there, labels dropped from production's),
resources a local Ray could never give (CPUs beside the replicas, GPUs this machine lacks), and a
storage root, host or ports that cannot be used. Each check names what to change."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket

from tuneloop.core.config import TRANSFER_KEY, ModelConfig, TuneloopConfig, cluster_to_join
from tuneloop.core.model_source import local_config, not_a_model_folder
from tuneloop.core.resources import gpu_retraining_shortfall, retraining_shortfall, serving_shortfall
from tuneloop.core.serving_config import haproxy_ports
from tuneloop.core.tasks import label_set, model_task, teacher_labels_problem
from tuneloop.store.journal import pending_records
from tuneloop.store.registry import Registry
from tuneloop.store.storage import Storage

log = logging.getLogger("tuneloop")


def fewest_replicas(cfg: TuneloopConfig) -> int:
    """Each model's fixed replica count, or its autoscaling minimum; at least one: a model
    that scales to zero starts one with its first request, and it must fit then."""
    return max(1, cfg.serving.min_replicas)


def data_problems(cfg: TuneloopConfig, models: list[str] | None = None, offline: bool = False,
                  joins: str | None = None) -> list[str]:
    """What would fail ``models``' jobs (default: all) only once Ray, and maybe other models'
    jobs, had run: a local seed or golden file that is not there, or a model with no version
    and nothing to train v1 on (no seed, no teacher, no feedback), or a ``base_model`` path
    with nothing there; and, for all models (``run``, ``check-config``), a local Ray's
    ``num_cpus`` too small for a job beside the replicas (which ``run`` would refuse once
    Ray is up). ``offline``: the storage is not opened (`check-config` on a cluster's config,
    whose bucket this machine may not reach), so what needs the registry is not checked."""
    if not offline and (problem := storage_root_problem(cfg.storage.root)):
        return [problem]  # nothing under it can be read
    storage = None if offline else Storage(cfg.storage.root)
    registry = None if storage is None else Registry(storage)
    problems = []
    # run and check-config, where this machine serves (not one joining a remote cluster)
    if not offline and models is None and cfg.ray.address in (None, "local") \
            and (problem := host_problem(cfg.serving.host)):
        problems.append(problem)
    if storage is not None and (problem := storage.conditional_write_problem()):
        problems.append(problem)  # an object store that would lose concurrent updates
    for m in cfg.models:
        if models is not None and m.name not in models:
            continue
        production = registry.production(m.name) if registry else None
        # v1 trains on the seed alone: no feedback to add rows, no teacher to learn from.
        seed_alone = production is None and m.distill is None and storage is not None \
            and not storage.exists(f"feedback/{m.name}") \
            and not any(r.get("model") == m.name for r in pending_records(cfg.storage.journal_path()))
        for key, path in m.dataset_files():
            if not path or "://" in path:
                continue
            if not os.path.exists(path):
                problems.append(f"models.{m.name}.{key} {path!r} does not exist")
            elif key != "seed_dataset" or production is None:  # what the next job reads
                problems.extend(f"models.{m.name}.{key}: {e}"
                                for e in _unreadable(path, None if key == TRANSFER_KEY else m,
                                                     trains_v1_alone=key == "seed_dataset" and seed_alone,
                                                     judges=key == "golden_dataset"))
        base = m.base_model
        if production is None and base and base.startswith(("/", "./", "../", "~")) \
                and not os.path.exists(os.path.expanduser(base)):
            problems.append(f"models.{m.name}.base_model {base!r} is a path, and nothing is there (a Hugging Face "
                            "id reads org/name)")
        elif production is None and base and (problem := not_a_model_folder(os.path.expanduser(base))):
            problems.append(f"models.{m.name}.base_model: {problem}")
        if production is None:
            tcfg, cut = cfg.training_for(m.name), m.distill.student_layers if m.distill else None
            problem = _layers_problem(cfg.model(m.distill.teacher).base_model if cut else base, tcfg.freeze_layers,
                                      tcfg.feature_extraction, cut)
            if problem:
                problems.append(f"model {m.name!r}: {problem}")
        manifest = registry.manifest(m.name, production) if registry and production else None
        if manifest is not None and manifest.task != m.task:
            problems.append(f"model {m.name!r}: its production {production} was trained for {manifest.task}, the "
                            f"config says {m.task}: a new task needs a new model name")
        elif manifest is not None and (dropped := sorted(label_set(m.task, manifest.labels)
                                                         - label_set(m.task, m.labels))):
            problems.append(f"model {m.name!r}: the config drops label(s) {dropped} "
                            f"of its production {production}, whose golden set, replay rows and feedback hold them: "
                            "restore them (labels may be added), or give the new label set a new model name")
        teacher = m.distill.teacher if m.distill else None
        teacher_version = registry.production(teacher) if registry and teacher else None
        if teacher_version and models is not None and teacher not in models and (problem := teacher_labels_problem(
                m.task, m.labels, teacher, teacher_version, registry.manifest(teacher, teacher_version).labels)):
            problems.append(f"model {m.name!r}: {problem}")  # `run` trains the teacher first
        if m.seed_dataset is None and seed_alone:
            problems.append(f"model {m.name!r} has no version yet and nothing to train v1 on: give it a "
                            "seed_dataset (labelled rows: text and label), or send feedback on it first")
    local = cluster_to_join(joins, cfg.ray.address, os.environ.get("RAY_ADDRESS")) is None
    if models is None and cfg.ray.num_cpus is not None and local:
        short = retraining_shortfall(len(cfg.models), fewest_replicas(cfg), cfg.serving.num_cpus_per_replica,
                                     cfg.largest_job_cpus(), cfg.ray.num_cpus)
        if short:
            problems.append(short)
    # A cluster's config (a deploy: section, or checked offline for its bucket) is checked on
    # an operator's machine, whose GPUs are not the cluster's.
    for_here = local and not offline and "deploy" not in cfg.model_fields_set
    if for_here and (short := _local_gpu_shortfall(cfg, models)):
        problems.append(short)
    return problems


def _local_gpu_shortfall(cfg: TuneloopConfig, models: list[str] | None) -> str | None:
    """What the GPUs a local Ray would find here (Ray's own detection, before it starts)
    cannot hold: the replicas and the largest GPU job (``run``: ``models`` None), or the
    largest of ``models``' jobs (``train``, no replicas). ``check-config`` passed ``use_gpu:
    true`` on a machine with none, and ``run`` refused only once Ray was up."""
    s, serving, job = cfg.serving, models is None, cfg.largest_job_gpus(models)
    if not ((s.num_gpus_per_replica if serving else 0) or job) or (gpus := local_gpus()) is None:
        return None
    if serving and (short := serving_shortfall(len(cfg.models), fewest_replicas(cfg), {"GPU": s.num_gpus_per_replica},
                                               {"GPU": gpus})):
        return f"{short} (this machine has {gpus:g} GPU(s))"
    return gpu_retraining_shortfall(len(cfg.models), fewest_replicas(cfg) if serving else 0, s.num_gpus_per_replica,
                                    job, gpus)


def local_gpus() -> float | None:
    """The GPUs Ray finds on this machine (its accelerator manager, as ``ray.init`` counts
    them, within ``CUDA_VISIBLE_DEVICES``); None where that cannot be asked (a Ray without it)."""
    try:  # Ray's own override of what it detects (resource_spec.py), as a local Ray would read it
        override = json.loads(os.environ.get("RAY_OVERRIDE_RESOURCES") or "{}").get("GPU")
    except (ValueError, AttributeError):
        override = None
    if override is not None:
        return float(override)
    try:
        from ray._private.accelerators import get_accelerator_manager_for_resource

        manager = get_accelerator_manager_for_resource("GPU")
        found = manager.get_current_node_num_accelerators()
        visible = manager.get_current_process_visible_accelerator_ids()
    except Exception:  # noqa: BLE001 - a private API of Ray's: where it moved, run's own check after ray.init stays
        return None
    return float(found if visible is None else min(found, len(visible)))


def _layers_problem(base: str | None, freeze_layers: int, feature_extraction: bool,
                    student_layers: int | None) -> str | None:
    """More ``freeze_layers`` than v1's starting model has, or more ``student_layers`` than
    the teacher's base model has (every version of the teacher has its layers), known from
    its config.json when it is on this machine: a local folder or a bundled package. A hub id
    is not looked up (no download before Ray starts). Found by the job, they failed it only
    after Ray, and maybe other models' jobs, had started."""
    from tuneloop.training.recipe import layer_problem

    config = local_config(base)
    return None if config is None else layer_problem(config, freeze_layers, feature_extraction, student_layers)


def _unreadable(path: str, m: ModelConfig | None, trains_v1_alone: bool = False, judges: bool = False) -> list[str]:
    """Why a job could not read ``path`` as ``m``'s data: its format, columns or labels;
    ``m`` None: as a transfer set's texts. ``trains_v1_alone``: a seed that is all v1 would
    train on (no feedback yet), which the job refuses with no row, or with rows of one class
    for a classifier: said only after Ray had started, and the first version been tried.
    ``judges``: a golden_dataset, which with no row judged nothing, every gate saying the model
    had none, and every version scored 0.0 on it."""
    from tuneloop.training.data import read_dataset, read_texts
    from tuneloop.training.job_data import golden_labels_missing

    try:
        if m is not None:
            rows = read_dataset(path, model_task(m))
            if judges and rows.num_rows == 0:
                return [f"dataset {path!r} has no row with visible text: the gate would judge every version on "
                        "nothing (give it labelled rows, or leave golden_dataset out for a sample of the seed)"]
            if trains_v1_alone and rows.num_rows == 0:
                return [f"dataset {path!r} has no row with visible text: nothing to train v1 on (add labelled "
                        "rows, or send feedback on the model first)"]
            classes = sorted(set(rows.column("label").to_pylist())) if "label" in rows.column_names else None
            if trains_v1_alone and classes is not None and len(classes) < 2:
                return [f"dataset {path!r} has rows of {classes} alone: v1 would answer that class to everything "
                        "(give it rows of the other labels, or send feedback on them first)"]
            if trains_v1_alone and classes is not None and (lacking := golden_labels_missing(model_task(m), rows)):
                # Said at the job too, once Ray and maybe other models' jobs had run.
                log.warning("model %s: dataset %s has no row of %s: v1 cannot learn to answer them (add rows of "
                            "them, or feedback later)", m.name, path, lacking)
        elif not read_texts(path):
            return [f"dataset {path!r} has no texts: its text column is empty"]
    except (ValueError, OSError) as e:
        return [str(e)]
    except Exception as e:  # noqa: BLE001 - a row shaped as no task expects: say so, not a traceback
        return [f"dataset {path!r} cannot be read: {type(e).__name__}: {e}"]
    return []


def storage_root_problem(root: str) -> str | None:
    """Why a local ``storage.root`` cannot be tuneloop's folder (None: it can): a file there
    gave a NotADirectoryError naming a file under it, or "cannot read the key file"."""
    path = os.path.expanduser(root)
    if "://" in root or not os.path.exists(path) or os.path.isdir(path):
        return None
    return f"storage.root {root!r} is a file, not a folder: name a folder (created if missing)"


def host_problem(host: str) -> str | None:
    """Why no listener can take ``serving.host`` on this machine (a name that does not resolve,
    an address of no interface here), or None; `check-config` says it as `run` would."""
    problem, _ = _bind_problem(host, 0)
    return f"serving.host {host!r}: {problem}" if problem else None


def check_ports_free(host: str, port: int, local_ray: bool) -> None:
    """Fail fast: otherwise Serve's proxy fails in the background and /readyz would be
    answered by whatever already holds the port. With ``local_ray``, HAProxy's side
    listeners too: a second `tuneloop run` on another port started Ray, then died in a
    35-line traceback of HAProxy's bind."""
    problem, in_use = _bind_problem(host, port)
    if problem:
        raise SystemExit(f"cannot serve on {host}:{port}: {problem}" + (" (another tuneloop run?)" if in_use else ""))
    sides = haproxy_ports() if local_ray else {}
    for var, side in sides.items():
        problem, in_use = _bind_problem("0.0.0.0", side)
        if problem:
            raise SystemExit(f"Ray Serve's HAProxy needs port {side} ({var}): {problem}"
                             + (" (another tuneloop run?)" if in_use else "")
                             + f"; a second server on this machine needs {' and '.join(sides)} set to free ports")


def _bind_problem(host: str, port: int) -> tuple[str | None, bool]:
    """(why a listener cannot take ``host``:``port`` now, whether something listens there);
    (None, False) where it can."""
    with socket.socket() as s:
        # As servers do: connections of a killed predecessor, left in TIME_WAIT, do not
        # hold the port; only a live listener does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return e.strerror or str(e), e.errno == errno.EADDRINUSE
    return None, False
