"""The loop's guarantees, once for each stage that uses them (pretraining and SFT), in this process.

Faults go in through the loop's seam, not by patching torch: FaultyTask wraps a stage's Task and
scales its training loss by `factor` (NaN, or 50x for a spike) in chosen optimizer steps, and can
send SIGTERM while a chosen step runs. Steps are counted by the loop's one call of
task.targets_in_step() per optimizer step, 1-based from this process's first step.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from faults import SFT_SAMPLE, chat_model, copy_bucket, in_process, make_config, sft_config, template, tiny_settings  # noqa: F401
from trainer.data.conversations import load_chat_tokenizer, prepare_conversations
from trainer.errors import EXIT_PREEMPTED, PREEMPTED_MARKER, Preempted
from trainer.io.artifacts import Artifacts
from trainer.io.storage import open_storage
from trainer.state import protocol
from trainer.training.tasks import SftTask
from trainer.training.worker import pretrain_task, run_task

STAGES = ("pretrain", "sft")


class FaultyTask:
    """A Task that behaves like `task` except in the steps named: loss x factor, or a SIGTERM."""

    def __init__(self, task, bad_steps=(), factor=float("nan"), sigterm_at=None):
        self.task, self.bad_steps, self.factor, self.sigterm_at = task, set(bad_steps), factor, sigterm_at
        self.step = 0

    def __getattr__(self, name):
        return getattr(self.task, name)

    def targets_in_step(self, position: int) -> int:
        self.step += 1
        if self.step == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.task.targets_in_step(position)

    def loss_module(self, model):
        return _FaultyLoss(self.task.loss_module(model), self)


class _FaultyLoss(torch.nn.Module):
    def __init__(self, inner, owner: FaultyTask):
        super().__init__()
        self.inner, self.owner = inner, owner

    def forward(self, batch):
        loss = self.inner(batch)
        if torch.is_grad_enabled() and self.owner.step in self.owner.bad_steps:
            return loss * self.owner.factor
        return loss


@pytest.fixture
def stage_run(request, template, chat_model, tmp_path, in_process):
    """run(root, overrides, **faults) -> (final state, store, run id) for the stage in request.param:
    16 steps, a checkpoint every 4, a log line every 4, uploads in the foreground."""
    stage = request.param

    def run(root, overrides=None, **faults):
        overrides = overrides or {}
        if stage == "pretrain":
            settings = tiny_settings(template["corpus"], str(root / "bucket"), str(root / "work"),
                                     **{"train.max_steps": 16, "train.log_every_steps": 4,
                                        "train.checkpoint_every_steps": 4, "checkpoint.keep_last": 10,
                                        "checkpoint.upload_async": False, **overrides})
            if not (root / "bucket").exists():
                copy_bucket(template, root / "bucket")
            cfg = make_config(settings)
            arts = Artifacts(template["tokenizer_key"], template["data_key"])
            make, run_id = (lambda: pretrain_task(cfg, arts)), "rel"
        else:
            sft_over = {"sft.max_steps": 16, "sft.checkpoint_every_steps": 4, "train.log_every_steps": 4,
                        "checkpoint.keep_last": 10, "checkpoint.upload_async": False}
            for k, v in overrides.items():  # the tests name train.*; SFT has its own length and checkpoints
                sft_over[{"train.max_steps": "sft.max_steps",
                          "train.checkpoint_every_steps": "sft.checkpoint_every_steps"}.get(k, k)] = v
            cfg = sft_config(root, chat_model, [SFT_SAMPLE], **sft_over)
            data_dir = prepare_conversations(cfg, load_chat_tokenizer(chat_model), 256)
            make, run_id = (lambda: SftTask(cfg, data_dir, chat_model)), "base-sft"
        state = run_task(cfg, lambda: FaultyTask(make(), **faults))
        return state, open_storage(cfg.storage.bucket), run_id

    run.stage = stage
    return run


def metrics(store, run_id) -> list[dict]:
    return [json.loads(line) for line in store.read_text(f"runs/{run_id}/metrics.jsonl").splitlines()]


def assert_no_checkpoint_holds_a_nan(store, run_id, tmp_path) -> list[int]:
    from safetensors.torch import load_file

    steps = protocol.complete_steps(store, run_id)
    for step in steps:
        d = protocol.fetch_verified(store, run_id, step, tmp_path / "check" / str(step))
        assert all(torch.isfinite(t).all() for t in load_file(str(d / "model.safetensors")).values())
        opt = torch.load(d / "optimizer.pt", weights_only=False)
        states = [s for key, o in opt.items() if key != "format" for s in o["state"].values()]  # by parameter name
        assert states and all(torch.isfinite(v).all() for s in states for v in s.values() if v.is_floating_point())
    return steps


@pytest.mark.parametrize("stage_run", STAGES, indirect=True)
def test_skip_leaves_skipped_steps_out_of_the_logged_loss(stage_run, tmp_path):
    """Drift 1 (SFT logged `loss: nan` after a skipped first step): a skipped step's loss is not in
    the logged mean, on every stage."""
    state, store, run_id = stage_run(tmp_path, {"train.log_every_steps": 2}, bad_steps={1, 6})
    rows = metrics(store, run_id)
    assert [r["step"] for r in rows] == list(range(2, 17, 2))
    assert all(r["loss"] == r["loss"] for r in rows)  # no NaN
    assert [r["skipped_steps"] for r in rows] == [1, 1, 2, 2, 2, 2, 2, 2] and state["skipped_steps"] == 2
    assert assert_no_checkpoint_holds_a_nan(store, run_id, tmp_path) == [16, 12, 8, 4]


@pytest.mark.parametrize("stage_run", STAGES, indirect=True)
def test_fail_is_judged_before_every_checkpoint(stage_run, tmp_path):
    """Drift 2 (SFT published step 2, then raised at its log step 4): the window is judged before a
    checkpoint, so a failed one never reaches the bucket."""
    with pytest.raises(FloatingPointError, match=r"1 step\(s\) with a non-finite loss or gradient before step 2 "
                                                 r"\(train.on_nonfinite=fail\)"):
        stage_run(tmp_path, {"train.on_nonfinite": "fail", "train.log_every_steps": 4,
                             "train.checkpoint_every_steps": 2}, bad_steps={1})
    run_id = "rel" if stage_run.stage == "pretrain" else "base-sft"
    assert protocol.complete_steps(open_storage(str(tmp_path / "bucket")), run_id) == []


@pytest.mark.parametrize("stage_run", STAGES, indirect=True)
def test_rollback_reloads_the_last_checkpoint_and_skips_the_window(stage_run, tmp_path, caplog):
    state, store, run_id = stage_run(tmp_path, {"train.on_nonfinite": "rollback"}, bad_steps={6})
    assert "rolled back from step 8 to step-00000004 after 1 step(s) with a non-finite loss" in caplog.text
    assert state["rollbacks"] == 1 and state["step"] == 16
    folder = f"{protocol.checkpoints_prefix(run_id)}/{protocol.step_name(16)}"
    saved = json.loads(store.read_text(f"{folder}/trainer_state.json"))
    per_step = 8 if stage_run.stage == "pretrain" else 4
    assert saved["data_position"] == (16 + 4) * per_step and saved["rollbacks"] == 1  # steps 5-8's data skipped
    assert [r["step"] for r in metrics(store, run_id)] == [4, 8, 8, 12, 16]
    assert assert_no_checkpoint_holds_a_nan(store, run_id, tmp_path) == [16, 12, 8, 4]


@pytest.mark.parametrize("stage_run", STAGES, indirect=True)
def test_rollback_on_a_loss_spike(stage_run, tmp_path, caplog):
    state, store, run_id = stage_run(tmp_path, {"train.on_nonfinite": "rollback", "train.spike_factor": 3.0},
                                     bad_steps={10}, factor=50.0)
    assert "rolled back from step 12 to step-00000008 after a loss spike" in caplog.text
    assert state["spikes"] == 1 and state["rollbacks"] == 1 and state["step"] == 16


@pytest.mark.parametrize("stage_run", STAGES, indirect=True)
def test_rollback_with_no_checkpoint_yet_fails(stage_run, tmp_path):
    with pytest.raises(FloatingPointError, match="no checkpoint to roll back to yet"):
        stage_run(tmp_path, {"train.on_nonfinite": "rollback"}, bad_steps={2})


@pytest.mark.parametrize("stage_run", STAGES, indirect=True)
def test_sigterm_publishes_the_step_exits_75_and_resumes_exactly(stage_run, tmp_path):
    """SIGTERM while step 6 runs: the step finishes, step 6 is published, Preempted (exit 75), the
    marker for the launcher is written and the signal handlers are back; the rerun ends equal, bit
    for bit, to a run that was never stopped."""
    from safetensors.torch import load_file

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(Preempted) as e:
        stage_run(tmp_path / "stopped", {"train.log_every_steps": 2}, sigterm_at=6)
    assert e.value.code == EXIT_PREEMPTED
    assert {s: signal.getsignal(s) for s in before} == before
    run_id = "rel" if stage_run.stage == "pretrain" else "base-sft"
    store = open_storage(str(tmp_path / "stopped" / "bucket"))
    assert protocol.complete_steps(store, run_id)[0] == 6
    assert json.loads((tmp_path / "stopped" / "work" / "runs" / run_id / PREEMPTED_MARKER).read_text())["step"] == 6
    resumed, _, _ = stage_run(tmp_path / "stopped", {"train.log_every_steps": 2})
    straight, straight_store, _ = stage_run(tmp_path / "straight", {"train.log_every_steps": 2})
    assert resumed["step"] == straight["step"] == 16 and {s: signal.getsignal(s) for s in before} == before

    def final(root):
        d = protocol.fetch_verified(open_storage(str(root / "bucket")), run_id, 16, root / "final")
        return load_file(str(d / "model.safetensors"))

    a, b = final(tmp_path / "stopped"), final(tmp_path / "straight")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    compared = ("step", "loss", "lr", "grad_norm", "tokens")
    assert [{k: r.get(k) for k in compared} for r in metrics(store, run_id)] == \
        [{k: r.get(k) for k in compared} for r in metrics(straight_store, run_id)]


@pytest.mark.parametrize("stage_run", STAGES, indirect=True)
def test_metrics_do_not_depend_on_a_preemption_between_log_steps(stage_run, tmp_path):
    """Issue 23: SIGTERM while step 5 runs (log every 2: the window of steps 5-6 is open): the
    checkpoint carries the window, so the resumed run logs step 6's loss over steps 5 and 6 and its
    metrics rows equal an uninterrupted run's (before, the window restarted at the resume)."""
    with pytest.raises(Preempted):
        stage_run(tmp_path / "stopped", {"train.log_every_steps": 2}, sigterm_at=5)
    run_id = "rel" if stage_run.stage == "pretrain" else "base-sft"
    store = open_storage(str(tmp_path / "stopped" / "bucket"))
    saved = json.loads(store.read_text(f"{protocol.checkpoints_prefix(run_id)}/{protocol.step_name(5)}/"
                                       "trainer_state.json"))
    assert saved["window"]["start_step"] == 4 and saved["window"]["skipped"] == 0
    stage_run(tmp_path / "stopped", {"train.log_every_steps": 2})
    _, straight_store, _ = stage_run(tmp_path / "straight", {"train.log_every_steps": 2})
    compared = ("step", "loss", "lr", "grad_norm", "tokens", "skipped_steps")
    rows = [{k: r.get(k) for k in compared} for r in metrics(store, run_id)]
    assert [r["step"] for r in rows] == list(range(2, 17, 2))
    assert rows == [{k: r.get(k) for k in compared} for r in metrics(straight_store, run_id)]


