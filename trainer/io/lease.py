"""A lease on a run id in the bucket, so that two jobs never train the same run at once.

runs/<id>/lease.json names the job that holds the run (owner id, host, pid) and when its lease ends.
The holder renews it in a background thread every quarter of run.lease_seconds. Another job that
finds an unexpired lease watches it: if it is renewed, its holder is alive and the newcomer refuses
to start (LeaseHeld, exit 2); if it runs out unrenewed, its holder died (kill -9, lost machine) and
the newcomer takes it. run.takeover=true takes it at once; the old holder notices at its next
renewal and stops (LeaseLost) instead of writing checkpoints over the new one's.

Object stores have no compare-and-swap that every S3-compatible server supports, so two jobs
starting within the same second can both write the lease; each reads it back after a pause, and
the loser of that race refuses (or, if the race is closer still, stops at its first renewal).
Expiry times are wall-clock seconds: hosts need clocks synchronised to well within the lease.

A holder that is provably dead is taken over at once instead of waited out: the lease names its host,
pid and the process's start time, and a newcomer on the same host whose holder pid is gone (or was
reused by a process started at another time) knows it died (holder_dead). On another host nothing is
provable, so the lease is watched as above.
S3 conditional writes (put_object IfNoneMatch / IfMatch) would make the race a compare-and-swap;
not used yet: S3-compatible servers differ in support (moto 5 implements IfNoneMatch="*" on
put_object), so write-then-settle stays the one protocol.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from trainer.io.storage import Storage, StorageError
from trainer.log import logger


class LeaseHeld(RuntimeError):
    """Another live job holds this run's lease; the message says which and what to do."""


class LeaseLost(LeaseHeld):
    """Another job took this run's lease over while this job was running."""


def lease_key(run_id: str) -> str:
    return f"runs/{run_id}/lease.json"


