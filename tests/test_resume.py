"""Resume is tested by equality, on CPU: N steps straight == k steps, a stop or a kill, and a resume to N.

One uninterrupted reference run; then the same config (other run ids, the same bucket, so the
tokenizer and shards are shared) stopped and resumed three ways:
  * in process: preempted (SIGTERM) right after checkpoint k is published, resumed: bitwise equal;
  * `entrypoint.py pretrain` killed with SIGKILL (the whole process tree) once a checkpoint is
    published, rerun: bitwise equal;
  * 2 processes preempted after checkpoint k, resumed on 1 process with the same global batch:
    equal within float tolerance (the all-reduce sums in another order).
"""

import os
import signal
import time

import pytest
import torch

from faults import assert_same
from trainer.config import replace
from trainer.io.storage import open_storage
from trainer.state import protocol

N = 48  # steps in every run: the kill test needs a margin of steps after the first checkpoint
K = 8  # the stop after checkpoint K (checkpoint_every_steps=4)
COMPARED = ("step", "loss", "val_loss", "lr", "grad_norm", "tokens")


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_config):
    """The resume tests' config and bucket, shared by the runs of this module (distinct run ids)."""
    root = tmp_path_factory.mktemp("resume")
    return tiny_config(root, {"train.max_steps": N, "train.warmup_steps": 4})


def run_config(base, run_id: str, **overrides):
    return replace(base, **{"run.id": run_id, **overrides})


def train_in_process(cfg):
    from trainer.job.stages import stage_prepare
    from trainer.training.worker import pretrain_worker as worker

    return worker(cfg, stage_prepare(cfg))


def outcome(cfg, metrics) -> tuple[list[dict], dict]:
    """(the compared fields of every metrics row, the newest checkpoint's weights)."""
    from safetensors.torch import load_file

    store = open_storage(cfg.storage.bucket)
    rows = [{k: r[k] for k in COMPARED if k in r} for r in metrics(store, cfg.run.id)]
    step = protocol.complete_steps(store, cfg.run.id)[0]
    dest = f"{cfg.storage.local_dir}/compare/{cfg.run.id}/model.safetensors"
    store.download_file(f"{protocol.checkpoints_prefix(cfg.run.id)}/{protocol.step_name(step)}/model.safetensors", dest)
    return rows, load_file(dest)


@pytest.fixture(scope="module")
def reference(base, metrics):
    """N steps without interruption, in this process (the same numbers as a subprocess: 1 thread)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = run_config(base, "straight")
        assert train_in_process(cfg)["step"] == N
        rows, weights = outcome(cfg, metrics)
    finally:
        torch.set_num_threads(threads)
        for s, h in saved.items():
            signal.signal(s, h)
    assert [r["step"] for r in rows] == list(range(1, N + 1))
    assert [r["step"] for r in rows if "val_loss" in r] == list(range(4, N + 1, 4))
    return rows, weights


def test_preempted_and_resumed_in_process_is_exact(base, reference, metrics, monkeypatch, single_process):
    cfg = run_config(base, "preempted", **{"checkpoint.upload_async": False})
    real = protocol.publish

    def publish_then_sigterm(store, run_id, local_dir, step):
        url = real(store, run_id, local_dir, step)
        if step == K:  # the preemption notice arrives right after checkpoint K is out
            os.kill(os.getpid(), signal.SIGTERM)
        return url

    with monkeypatch.context() as m:
        m.setattr(protocol, "publish", publish_then_sigterm)
        with pytest.raises(SystemExit) as e:
            train_in_process(cfg)
    assert e.value.code == 75
    store = open_storage(cfg.storage.bucket)
    assert protocol.complete_steps(store, "preempted")[0] == K
    assert [r["step"] for r in metrics(store, "preempted")] == list(range(1, K + 1))
    assert train_in_process(cfg)["step"] == N
    assert_same(outcome(cfg, metrics), reference)


def test_kill_9_after_a_checkpoint_then_rerun_is_exact(base, reference, metrics, cli, tmp_path):
    cfg = run_config(base, "killed")
    store = open_storage(cfg.storage.bucket)
    path = cli.write_config(cfg, tmp_path / "killed.yaml")
    killed_at = cli.kill_after_a_checkpoint(path, {}, tmp_path / "killed.log", store, "killed")
    assert killed_at and killed_at[0] < N, f"the run finished before the kill: {killed_at}"
    # The killed job's lease is still in the bucket, unexpired; taking over instead of waiting it out.
    again = cli.run("pretrain", path, {"run.takeover": "true"})
    assert again.returncode == 0, again.stdout[-6000:]
    assert f"resumed from {protocol.step_name(killed_at[0])}" in again.stdout
    assert_same(outcome(cfg, metrics), reference)



def test_two_processes_then_one_with_the_same_global_batch(base, reference, metrics, cli, tmp_path, single_process,
                                                           caplog):
    cfg = run_config(base, "shrunk", **{"checkpoint.upload_async": False})
    store = open_storage(cfg.storage.bucket)
    env = cli.sigterm_after_checkpoint_env(K, tmp_path)
    two = cli.run("pretrain", cli.write_config(cfg, tmp_path / "shrunk.yaml"), {"train.nproc": 2}, env=env)
    assert two.returncode == 75, two.stdout[-6000:]  # preempted after a clean checkpoint
    assert "on 2 x cpu" in two.stdout and f"stopped at step {K}" in two.stdout
    assert protocol.complete_steps(store, "shrunk")[0] == K
    caplog.clear()
    assert train_in_process(cfg)["step"] == N  # the rest on one process
    assert f"resumed from step-{K:08d} (saved by 2 process(es), now 1)" in caplog.text
    assert_same(outcome(cfg, metrics), reference, exact=False)