def test_a_wall_clock_budget_fixes_the_step_count_and_a_resume_ends_at_it(template, tmp_path, in_process, caplog):
    """train.budget_minutes: the count is fixed after the timed warm-up steps, the schedule decays to
    it (the last logged lr is the floor), and a run stopped after that ends at the same step."""
    from trainer.model.schedule import lr_at
    from trainer.training.loop import BUDGET_MEASURE_STEPS, BUDGET_SKIP_STEPS

    bucket = str(copy_bucket(template, tmp_path / "bucket"))
    settings = tiny_settings(template["corpus"], bucket, str(tmp_path / "work"),
                             **{"train.budget_minutes": 0.1, "train.max_steps": 5, "train.log_every_steps": 1,
                                "train.checkpoint_every_steps": 1000, "checkpoint.upload_async": False})
    cfg = make_config(settings)
    arts = Artifacts(template["tokenizer_key"], template["data_key"])
    fixed_at = BUDGET_SKIP_STEPS + BUDGET_MEASURE_STEPS
    with pytest.raises(Preempted):
        run_task(cfg, lambda: FaultyTask(pretrain_task(cfg, arts), sigterm_at=fixed_at + 2))
    store = open_storage(cfg.storage.bucket)
    stopped = json.loads(store.read_text(f"{protocol.checkpoints_prefix('rel')}/{protocol.step_name(fixed_at + 2)}/"
                                         "trainer_state.json"))
    planned = stopped["max_steps"]
    assert planned > fixed_at + 2 and planned != 5  # train.max_steps is ignored under a budget
    assert f"-> {planned} steps in all" in caplog.text
    final = run_task(cfg, lambda: pretrain_task(cfg, arts))
    assert final["step"] == final["max_steps"] == planned
    rows = metrics(store, "rel")
    assert rows[-1]["step"] == planned
    assert rows[-1]["lr"] == pytest.approx(lr_at(planned - 1, replace_steps(cfg.train, planned)))
    assert rows[-1]["lr"] < 0.2 * cfg.train.lr  # decayed to the end (min_lr_ratio 0.1)


