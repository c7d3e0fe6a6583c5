"""A lease left by a dead process on the same host is taken over at once (issue 23): same host name
and its pid gone, or its pid reused by a process started at another time. A live holder, or one on
another host, is still watched and refused, and the refusal names --run.takeover=true."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from trainer.io.lease import Lease, LeaseHeld, holder_dead, lease_key, process_started
from trainer.io.storage import open_storage


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def plant(store, run_id: str, **fields) -> None:
    now = time.time()
    lease = {"owner": "other:1:abc", "host": socket.gethostname(), "pid": os.getpid(),
             "pid_started": process_started(os.getpid()), "acquired_at": now, "renewed_at": now,
             "expires_at": now + 120, **fields}
    store.write_text(lease_key(run_id), json.dumps(lease))


@pytest.mark.parametrize("fields", [
    {"pid": "dead"},  # kill -9: the pid is gone
    {"pid_started": 12345.0},  # the pid lives, but it is another process (started at another time)
])
def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path, fields):
    store = open_storage(str(tmp_path / "bucket"))
    if fields.get("pid") == "dead":
        fields = {"pid": dead_pid()}
    plant(store, "r", **fields)
    logs = []
    start = time.monotonic()
    lease = Lease(store, "r", 120, log=logs.append).acquire(settle_seconds=0.05)
    try:
        assert time.monotonic() - start < 5  # not the 120 s of the lease
        assert any("is gone; taking the run over now" in line for line in logs), logs
        assert json.loads(store.read_text(lease_key("r")))["owner"] == lease.owner
    finally:
        lease.release()


@pytest.mark.parametrize("fields", [{}, {"host": "another-host", "pid": 1}, {"pid_started": None}])
def test_a_live_or_unprovable_holder_is_not_judged_dead(fields):
    lease = {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": process_started(os.getpid()),
             **fields}
    assert not holder_dead(lease)


def test_a_live_holder_is_refused_naming_takeover(tmp_path):
    store = open_storage(str(tmp_path / "bucket"))
    holder = Lease(store, "r", 2.0).acquire(settle_seconds=0.05)
    try:
        with pytest.raises(LeaseHeld, match=r"--run\.takeover=true"):
            Lease(store, "r", 2.0).acquire(poll_seconds=0.2, settle_seconds=0.05)
    finally:
        holder.release()
