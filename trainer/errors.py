"""Exit codes of every command and worker, in one place (docs/reliability.md explains them).

Launchers (Kubernetes, SkyPilot, docker restart policies) retry exit 1 and 75 and must not retry 2:
  0  done;
  1  anything else (a crash, storage still failing after its retries): retrying may help;
  2  bad config or input, or another live job holds run.id: fix it, retrying cannot help;
  75 EX_TEMPFAIL (BSD sysexits.h): stopped by a signal after publishing a checkpoint; rerun the same
     command to resume.
A signal becomes exit 75 through Preempted: stop_on_signals raises it at once, signals_held after
the block it guards (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable

from trainer.log import logger

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
PREEMPTED_MARKER = "preempted.json"  # <local_dir>/runs/<id>/: the workers' final checkpoint is published


class Preempted(SystemExit):
    """Raised where a signal stops the job cleanly (after a published checkpoint, or between stages)."""

    def __init__(self):
        super().__init__(EXIT_PREEMPTED)


def stop_on_signals(say: Callable[[int], str]) -> Callable[[], None]:
    """From now on SIGTERM and SIGINT log `say(signum)` (a warning) and raise Preempted (exit 75) in
    the main thread, where Python runs signal handlers: at once when it waits (a child process, a
    queue, a lock: every wait there wakes for a handler), at the next bytecode otherwise. Returns a
    function that puts the previous handlers back. Called off the main thread it changes nothing
    (signal.signal works in the main thread only). Whoever catches Preempted cleans up in `finally`
    (kill the workers or the child): prepare_pool's units and the tokenizer's training use it."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def stop(signum, frame):
        logger.warning(say(signum))
        raise Preempted()

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    return lambda: [signal.signal(s, h) for s, h in old.items()]


@contextlib.contextmanager
def signals_held(say: Callable[[int], str]):
    """Inside the block, SIGTERM and SIGINT are remembered, not acted on; when the block has run to
    its end and one came, log `say(signum)` and raise Preempted (exit 75). For work that must not be
    cut in half and ends well within the grace (publishing a tokenizer that is already trained: a
    few MB). A stop_on_signals inside the block acts at once until it puts this handler back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: came.append(signum)) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if came:
        logger.warning(say(came[0]))
        raise Preempted()
