"""The tasks tuneloop serves and trains, by the config's ``task`` name.

Every module of this package that defines a ``Task`` subclass with a ``name`` adds that
task: adding one (token classification, say) is a new module here, and its tests.
"""

from __future__ import annotations

import importlib
import pkgutil

from tuneloop.core.tasks.base import (ColumnType, ListOf, MapOf, StructOf, Task, check_text_length, check_unicode,
                                      has_visible_text)


def _discover() -> dict[str, type[Task]]:
    found: dict[str, type[Task]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Task) and "name" in vars(value):
                found[value.name] = value
    return found


TASKS: dict[str, type[Task]] = _discover()


def make_task(name: str, labels: list[str], **options) -> Task:
    """The task ``name`` for ``labels``, with its ``options`` (``Task.options``; others are ignored)."""
    try:
        cls = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; tuneloop knows {sorted(TASKS)}") from None
    return cls(labels, **{k: v for k, v in options.items() if k in cls.options})


def label_set(task: str, labels: list[str]) -> frozenset[str]:
    """The labels of a model of ``task``, as a config names them, whichever way ``labels``
    writes them: the entity types ``[PER, LOC]`` and their BIO tags ``[O, B-PER, I-PER,
    B-LOC, I-LOC]`` are one set. Compare label lists of a config and a version with it."""
    return frozenset(make_task(task, list(labels)).label_names())


def teacher_labels_problem(task: str, labels: list[str], teacher: str, version: str,
                           teacher_labels: list[str]) -> str | None:
    """Why a student of ``labels`` cannot learn from ``teacher``'s ``version`` answering
    ``teacher_labels`` (labels added to both in the config, the teacher not trained on them
    yet), or None."""
    if label_set(task, labels) == label_set(task, teacher_labels):
        return None
    return (f"its teacher {teacher}'s production {version} answers {sorted(label_set(task, teacher_labels))}, the "
            f"config gives the student {sorted(label_set(task, labels))}: distillation needs the same labels; "
            f"train the teacher on them first (tuneloop train {teacher})")


def model_task(m) -> Task:
    """A configured model's task (``m``: a ModelConfig, or its dump)."""
    get = m.get if isinstance(m, dict) else lambda k, default=None: getattr(m, k, default)
    cls = TASKS.get(get("task"))
    options = {k: get(k) for k in (cls.options if cls else ()) if get(k) is not None}
    return make_task(get("task"), get("labels"), **options)


def model_tasks(models) -> dict[str, Task]:
    """Each configured model's task, by model name (``models``: the config's ModelConfigs)."""
    return {m.name: model_task(m) for m in models}


__all__ = ["TASKS", "ColumnType", "ListOf", "MapOf", "StructOf", "Task", "check_text_length", "check_unicode",
           "has_visible_text", "label_set", "make_task", "model_task", "model_tasks", "teacher_labels_problem"]
