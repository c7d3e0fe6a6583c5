"""Exit codes of every command and worker, in one place (docs/reliability.md explains them).

Launchers (Kubernetes, SkyPilot, docker restart policies) retry exit 1 and 75 and must not retry 2:
  0  done;
  1  anything else (a crash, storage still failing after its retries): retrying may help;
  2  bad config or input, or another live job holds run.id: fix it, retrying cannot help;
  75 EX_TEMPFAIL (BSD sysexits.h): stopped by a signal after publishing a checkpoint; rerun the same
     command to resume.
"""

from __future__ import annotations

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
