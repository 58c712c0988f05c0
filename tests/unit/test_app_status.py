"""What `tuneloop run` reads of serve.status() while it waits (cluster/core/names.py): the
applications are deployed together, so an application Serve could not deploy must fail the
wait with Serve's reason, and ready means every one of them runs."""

from __future__ import annotations

from types import SimpleNamespace

from tuneloop.core.names import deploy_failures, not_running


def _app(status: str, message: str = "", **deployments: tuple[str, str]) -> SimpleNamespace:
    return SimpleNamespace(status=status, message=message,
                           deployments={name: SimpleNamespace(status=s, message=m) for name, (s, m) in deployments.items()})


def test_a_failed_application_is_named_with_its_deployments_last_line():
    apps = {"tuneloop": _app("RUNNING"),
            "tuneloop-model-m": _app("DEPLOY_FAILED", "Failed to update the deployments ['model-m'].",
                                     **{"model-m": ("DEPLOY_FAILED", "Traceback (most recent call last):\n  ...\n"
                                                                     "SafetensorError: header too large\n")}),
            "other": _app("DEPLOY_FAILED", "not ours")}
    assert deploy_failures(apps, ["tuneloop", "tuneloop-model-m"]) == [
        "tuneloop-model-m: Failed to update the deployments ['model-m'].; SafetensorError: header too large"]
    assert deploy_failures(apps, ["tuneloop"]) == []


def test_ready_means_every_application_named_runs():
    apps = {"a": _app("RUNNING"), "b": _app("DEPLOYING")}
    assert not_running(apps, ["a"]) == [] and not_running(apps, []) == []
    assert not_running(apps, ["a", "b", "c"]) == ["b (DEPLOYING)", "c (not deployed)"]


def test_empty_messages_add_nothing():
    assert deploy_failures({"x": _app("DEPLOY_FAILED", "", d=("DEPLOY_FAILED", "  \n"))}, ["x"]) == ["x: "]
