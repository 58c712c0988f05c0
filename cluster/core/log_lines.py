"""How tuneloop's own log lines look, and where a process that has no handler for them sends
them: its driver (the CLI), every worker of a local Ray, a Serve replica. Pure: logging alone,
so a Ray worker's setup imports nothing heavier."""

from __future__ import annotations

import logging
from typing import TextIO

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_tuneloop_to(stream: TextIO) -> None:
    """The ``tuneloop`` logger's lines at info on ``stream``, unless it has a handler already;
    not passed on to the root logger, where a library's handler printed them twice."""
    logger = logging.getLogger("tuneloop")
    if logger.handlers:
        return
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
