"""kill -9 at random moments and at chosen points, against the loopback S3 server.

A chain of job processes on one run.id, each SIGKILLed (a random 0-250 ms after its start of
training or its first or second metrics line, a checkpoint being staged and uploaded right after
each such line; or at an exact point: while staging a checkpoint, after one of its files is uploaded, between its
manifest and LATEST, inside an optimizer step), then a last one left to finish. After every kill:
each checkpoint with a manifest verifies file by file, LATEST names one of them, and the next
process resumes from the newest. At the end, the weights and every logged loss equal those of an
uninterrupted run of the same config.
"""

from __future__ import annotations

import os
import random
import signal
import time

from faults import (  # noqa: F401
    S3_ENV,
    Zygote,
    assert_bucket_consistent,
    checkpoint_tensors,
    losses,
    make_config,
    s3_prefix,
    s3_server,
    subprocess_env,
    template,
    tiny_settings,
    upload_bucket,
    wait_for_line,
    worker_args,
    write_config,
)
from trainer.io.storage import open_storage
from trainer.state import protocol

RANDOM_TRIALS = int(os.environ.get("RELIABILITY_KILL_TRIALS", "10"))
SEED = int(os.environ.get("RELIABILITY_SEED", "2024"))
MAX_DELAY_S = 0.25  # after the line; 30-100 steps/s here, a checkpoint every 4 steps
POINTS = [("staging", 3), ("upload", 7), ("before-latest", 2), ("optimizer-step", 9)]
MAX_STEPS = 128


def test_kill_9_anywhere_then_resume_equals_an_uninterrupted_run(template, s3_server, tmp_path):
    url = s3_prefix()
    settings = tiny_settings(template["corpus"], url, str(tmp_path / "work"), s3_server, **{
        "train.max_steps": MAX_STEPS, "train.checkpoint_every_steps": 4, "train.log_every_steps": 4,
        "checkpoint.keep_last": 2})
    store = open_storage(url, make_config(settings).storage)
    upload_bucket(template, store)
    straight = worker_args(write_config(tmp_path / "straight.yaml", {**settings, "run.id": "straight"}), template,
                           tmp_path)
    killed = worker_args(write_config(tmp_path / "killed.yaml", {**settings, "run.id": "killed"}), template,
                         tmp_path)
    rng = random.Random(SEED)
    trials = [None] * RANDOM_TRIALS + POINTS
    rng.shuffle(trials)
    zygote = Zygote(env=subprocess_env(**S3_ENV))
    outcomes = []
    try:
        pid = zygote.spawn(straight, tmp_path / "straight.log")
        assert zygote.wait(pid) == 0, (tmp_path / "straight.log").read_text()[-3000:]

        for i, point in enumerate(trials):
            before = assert_bucket_consistent(store, "killed", tmp_path / "verify")
            log = tmp_path / f"trial-{i:02d}.log"
            if point is None:
                pid = zygote.spawn(killed, log)
                step_line = r"step \d+/\d+ loss"
                after = rng.choice([(r"pretrain: [\d.]+M params", 1), (step_line, 1), (step_line, 2)])
                wait_for_line(log, *after[:1], pid, count=after[1])
                time.sleep(rng.uniform(0, MAX_DELAY_S))
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            else:
                pid = zygote.spawn(killed, log, kill=point)
            code = zygote.wait(pid)
            text = log.read_text()
            assert code in (-signal.SIGKILL, 0), text[-3000:]
            resumed = f"resumed from {protocol.step_name(before)}" if before else "starting from scratch"
            assert resumed in text, text[-3000:]
            after = assert_bucket_consistent(store, "killed", tmp_path / "verify")
            latest = store.read_text_or_none(f"{protocol.checkpoints_prefix('killed')}/{protocol.LATEST}")
            outcomes.append((point[0] if point else "random", code, before, after, latest))
            if point and point[0] == "before-latest" and code != 0:
                assert latest is None or latest.strip() != protocol.step_name(after)  # the window was hit

        pid = zygote.spawn(killed, tmp_path / "last.log")
        assert zygote.wait(pid) == 0, (tmp_path / "last.log").read_text()[-3000:]
    finally:
        zygote.close()
    print("\n".join(f"{kind:15s} exit {code:3d}  resumed from {before}  newest after {after}  LATEST {latest}"
                    for kind, code, before, after, latest in outcomes))
    kills = sum(code == -signal.SIGKILL for _, code, *_ in outcomes)
    assert kills >= RANDOM_TRIALS // 2 + len(POINTS), outcomes  # the run did not just finish early
    assert all(code == -signal.SIGKILL for kind, code, *_ in outcomes if kind != "random"), outcomes

    assert assert_bucket_consistent(store, "killed", tmp_path / "verify") == MAX_STEPS
    want = checkpoint_tensors(store, "straight", MAX_STEPS, tmp_path)
    got = checkpoint_tensors(store, "killed", MAX_STEPS, tmp_path)
    assert want.keys() == got.keys()
    assert all((want[k] == got[k]).all() for k in want), "final weights differ from the uninterrupted run"
    assert losses(store, "killed") == losses(store, "straight")
    assert sorted(losses(store, "killed")) == list(range(4, MAX_STEPS + 1, 4))
