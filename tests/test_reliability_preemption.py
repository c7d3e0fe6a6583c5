"""Preemption: SIGTERM to `entrypoint.py run` (which passes it to torchrun) or to torchrun itself.

Every rank stops at the same step boundary, the checkpoint of that step is published (manifest,
then LATEST) within train.grace_seconds, the uploader drains, and `run` exits 75 although torchrun
itself exits 1 (it counts workers that exit 75 as failed); a rerun resumes from that step.
"""

from __future__ import annotations

import re
import signal
import time

import psutil

from faults import cli_args, copy_bucket, start, template, tiny_settings, wait_for_line, write_config  # noqa: F401
from trainer.errors import EXIT_PREEMPTED
from trainer.io.storage import open_storage
from trainer.state import protocol
from trainer.training.launch import kill_tree

GRACE_S = 15


def preempt(tmp_path, template, nproc: int, target: str) -> tuple[dict, str, float]:
    """Start `run`, SIGTERM `target` ("run" or "torchrun") once training logs a step, wait for
    the exit. Returns (settings, log text, seconds from the signal to the exit)."""
    bucket = copy_bucket(template, tmp_path / "bucket")
    settings = tiny_settings(template["corpus"], str(bucket), str(tmp_path / "work"), **{
        "train.max_steps": 5000, "train.checkpoint_every_steps": 1000, "train.nproc": nproc,
        "train.grace_seconds": GRACE_S})
    config = write_config(tmp_path / "run.yaml", settings)
    log = tmp_path / "run.log"
    proc = start(cli_args("run", f"--config={config}"), log)
    try:
        assert wait_for_line(log, r"step \d+/\d+ loss", proc), log.read_text()[-3000:]
        victim = psutil.Process(proc.pid)
        if target == "torchrun":
            victim = next(p for p in victim.children() if "torch.distributed.run" in " ".join(p.cmdline()))
        signalled = time.time()
        victim.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=GRACE_S + 30)
        took = time.time() - signalled
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    text = log.read_text()
    assert code == EXIT_PREEMPTED, text[-3000:]
    return settings, text, took


def assert_published_at_the_stop_step(settings: dict, text: str, nproc: int) -> int:
    stops = re.findall(r"rank (\d+): stopped at step (\d+) after a signal \(([\d.]+)s to publish", text)
    assert sorted(int(r) for r, _, _ in stops) == list(range(nproc)), text[-3000:]
    steps = {int(s) for _, s, _ in stops}
    assert len(steps) == 1, f"ranks stopped at different steps: {stops}"  # one step boundary for all
    step = steps.pop()
    assert all(float(t) < GRACE_S for _, _, t in stops)
    store = open_storage(settings["storage.bucket"])
    assert protocol.complete_steps(store, "rel")[0] == step
    latest = store.read_text(f"{protocol.checkpoints_prefix('rel')}/{protocol.LATEST}")
    assert latest.strip() == protocol.step_name(step)
    state = store.read_text(f"{protocol.checkpoints_prefix('rel')}/{protocol.step_name(step)}/trainer_state.json")
    assert f'"world_size": {nproc}' in state
    assert not store.exists("runs/rel/lease.json")  # released: the rerun starts at once
    assert "preempted; checkpoint" in text and "LATEST names it" in text
    return step


def test_sigterm_to_run_publishes_a_checkpoint_exits_75_and_the_rerun_resumes(tmp_path, template):
    settings, text, took = preempt(tmp_path, template, nproc=1, target="run")
    step = assert_published_at_the_stop_step(settings, text, nproc=1)
    assert took < GRACE_S

    # The rerun (same command; fewer steps so that it ends soon) resumes from that checkpoint.
    config = write_config(tmp_path / "rerun.yaml", {**settings, "train.max_steps": step + 4})
    log = tmp_path / "rerun.log"
    proc = start(cli_args("run", f"--config={config}"), log)
    assert proc.wait(timeout=240) == 0, log.read_text()[-3000:]
    rerun = log.read_text()
    assert f"resumed from {protocol.step_name(step)}" in rerun
    store = open_storage(settings["storage.bucket"])
    assert protocol.complete_steps(store, "rel")[0] == step + 4 and store.exists(f"runs/rel/final/{protocol.MANIFEST}")


def test_sigterm_to_torchrun_stops_both_ranks_at_one_step_and_run_exits_75(tmp_path, template):
    settings, text, took = preempt(tmp_path, template, nproc=2, target="torchrun")
    assert_published_at_the_stop_step(settings, text, nproc=2)
    # torchrun itself failed (exit 1), but `run` reports the clean stop without torchrun's traceback.
    assert "SignalException" not in text and "Traceback" not in text
    assert "torchrun stopped its workers after signal 15 (traceback omitted)" in text
