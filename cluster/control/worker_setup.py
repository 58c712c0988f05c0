"""What every Ray worker process of a local tuneloop (`tuneloop run`, `tuneloop train`
without a server) sets up first: Ray's ``worker_process_setup_hook``, named by import path
so workers import this module and, of tuneloop's, only ``core/log_lines.py`` (logging alone).

It keeps library chatter off the console, where an operator reads the job's progress lines
and tuneloop's own log. A first `make run` printed 350 lines for each model's job before
this, 30 of them tuneloop's; the libraries' own log files under the Ray session keep theirs.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from tuneloop.core.log_lines import log_tuneloop_to

HOOK = f"{__name__}.quiet_library_logs"

QUIET_LOGGERS = {
    # Asks the State API once a second whether the train controller still lives; only the
    # dashboard serves that API, and a local Ray here starts without one (a process and
    # ~150 MB on a 2-core machine), so each ask logged a warning: 173 lines in one first
    # `make run`. Its work (removing a placement group a crashed controller left) is a
    # safety net; a controller that ends removes its own.
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
    # "Dataset golden_... execution finished in 0.00 seconds": one line per dataset and
    # epoch, from the split coordinator and from each worker (each scores every evaluation
    # set): 28 of a first `make run`'s 106 lines. Its warnings and errors still show.
    "ray.data._internal.execution.streaming_executor": logging.WARNING,
    # "Progress bars disabled. To enable, set ...": once per process, 9 lines a first
    # `make run`; tuneloop turns them off on purpose (training/launcher.py).
    "ray.data._internal.progress": logging.ERROR,
}
# Ray Train logs each report (the whole metrics dict: a confusion matrix, every golden
# row's verdict) at info, under a logger named by its file's path, which its own
# log_level setting does not reach.
TRAIN_CONTEXT_LOGGER = ("train", "v2", "_internal", "execution", "context.py")

ENVIRONMENT = {
    # The weights-loading bars and the load report that lists the new head's tensors as
    # MISSING (a fresh classifier head: expected at every first job).
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    # Watches for spot-instance preemption, which a local Ray cannot have; its actor logged
    # a core-worker error line at every job.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


class _NotServesBanner(logging.Filter):
    """Serve's controller announces the fast path tuneloop turns on (serving/fast_path.py) in
    eight lines at every start, "Throughput optimized Ray Serve enabled with ...": tuneloop's
    own choice, nothing for an operator to act on. And a process's first Serve handle (a job
    asking the ingress to compact feedback) logged "Started <ray.serve._private.router.
    SharedRouterLongPollClient object at 0x7f...>" at info, in every job."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Throughput optimized Ray Serve enabled")
                    or message.startswith("Started <ray.serve._private.router."))


def quiet_driver_logs() -> None:
    """In a driver (`tuneloop run`, `tuneloop train`), the same library loggers as in its
    workers: `tuneloop train` of a student scores the teacher's rows on Ray Data from the
    driver, which printed "Progress bars disabled. To enable, set ...". And its console
    without the raylet's noise (``console_filter``)."""
    from tuneloop.control.console_filter import quiet_driver_console

    _quiet_libraries()  # the driver saves and loads models too ("Writing model shards" bars)
    quiet_driver_console()


def _quiet_libraries() -> None:
    """The library settings a driver and its workers share: environment, then loggers."""
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)  # a user's own setting wins
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def quiet_library_logs() -> None:
    # tuneloop's own lines in a worker: a job's steps and the gate's verdict (a Ray task of the
    # retrain controller), the controller's and the rollout driver's decisions. Ray sets up only
    # its own logger in a worker, so below WARNING they were dropped: `tuneloop run` showed a
    # job's epoch lines and nothing of what it decided. On stderr, which Ray forwards to the
    # driver's console.
    log_tuneloop_to(sys.stderr)
    _quiet_libraries()
    logging.getLogger("ray.serve").addFilter(_NotServesBanner())
    import ray  # already imported: this runs in a Ray worker

    logging.getLogger(os.path.join(os.path.dirname(ray.__file__), *TRAIN_CONTEXT_LOGGER)).setLevel(logging.WARNING)
    # Libraries' notices about their own deprecated calls (torch.distributed inside
    # DeepSpeed, Ray Data's options): nothing an operator of tuneloop can act on.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