def replace_steps(train_cfg, steps):
    import dataclasses

    return dataclasses.replace(train_cfg, max_steps=steps)


def test_epoch_cap_by_hand():
    import types

    from trainer.config import TrainConfig
    from trainer.training.loop import epoch_cap

    task = types.SimpleNamespace(sequences_per_epoch=1000, samples_per_step=64, sequence_limit=None)
    assert epoch_cap(TrainConfig(max_epochs=0), task) is None
    assert epoch_cap(TrainConfig(max_epochs=5), task) == 79  # ceil(5 x 1000 / 64) = ceil(78.1)
    assert epoch_cap(TrainConfig(max_epochs=0.01), task) == 1


@pytest.mark.parametrize("stage_run", STAGES, indirect=True)
def test_max_epochs_caps_the_run_and_the_schedule_decays_to_its_end(stage_run, tmp_path):
    epochs = 0.25 if stage_run.stage == "pretrain" else 4  # the SFT sample packs into a few rows
    state, store, run_id = stage_run(tmp_path, {"train.max_epochs": epochs, "train.max_steps": 1000,
                                                "train.log_every_steps": 1, "train.checkpoint_every_steps": 1000})
    rows = metrics(store, run_id)
    assert 1 < state["step"] == rows[-1]["step"] < 1000
    assert protocol.complete_steps(store, run_id) == [state["step"]]  # the last step is checkpointed
    assert rows[-1]["lr"] < max(r["lr"] for r in rows)  # the cosine decays towards the capped end


