"""When to retrain. Pure: the controller feeds it counts and whether a job is running."""

from __future__ import annotations


def should_retrain(pending_feedback: int, every_n_feedback: int, job_running: bool) -> bool:
    """Retrain once ``every_n_feedback`` new records arrived since the last job started.

    ``every_n_feedback == 0`` means manual only. One job per model at a time: records that
    arrive during a job count towards the next one.
    """
    if every_n_feedback <= 0 or job_running:
        return False
    return pending_feedback >= every_n_feedback