def process_started(pid: int) -> float | None:
    """The start time of process `pid` (seconds since the epoch), None when there is no such process."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.Error:  # exists but unreadable (another user's): alive as far as we can tell
        return -1.0


def holder_dead(lease: dict) -> bool:
    """True only when the lease's holder provably died: it ran on this host (same host name) and its
    pid is gone, or the pid now belongs to a process started at another time (a reused pid). A lease
    from another host, or one without pid/start time (older versions), is never judged dead here."""
    if lease.get("host") != socket.gethostname() or not isinstance(lease.get("pid"), int):
        return False
    started = process_started(lease["pid"])
    if started is None:
        return True
    want = lease.get("pid_started")
    return isinstance(want, (int, float)) and started >= 0 and abs(started - want) > 1.0


def new_owner() -> str:
    """Unique per job: host, pid and a random suffix (pids repeat across containers)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    """Hold runs/<run_id>/lease.json: acquire(), then a renewing thread until release()."""

    def __init__(self, store: Storage, run_id: str, seconds: float, log=logger.info, owner: str | None = None):
        self.store, self.run_id, self.seconds, self.log = store, run_id, seconds, log
        self.owner = owner or new_owner()
        self.key = lease_key(run_id)
        self.lost = threading.Event()  # set when another job took the lease, or ours ran out
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._expires_at = 0.0

    # reading and writing the object ---------------------------------------------------------
    def read(self) -> dict | None:
        text = self.store.read_text_or_none(self.key)
        if text is None:
            return None
        try:
            lease = json.loads(text)
            float(lease["expires_at"]), str(lease["owner"])
            return lease
        except (ValueError, KeyError, TypeError):
            self.log(f"lease: {self.store.url(self.key)} is not a valid lease; treating it as absent")
            return None

    def _write(self, acquired_at: float) -> None:
        now = time.time()
        self._expires_at = now + self.seconds
        self.store.write_text(self.key, json.dumps({
            "owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
            "pid_started": process_started(os.getpid()), "acquired_at": acquired_at, "renewed_at": now,
            "expires_at": self._expires_at}))

    def describe(self, lease: dict) -> str:
        left = lease["expires_at"] - time.time()
        return (f"run '{self.run_id}' is held by {lease['owner']} (lease {self.store.url(self.key)}, "
                f"{'expires in %.0fs' % left if left > 0 else 'expired'})")

    # the protocol ---------------------------------------------------------------------------
    def acquire(self, takeover: bool = False, poll_seconds: float = 1.0, settle_seconds: float = 1.0) -> "Lease":
        """Take the lease, waiting out a holder that stopped renewing; raise LeaseHeld if it lives."""
        first = None
        while True:
            cur = self.read()
            now = time.time()
            free = cur is None or cur["owner"] == self.owner or cur["expires_at"] <= now
            if not free and holder_dead(cur):
                self.log(f"lease: {self.describe(cur)}, but process {cur['pid']} on this host ({cur['host']}) "
                         f"is gone; taking the run over now")
                free = True
            if free or takeover:
                if cur is not None and not free:
                    self.log(f"lease: taking over ({self.describe(cur)}; run.takeover=true)")
                elif cur is not None and cur["owner"] != self.owner:
                    self.log(f"lease: the previous holder {cur['owner']} stopped renewing; taking the run over")
                break
            if first is None:
                first = cur
                self.log(f"lease: {self.describe(cur)}; waiting: if that job renews it, it is alive and this "
                         f"one refuses to start; if the lease runs out, this job takes the run over (to take "
                         f"it now, knowing the other job is dead: --run.takeover=true)")
            elif cur["owner"] != first["owner"] or cur.get("renewed_at") != first.get("renewed_at"):
                raise LeaseHeld(f"{self.describe(cur)} and that job is alive (it renewed the lease). Only one job may "
                                f"train a run: stop the other job, use another run.id, or set --run.takeover=true")
            time.sleep(max(0.05, min(poll_seconds, cur["expires_at"] - now)))
        self._write(acquired_at=time.time())
        time.sleep(settle_seconds)  # a job that read the lease at the same moment writes it now
        cur = self.read()
        if cur is None or cur["owner"] != self.owner:
            raise LeaseHeld(f"another job took run '{self.run_id}' at the same moment "
                            f"({cur['owner'] if cur else 'and released it'}); not starting a second copy")
        self._thread = threading.Thread(target=self._renew_loop, name="lease", daemon=True)
        self._thread.start()
        self.log(f"lease: holding run '{self.run_id}' as {self.owner} (renewed every {self.seconds / 4:.0f}s)")
        return self

    def renew(self) -> bool:
        """Extend the lease; False (and `lost` set) if another job holds it or ours ran out."""
        cur = self.read()
        if cur is not None and cur["owner"] != self.owner:
            self.log(f"lease: LOST: {cur['owner']} took run '{self.run_id}' over; this job must stop")
            self.lost.set()
            return False
        if time.time() > self._expires_at:
            self.log(f"lease: LOST: could not renew it for {self.seconds:.0f}s; another job may hold the run now")
            self.lost.set()
            return False
        self._write(acquired_at=(cur or {}).get("acquired_at", time.time()))
        return True

    def _renew_loop(self):
        while not self._stop.wait(self.seconds / 4):
            try:
                if not self.renew():
                    return
            except StorageError as e:  # flaky storage: try again next time, until the lease runs out
                self.log(f"lease: renewal failed ({e}); retrying")
                if time.time() > self._expires_at:
                    self.lost.set()
                    return

    def check(self) -> None:
        if self.lost.is_set():
            raise LeaseLost(f"this job lost run '{self.run_id}' to another job (see {self.store.url(self.key)}); "
                            f"stopped without writing further checkpoints")

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours (a rerun then starts at once)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.lost.is_set():
            return
        try:
            cur = self.read()
            if cur is not None and cur["owner"] == self.owner:
                self.store.delete(self.key)
        except StorageError as e:
            self.log(f"lease: could not release it ({e}); it expires in {self.seconds:.0f}s")