@pytest.mark.parametrize("stage_run", STAGES, indirect=True)
def test_tensorboard_events_are_written_while_training(stage_run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, store, run_id = stage_run(tmp_path)
    keys = [o.key for o in store.list(f"runs/{run_id}/tensorboard/")]
    assert keys
    local = tmp_path / "tb"
    for key in keys:
        store.download_file(key, local / key.rsplit("/", 1)[1])
    events = EventAccumulator(str(local))
    events.Reload()
    from trainer.evaluation.report import tensorboard_tag

    rows = metrics(store, run_id)
    assert [e.step for e in events.Scalars("train/loss")] == [r["step"] for r in rows]
    # the report's tags (report.tensorboard_tag) for every metric, live as after the run
    keys = {k for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
    assert set(events.Tags()["scalars"]) == {tensorboard_tag(k) for k in keys}


# SFT through the CLI: kill -9 and a change of world size, as tests/test_resume.py does for pretraining ----

SFT_STEPS = 40


def sft_final_weights(root, step):
    from safetensors.torch import load_file

    return load_file(str(root / f"bucket/runs/base-sft/checkpoints/{protocol.step_name(step)}/model.safetensors"))


@pytest.fixture(scope="module")
def sft_straight(tmp_path_factory, chat_model):
    """SFT_STEPS of SFT on one process without interruption (keep_last 100: every checkpoint stays)."""
    root = tmp_path_factory.mktemp("sft-straight")
    mp = pytest.MonkeyPatch()
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        mp.delenv(name, raising=False)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = sft_config(root, chat_model, [SFT_SAMPLE], **SFT_CLI)
        data_dir = prepare_conversations(cfg, load_chat_tokenizer(chat_model), 256)
        run_task(cfg, lambda: SftTask(cfg, data_dir, chat_model))
    finally:
        torch.set_num_threads(threads)
        for s, h in saved.items():
            signal.signal(s, h)
        mp.undo()
    return root, metrics(open_storage(str(root / "bucket")), "base-sft")


SFT_CLI = {"sft.max_steps": SFT_STEPS, "sft.checkpoint_every_steps": 4, "checkpoint.keep_last": 100,
           "train.micro_batch_size": 1, "train.log_every_steps": 1}


@pytest.mark.slow
def test_sft_killed_with_sigkill_then_rerun_is_exact(sft_straight, chat_model, cli, tmp_path):
    straight_root, straight_rows = sft_straight
    cfg = sft_config(tmp_path, chat_model, [SFT_SAMPLE], **SFT_CLI)
    path = cli.write_config(cfg, tmp_path / "sft.yaml")
    store = open_storage(cfg.storage.bucket)
    latest = f"{protocol.checkpoints_prefix('base-sft')}/{protocol.LATEST}"
    log = tmp_path / "killed.log"
    proc = cli.start("sft", path, log=log)
    try:
        import time

        deadline = time.time() + 240
        while not store.exists(latest):
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.time() < deadline, log.read_text()[-4000:]
            time.sleep(0.01)
    finally:
        cli.kill(proc)
    killed_at = protocol.complete_steps(store, "base-sft")
    assert killed_at and killed_at[0] < SFT_STEPS, killed_at
    again = cli.run("sft", path, {"run.takeover": "true"})
    assert again.returncode == 0, again.stdout[-6000:]
    assert f"sft: resumed from {protocol.step_name(killed_at[0])}" in again.stdout
    a, b = sft_final_weights(tmp_path, SFT_STEPS), sft_final_weights(straight_root, SFT_STEPS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in metrics(store, "base-sft")] == [r["loss"] for r in straight_rows]


@pytest.mark.slow
def test_sft_on_two_processes_preempted_then_resumed_on_one(sft_straight, chat_model, cli, tmp_path):
    """2 processes stopped by SIGTERM after checkpoint 8, the rest on 1: equal to the straight run
    within float tolerance (the all-reduce sums in another order; measured differences ~1e-6)."""
    straight_root, straight_rows = sft_straight
    cfg = sft_config(tmp_path, chat_model, [SFT_SAMPLE], **{**SFT_CLI, "checkpoint.upload_async": False})
    env = cli.sigterm_after_checkpoint_env(8, tmp_path)
    two = cli.run("sft", cli.write_config(cfg, tmp_path / "two.yaml"), {"train.nproc": 2}, env=env)
    assert two.returncode == EXIT_PREEMPTED, two.stdout[-6000:]
    assert "rank 0: stopped at step 8" in two.stdout and "rank 1: stopped at step 8" in two.stdout
    one = cli.run("sft", cli.write_config(cfg, tmp_path / "one.yaml"))
    assert one.returncode == 0, one.stdout[-6000:]
    assert "sft: resumed from step-00000008 (saved by 2 process(es), now 1)" in one.stdout
    a, b = sft_final_weights(tmp_path, SFT_STEPS), sft_final_weights(straight_root, SFT_STEPS)
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)  # rounding, grown by Adam over 40 steps
    rows = metrics(open_storage(cfg.storage.bucket), "base-sft")
    assert [r["step"] for r in rows] == list(range(1, SFT_STEPS + 1))
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in straight_rows], rel=1e-4)


