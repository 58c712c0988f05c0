"""Unit tests never start Ray: any attempt fails the test at once, and so does running one
while a Ray is up in the process (an integration session's, when both run in one pytest:
`make test` runs the unit tests first)."""

import pytest


@pytest.fixture(autouse=True)
def _forbid_ray_init(monkeypatch):
    try:
        import ray
    except ImportError:
        return

    def _refuse(*args, **kwargs):
        raise AssertionError("unit tests must not start Ray; move this test to tests/integration")

    if ray.is_initialized():
        raise AssertionError("a Ray is up in this process: run tests/unit before tests/integration")
    monkeypatch.setattr(ray, "init", _refuse)
