"""The worker setup hook quiets loggers by name: each name must still be the module that logs
(a Ray upgrade that moves one would bring its lines back without a word), and only what
the hook means to hide is hidden."""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings

import pytest

from tuneloop.control import worker_setup


@pytest.mark.parametrize("name", sorted(worker_setup.QUIET_LOGGERS))
def test_each_quieted_logger_is_a_module_of_the_installed_ray(name):
    assert importlib.util.find_spec(name) is not None, f"{name} is no longer a module: its lines are back"


def test_the_train_context_logger_is_a_file_of_the_installed_ray():
    import ray

    assert os.path.isfile(os.path.join(os.path.dirname(ray.__file__), *worker_setup.TRAIN_CONTEXT_LOGGER))


def test_info_is_hidden_and_warnings_kept_where_the_hook_says(monkeypatch):
    importlib.import_module("ray.data")  # configures its "ray.data" logger, as in a worker

    for name in worker_setup.QUIET_LOGGERS:
        monkeypatch.setattr(logging.getLogger(name), "level", logging.NOTSET)
    monkeypatch.setattr(os, "environ", dict(os.environ))  # the hook's variables stay in this test
    ours = logging.getLogger("tuneloop")  # and its handler: later tests read tuneloop's lines with caplog
    for attr, value in (("handlers", []), ("level", logging.NOTSET), ("propagate", True)):
        monkeypatch.setattr(ours, attr, value)
    with warnings.catch_warnings():  # and so do its warning filters
        worker_setup.quiet_library_logs()
    # tuneloop's own info lines print in a worker (Ray sets up only its own logger there).
    assert ours.isEnabledFor(logging.INFO) and len(ours.handlers) == 1 and not ours.propagate
    finished = logging.getLogger("ray.data._internal.execution.streaming_executor")
    assert not finished.isEnabledFor(logging.INFO)  # "Dataset ... execution finished"
    assert finished.isEnabledFor(logging.WARNING)
    assert not logging.getLogger("ray.data._internal.progress").isEnabledFor(logging.WARNING)
    assert logging.getLogger("ray.data").isEnabledFor(logging.INFO)  # the rest of Ray Data untouched