@pytest.mark.slow
def test_sft_on_two_fsdp_processes_matches_one_unsharded(sft_straight, chat_model, cli, tmp_path):
    """SFT under FSDP: the model is built on the meta device and sharded, rank 0 alone loads the
    starting weights (from_pretrained) and broadcasts the shards; the losses equal the unsharded
    one-process run's within the reduction-order tolerance of the DDP test above."""
    from trainer.parallel import fsdp as sharding
    _, straight_rows = sft_straight
    cfg = sft_config(tmp_path, chat_model, [SFT_SAMPLE], **{**SFT_CLI, "train.strategy": "fsdp"})
    done = cli.run("sft", cli.write_config(cfg, tmp_path / "fsdp.yaml"), {"train.nproc": 2})
    assert done.returncode == 0, done.stdout[-6000:]
    assert "on 2 x cpu (fsdp)" in done.stdout
    rows = metrics(open_storage(cfg.storage.bucket), "base-sft")
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in straight_rows], rel=1e-4)
    final = tmp_path / f"bucket/runs/base-sft/checkpoints/{protocol.step_name(SFT_STEPS)}"
    assert (final / sharding.DCP_METADATA).is_file()


def test_samples_that_fail_never_stand_between_a_run_and_its_checkpoint(template, tmp_path, in_process, caplog):
    class BrokenSamples(FaultyTask):
        def at_checkpoint(self, *args, **kwargs):
            raise RuntimeError("cannot reshape tensor of 0 elements")

    cfg = make_config(tiny_settings(template["corpus"], str(copy_bucket(template, tmp_path / "bucket")),
                                    str(tmp_path / "work"), **{"train.max_steps": 8}))
    arts = Artifacts(template["tokenizer_key"], template["data_key"])
    assert run_task(cfg, lambda: BrokenSamples(pretrain_task(cfg, arts)))["step"] == 8
    assert protocol.complete_steps(open_storage(cfg.storage.bucket), "rel") == [8, 4]
    assert "samples at step-00000004 failed (cannot reshape tensor of 0 elements); training goes on" in caplog.text


def test_log_lines_round_floats_and_metrics_keep_them():
    """A log line shows 4 significant digits (whole numbers from 1000); metrics.jsonl's rows are the
    values themselves (issue 25: lr=0.00027421729424061787 in every line)."""
    from trainer.training.loop import _fields

    row = {"step": 15, "loss": 8.822478, "lr": 0.00027421729424061787, "grad_norm": 0.4451,
           "tok_per_s": 547521.9, "mfu": 0.4265, "tokens": 491520, "skipped_steps": 0, "val_bpc": 8.68536}
    assert _fields(row) == ("loss=8.822 lr=0.0002742 grad_norm=0.4451 tok_per_s=547522 mfu=0.4265 "
                            "tokens=491520 skipped_steps=0 val_bpc=8.685")
