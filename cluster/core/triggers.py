"""When to retrain. Pure: the controller feeds it counts, times and agreements, and hears
which trigger fired (the job record keeps it).

- ``feedback``: ``every_n_feedback`` new records arrived since the last job started;
- ``schedule``: ``interval_s`` passed since the last job started, and there is new feedback
  (a job without any would only replay what it knew);
- ``accuracy_drop``: over production's last ``accuracy_window`` predictions that got
  feedback, the share the users agreed with fell ``accuracy_drop`` below production's
  accuracy on its golden set, and there is new feedback to learn from;
- manual: an admin, the CLI.

One job per model at a time: records that arrive during a job count towards the next one.
"""

from __future__ import annotations

from collections.abc import Sequence

from tuneloop.core.config import TriggerConfig


def online_accuracy(agreements: Sequence[bool]) -> float | None:
    return sum(agreements) / len(agreements) if agreements else None


def which_trigger(cfg: TriggerConfig, *, pending: int, running: bool, now: float, last_started: float | None,
                  agreements: Sequence[bool] = (), golden_accuracy: float | None = None) -> str | None:
    """The trigger that fires now, or None. ``agreements``: whether users agreed with each
    of production's recent predictions that got feedback, oldest first."""
    if running or pending <= 0:
        return None
    if cfg.every_n_feedback and pending >= cfg.every_n_feedback:
        return "feedback"
    if cfg.interval_s is not None and (last_started is None or now - last_started >= cfg.interval_s):
        return "schedule"
    if cfg.accuracy_drop is not None and golden_accuracy is not None and len(agreements) >= cfg.accuracy_window:
        recent = online_accuracy(agreements[-cfg.accuracy_window:])
        # The gate's tolerance on ties: 0.3 - 0.1 is 0.19999999999999998, and a window at
        # exactly 0.2 (40 of 200) did not fire where 0.7 - 0.1 and 0.5 did.
        if recent is not None and recent <= golden_accuracy - cfg.accuracy_drop + 1e-9:
            return "accuracy_drop"
    return None
