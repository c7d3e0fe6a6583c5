"""Two jobs with one run.id against one bucket: runs/<id>/lease.json.

A live holder (it renews) makes a second job refuse to start (exit 2) before it touches anything;
a dead holder's lease (not renewed) is waited out and taken over; run.takeover=true takes it at
once and the old holder finds out at its next renewal. Only node 0 holds the lease.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest

from faults import cli_args, run, start, tiny_settings, wait_for_line, write_config
from trainer.io.lease import Lease, LeaseHeld, LeaseLost, lease_key
from trainer.io.storage import open_storage
from trainer.training.launch import kill_tree

QUIET = dict(log=lambda msg: None)


def test_acquire_and_release(tmp_path):
    store = open_storage(str(tmp_path))
    lease = Lease(store, "r", 2, **QUIET).acquire(settle_seconds=0.1)
    held = json.loads(store.read_text(lease_key("r")))
    assert held["owner"] == lease.owner and held["expires_at"] > time.time()
    time.sleep(0.7)  # renewed every seconds/4
    assert json.loads(store.read_text(lease_key("r")))["renewed_at"] > held["renewed_at"]
    lease.release()
    assert not store.exists(lease_key("r"))


def test_a_second_job_refuses_while_the_holder_renews(tmp_path):
    store = open_storage(str(tmp_path))
    holder = Lease(store, "r", 2, **QUIET).acquire(settle_seconds=0.1)
    try:
        start = time.time()
        with pytest.raises(LeaseHeld, match=r"held by .* and that job is alive .*run.takeover=true"):
            Lease(store, "r", 2, **QUIET).acquire(poll_seconds=0.1, settle_seconds=0.1)
        assert time.time() - start < 1.5  # refused at its first renewal, not at expiry
        assert json.loads(store.read_text(lease_key("r")))["owner"] == holder.owner
    finally:
        holder.release()


def test_a_dead_holders_lease_is_waited_out_and_taken(tmp_path):
    store = open_storage(str(tmp_path))
    now = time.time()
    store.write_text(lease_key("r"), json.dumps({"owner": "gone:1:x", "renewed_at": now - 1, "expires_at": now + 1.5}))
    said = []
    start = time.time()
    lease = Lease(store, "r", 2, log=said.append).acquire(poll_seconds=0.1, settle_seconds=0.1)
    assert 1.3 < time.time() - start < 3
    assert any("stopped renewing" in s for s in said)
    assert json.loads(store.read_text(lease_key("r")))["owner"] == lease.owner
    lease.release()


def test_takeover_wins_at_once_and_the_old_holder_learns_it_lost(tmp_path):
    store = open_storage(str(tmp_path))
    old = Lease(store, "r", 2, **QUIET).acquire(settle_seconds=0.1)
    new = Lease(store, "r", 2, **QUIET).acquire(takeover=True, settle_seconds=0.1)
    assert old.lost.wait(timeout=2)  # its next renewal sees the other owner
    with pytest.raises(LeaseLost, match="lost run 'r' to another job"):
        old.check()
    old.release()  # must not delete the new holder's lease
    assert json.loads(store.read_text(lease_key("r")))["owner"] == new.owner
    new.release()


def test_two_jobs_starting_at_the_same_moment_one_wins(tmp_path):
    store = open_storage(str(tmp_path))
    results, go = [], threading.Barrier(2)

    def job():
        go.wait()
        try:
            results.append(Lease(store, "r", 5, **QUIET).acquire(settle_seconds=0.3))
        except LeaseHeld as e:
            results.append(e)

    threads = [threading.Thread(target=job) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if isinstance(r, Lease)]
    assert len(winners) == 1 and isinstance(next(r for r in results if r not in winners), LeaseHeld), results
    winners[0].release()


def test_only_node_0_holds_the_lease(tmp_path, monkeypatch):
    from faults import make_config
    from trainer.job.stages import hold_lease

    monkeypatch.setenv("NODE_RANK", "1")
    assert hold_lease(make_config(tiny_settings("x", str(tmp_path / "b"), str(tmp_path / "w")))) is None
    assert not (tmp_path / "b").exists()


def test_the_cli_refuses_a_second_job_with_exit_2_before_touching_anything(tmp_path):
    bucket = tmp_path / "bucket"
    config = write_config(tmp_path / "c.yaml", tiny_settings(str(tmp_path / "nothing.jsonl"), str(bucket),
                                                              str(tmp_path / "work")))
    store = open_storage(str(bucket))
    holder = Lease(store, "rel", 10, **QUIET).acquire(settle_seconds=0.1)  # "the first job", lease_seconds=10
    try:
        result = run(cli_args("run", f"--config={config}"), timeout=120)
    finally:
        holder.release()
    assert result.returncode == 2, result.stdout[-3000:]
    assert "error: run 'rel' is held by " + holder.owner in result.stdout and "run.takeover=true" in result.stdout
    assert [o.key for o in store.list("")] == []  # nothing pulled, prepared or written (the lease is gone too)


def test_sigterm_while_waiting_for_a_lease_exits_75(tmp_path):
    bucket = tmp_path / "bucket"
    config = write_config(tmp_path / "c.yaml", tiny_settings(str(tmp_path / "nothing.jsonl"), str(bucket),
                                                              str(tmp_path / "work")))
    now = time.time()
    open_storage(str(bucket)).write_text(lease_key("rel"), json.dumps(
        {"owner": "gone:1:x", "renewed_at": now, "expires_at": now + 60}))
    log = tmp_path / "run.log"
    proc = start(cli_args("run", f"--config={config}"), log)
    try:
        assert wait_for_line(log, r"lease: run 'rel' is held by gone:1:x", proc), log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 75, log.read_text()
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert "received signal 15 between stages: exiting with 75" in log.read_text()
