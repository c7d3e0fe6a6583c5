"""One rank-aware logger for the whole package: `from trainer.log import logger`.

Rank 0 (of each job) logs at INFO, the other ranks at WARNING, so a line appears once however many
processes run. Lines go to stderr as `[HH:MM:SS] message`. Nothing is configured at import time:
entry points call setup_logging() once.
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("trainer")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the call (test runners swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(rank: int | None = None) -> None:
    """Configure the "trainer" logger for this process (idempotent). rank: this process's global
    rank (default: $RANK, 0 when unset)."""
    rank = int(os.environ.get("RANK", "0") or 0) if rank is None else rank
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if not any(getattr(h, "_trainer", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
        handler._trainer = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
