"""Can a training job be scheduled beside what is running, and can serving's replicas be
placed at all? Pure.

Ray Train's worker group waits for its CPUs indefinitely: a job asked for more than the
cluster has free (the serving replicas hold theirs) showed ``running`` forever while nothing
ran. A job therefore checks first and fails fast, saying what to change. Serve waits the
same way for replicas no node can hold: `tuneloop run` gave up after 300 s saying only "not
ready".
"""

from __future__ import annotations

import math

# One CPU beyond the workers'. Jobs fed their workers through Ray Data once, whose tasks
# starved without a CPU of their own; the workers now read the job's tables from the object
# store (training/shards.py), but a student's teacher still scores its rows on Ray Data, and
# a spare CPU keeps Ray's own tasks from waiting on a job that took every one.
DATA_CPUS = 1

RAY_MIN_AMOUNT = 1e-4  # Ray refuses resource amounts finer than this when it places an actor


def custom_resources(v: dict[str, float], key: str, instead: str) -> dict[str, float]:
    """``v`` if it names only custom Ray resources, each a positive amount: CPUs and GPUs
    there would replace (or contradict) the settings made for them."""
    builtin = sorted(name for name in v if name.upper() in ("CPU", "GPU"))
    if builtin:
        raise ValueError(f"{key} {v}: {builtin} are not custom resources; set {instead} instead")
    bad = {name: amount for name, amount in v.items() if not amount >= RAY_MIN_AMOUNT}
    if bad:
        raise ValueError(f"{key} {v}: amounts must be at least {RAY_MIN_AMOUNT:g} (Ray's precision), got {bad}")
    return v


def training_cpus(num_workers: int, cpus_per_worker: float) -> float:
    """The CPUs a job asks Ray for: its workers' and ``DATA_CPUS``."""
    return num_workers * cpus_per_worker + DATA_CPUS


def training_shortfall(num_workers: int, per_worker: dict[str, float], total: dict[str, float],
                       available: dict[str, float]) -> str | None:
    """Why the job cannot start now (None if it can): ``per_worker`` is what each worker asks
    Ray for (``CPU``, ``GPU`` when it uses one, custom resources); ``total`` and ``available``
    are Ray's ``cluster_resources()`` and ``available_resources()``. A shortfall of *free*
    resources says "free": the caller may wait for it."""
    cpus_per_worker = per_worker.get("CPU", 0.0)
    cpus = training_cpus(num_workers, cpus_per_worker)
    have_total, have_free = total.get("CPU", 0.0), available.get("CPU", 0.0)
    if have_total < cpus:
        return (f"training needs {cpus:g} CPUs (training.num_workers={num_workers} x cpus_per_worker="
                f"{cpus_per_worker:g} plus {DATA_CPUS} for Ray Data) but the Ray cluster has {have_total:g}; raise "
                f"ray.num_cpus (a local Ray) or add nodes, or lower training.num_workers or cpus_per_worker")
    if have_free < cpus:
        return (f"training needs {cpus:g} free CPUs but only {have_free:g} of {have_total:g} are free (serving "
                f"replicas hold the rest); raise ray.num_cpus, lower serving.autoscaling.max_replicas or "
                f"training.num_workers")
    gpus_per_worker = per_worker.get("GPU", 0.0)
    if gpus_per_worker:
        gpus = num_workers * gpus_per_worker
        if total.get("GPU", 0.0) < gpus:
            return (f"training.use_gpu needs {gpus:g} GPUs (num_workers={num_workers} x gpus_per_worker="
                    f"{gpus_per_worker:g}) but the Ray cluster has {total.get('GPU', 0.0):g}; lower "
                    f"training.num_workers or gpus_per_worker, add GPU nodes, or set use_gpu: false")
        if available.get("GPU", 0.0) < gpus:
            return (f"training.use_gpu needs {gpus:g} free GPUs but only {available.get('GPU', 0.0):g} are free "
                    f"(serving replicas hold the rest: serving.num_gpus_per_replica); lower it, or "
                    f"training.gpus_per_worker (one worker may take a share of a GPU), or add GPU nodes")
    for name, amount in sorted(per_worker.items()):
        if name in ("CPU", "GPU"):
            continue
        need = num_workers * amount
        if total.get(name, 0.0) < need:
            return (f"training.resources_per_worker asks for {need:g} {name!r} in all, but the Ray cluster offers "
                    f"{total.get(name, 0.0):g}; start nodes with it (ray start --resources) or change the setting")
        if available.get(name, 0.0) < need:
            return f"training needs {need:g} free {name!r} but only {available.get(name, 0.0):g} are free"
    return None


