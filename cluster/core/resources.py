"""Can a training job be scheduled beside what is running? Pure.

Ray Train's worker group waits for its CPUs indefinitely: a job asked for more than the
cluster has free (the serving replicas hold theirs) showed ``running`` forever while nothing
ran. A job therefore checks first and fails fast, saying what to change.
"""

from __future__ import annotations

# Ray Data's read and map tasks need a CPU of their own beside the workers while the
# datasets stream in; without it ingestion starves and the workers wait on it.
DATA_CPUS = 1


def training_shortfall(num_workers: int, use_gpu: bool, total: dict[str, float],
                       available: dict[str, float]) -> str | None:
    """Why the job cannot start now (None if it can): ``total`` and ``available`` are Ray's
    ``cluster_resources()`` and ``available_resources()``."""
    cpus = num_workers + DATA_CPUS
    have_total, have_free = total.get("CPU", 0.0), available.get("CPU", 0.0)
    if have_total < cpus:
        return (f"training needs {cpus:g} CPUs (training.num_workers={num_workers} plus {DATA_CPUS} for Ray Data) "
                f"but the Ray cluster has {have_total:g}; raise ray.num_cpus (a local Ray) or add nodes, "
                f"or lower training.num_workers")
    if have_free < cpus:
        return (f"training needs {cpus:g} free CPUs but only {have_free:g} of {have_total:g} are free (serving "
                f"replicas hold the rest); raise ray.num_cpus, lower serving.autoscaling.max_replicas or "
                f"training.num_workers")
    if use_gpu:
        if total.get("GPU", 0.0) < num_workers:
            return (f"training.use_gpu needs {num_workers} GPUs (one per worker) but the Ray cluster has "
                    f"{total.get('GPU', 0.0):g}; lower training.num_workers or set use_gpu: false")
        if available.get("GPU", 0.0) < num_workers:
            return (f"training.use_gpu needs {num_workers} free GPUs but only {available.get('GPU', 0.0):g} are "
                    f"free (serving replicas hold the rest); lower serving.num_gpus_per_replica or "
                    f"training.num_workers")
    return None