def serving_shortfall(models: int, replicas: int, per_replica: dict[str, float], total: dict[str, float]) -> str | None:
    """Why ``models`` x ``replicas`` (each model's fixed or minimum count) replicas asking
    ``per_replica`` each (``CPU``, ``GPU``, custom resources) can never all be placed on a
    Ray cluster of ``total`` (``cluster_resources()``); None if they can."""
    for name, amount in sorted(per_replica.items()):
        need, have = models * replicas * amount, total.get(name, 0.0)
        if amount and have < need:
            setting = {"CPU": "num_cpus_per_replica", "GPU": "num_gpus_per_replica"}.get(name, "resources_per_replica")
            return (f"serving needs {need:g} {name} ({models} model(s) x {replicas} replica(s) x {amount:g}, "
                    f"serving.{setting}) but the Ray cluster has {have:g}; lower serving.{setting}, "
                    f"serving.num_replicas or autoscaling.min_replicas"
                    + (", or raise ray.num_cpus" if name == "CPU" else ", or add nodes that have it"))
    return None


def local_ray_cpus(cores: int, models: int, replicas: int, cpus_per_replica: float, training: float) -> int:
    """Logical CPUs for a local Ray whose config leaves ``ray.num_cpus`` out: the machine's
    cores, or more where the replicas' minimum and the largest training job need more (Ray's
    CPUs are what it schedules by, not a cap on threads: the shipped config gives 9 on 2
    cores). Detecting the cores alone failed v1 on 2 cores: a job of 2 workers asks for 3."""
    return max(cores, math.ceil(models * replicas * cpus_per_replica + training))


def gpu_retraining_shortfall(models: int, replicas: int, gpus_per_replica: float, training: float,
                             total: float) -> str | None:
    """As ``retraining_shortfall``, for GPUs: replicas holding every GPU left a GPU job
    waiting ``resource_wait_s`` and failing at every retrain after v1."""
    serving = models * replicas * gpus_per_replica
    if not training or serving + training <= total + 1e-9:
        return None
    if total == 0:  # no setting of GPU counts helps: training must leave the GPU
        return ("training.use_gpu is true, but Ray sees no GPU on this machine: set training.use_gpu: false "
                "(and a model's own training: use_gpu, where one sets it), or run on a machine with GPUs")
    return (f"a training job needs {training:g} GPU(s) beside the replicas' {serving:g} ({models} model(s) x "
            f"{replicas} replica(s) x {gpus_per_replica:g}), more than the {total:g} Ray has: lower "
            "serving.num_gpus_per_replica (a share, such as 0.5, lets a replica and a worker use one GPU), "
            "serving.num_replicas or autoscaling.min_replicas, or the largest GPU job's num_workers or "
            "gpus_per_worker")


def retraining_shortfall(models: int, replicas: int, cpus_per_replica: float, training: float,
                         total: float) -> str | None:
    """Why no training job could ever run beside the replicas' fixed or minimum count on a
    Ray of ``total`` CPUs (None if one can): v1 trains before serving starts, but every
    retrain after it would wait and fail."""
    serving = models * replicas * cpus_per_replica
    if serving + training <= total:
        return None
    return (f"a training job needs {training:g} CPUs beside the replicas' {serving:g} ({models} model(s) x "
            f"{replicas} replica(s) x {cpus_per_replica:g}), more than the {total:g} of Ray: raise ray.num_cpus to "
            f"{math.ceil(serving + training)} (or leave it out), or lower serving.num_replicas, "
            f"autoscaling.min_replicas, or the largest job's num_workers or cpus_per_worker (training:, or a "
            f"model's own training:)")
