"""When the training loop checkpoints and what a checkpoint takes (torchtitan's CheckpointManager):
the loop only calls the Checkpointer, which decides the rest.

  * cadence: every train.checkpoint_every_steps, at the run's last step, and once more when a
    signal stops the run between checkpoints (then exit 75, the marker left for the launcher);
  * a checkpoint: the lease checked, the files saved (trainer/state/checkpoint.py), samples taken
    (eager, compiling nothing; they never stand between a run and its checkpoint), the logs
    uploaded, then the checkpoint published, in the background unless it is the last
    (checkpoint.upload_async), and the bucket pruned to checkpoint.keep_last (trainer/state/protocol.py);
  * going back: the resume from the newest complete checkpoint, and train.on_nonfinite=rollback's
    return to the last one (at most MAX_ROLLBACKS_IN_A_ROW without a new checkpoint).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from trainer.config import Config, to_yaml
from trainer.errors import Preempted
from trainer.io.storage import Storage
from trainer.log import logger
from trainer.parallel.distributed import Dist
from trainer.parallel.fsdp import is_sharded
from trainer.state.checkpoint import RunCheckpoints, step_name
from trainer.state.run import LoopState, mark_preempted
from trainer.training.runlog import RunLog

MAX_ROLLBACKS_IN_A_ROW = 3  # train.on_nonfinite=rollback gives up after this many without a new checkpoint


class Checkpointer:
    """One attempt's checkpoints, on every rank (each method is called by all ranks at the same
    step). `task` is the stage (loop.Task); model, tokenizer and optimizer are the bare ones the
    checkpoint holds; `lease` (or None) is checked before every checkpoint and raises LeaseLost
    when another job took the run."""

    def __init__(self, task, cfg: Config, store: Storage, d: Dist, run_local: Path, model, tokenizer,
                 optimizer: torch.optim.Optimizer, lease=None):
        self.task, self.d, self.lease, self.run_local = task, d, lease, run_local
        self.model, self.tokenizer, self.optimizer = model, tokenizer, optimizer
        self.files = RunCheckpoints(store, task.run_id, run_local, cfg.checkpoint.keep_last, d)
        self.every_steps = task.hp.checkpoint_every_steps
        self.upload_async, self.grace_seconds = cfg.checkpoint.upload_async, task.hp.grace_seconds
        self.config_yaml = to_yaml(cfg)
        self.last_step = 0  # the step of the newest checkpoint this attempt can go back to
        self.rollbacks_in_a_row = 0
        self.wall_before, self.started_at = 0.0, time.time()
        self.runlog: RunLog | None = None
        self.autocast = None

    def resume(self) -> LoopState:
        """The state of the newest complete checkpoint (loaded into model and optimizer), or a fresh
        one (the RNG seeded with train.seed + rank). Raises StorageError when the run has complete
        checkpoints and none of them verifies (RunCheckpoints.restore)."""
        name, seed = self.task.name, self.task.hp.seed
        saved = self.files.restore(self.model, self.optimizer, seed)
        state = LoopState.from_dict(saved) if saved else LoopState()
        if saved:
            logger.info(f"{name}: resumed from {step_name(state.step)} (saved by {state.world_size} process(es), "
                        f"now {self.d.world})")
        else:
            torch.manual_seed(seed + self.d.rank)
            logger.info(f"{name}: starting from scratch" if name == "pretrain" else f"{name}: starting")
        state.world_size = self.d.world
        self.last_step, self.wall_before = state.step, state.wall_seconds
        return state

    def start(self, runlog: RunLog, autocast) -> None:
        """Training starts now: the attempt's clock (LoopState.wall_seconds counts training time,
        not start-up), the logs every checkpoint uploads, the autocast its samples run under."""
        self.runlog, self.autocast, self.started_at = runlog, autocast, time.time()

    def wall_seconds(self, now: float | None = None) -> float:
        """Training seconds over all attempts at `now` (time.time(); default: now)."""
        return self.wall_before + (time.time() if now is None else now) - self.started_at

    def due(self, step: int, max_steps: int) -> bool:
        """Whether the step just done is checkpointed: every train.checkpoint_every_steps and the last."""
        return step % self.every_steps == 0 or step == max_steps

    def maybe_save(self, state: LoopState, max_steps: int) -> None:
        """Checkpoint state.step when due(); published in the background (checkpoint.upload_async)
        unless it is the run's last step. Raises LeaseLost, FloatingPointError (non-finite weights,
        nothing written), StorageError (the previous background upload failed)."""
        if self.due(state.step, max_steps):
            self._save(state, background=self.upload_async and state.step < max_steps)

    def stop(self, state: LoopState, requested_at: float | None) -> None:
        """After a signal (requested_at: when this rank got it; None on the ranks that did not):
        checkpoint state.step unless it is already, without samples, publish it, tell every node,
        leave the marker the launcher reads (trainer/training/launch.py), raise Preempted (exit 75)."""
        if state.step > self.last_step:
            self._save(state, background=False, samples=False)
        since = requested_at or time.time()
        self.files.wait()
        self.runlog.flush()
        self.d.barrier()  # every node knows the checkpoint is published
        took = time.time() - since
        logger.warning(f"rank {self.d.rank}: stopped at step {state.step} after a signal ({took:.1f}s to publish, "
                       f"train.grace_seconds={self.grace_seconds})")
        if took > self.grace_seconds:
            logger.warning(f"stopping took {took:.1f}s, more than train.grace_seconds={self.grace_seconds}: the "
                           f"launcher may kill the next one before its checkpoint is published")
        if self.d.local_rank == 0:
            mark_preempted(self.run_local, state.step, took)
        raise Preempted()

    def roll_back(self, state: LoopState, trouble: str) -> LoopState:
        """PaLM (Chowdhery et al. 2022, sec. 5.1): restart from the last checkpoint (loaded into
        model and optimizer) and skip the batches around the trouble. The restored state keeps this
        state's data position (the failed window's data is skipped) and counters. Raises
        FloatingPointError when there is no checkpoint yet or after MAX_ROLLBACKS_IN_A_ROW without
        a new one."""
        self.files.wait()
        again = self.rollbacks_in_a_row < MAX_ROLLBACKS_IN_A_ROW
        saved = self.files.restore(self.model, self.optimizer, self.task.hp.seed) if again else None
        if saved is None:
            why = ("no checkpoint to roll back to yet" if again else
                   f"{MAX_ROLLBACKS_IN_A_ROW} rollbacks without reaching a new checkpoint")
            raise FloatingPointError(f"{trouble} before step {state.step}, and {why} (train.on_nonfinite=rollback)")
        restored = LoopState.from_dict(saved)
        restored.data_position = state.data_position
        restored.skipped_steps, restored.spikes = state.skipped_steps, state.spikes
        restored.rollbacks = state.rollbacks + 1
        restored.wall_seconds, restored.world_size = state.wall_seconds, state.world_size
        logger.info(f"rolled back from step {state.step} to {step_name(restored.step)} after {trouble}; the data of "
                    f"steps {restored.step}-{state.step} is skipped")
        self.rollbacks_in_a_row += 1
        self.last_step = restored.step
        return restored

    def close(self) -> None:
        """The last upload published and the logs in the bucket. Raises StorageError if it failed."""
        self.files.wait()
        self.runlog.flush()

    def _save(self, state: LoopState, background: bool, samples: bool = True) -> None:
        """Save the checkpoint of state.step (every rank), take samples (rank 0, or every rank of a
        sharded model; eager under torch.compiler.set_stance; a failure is logged), upload the logs,
        then publish the checkpoint."""
        if self.lease is not None:
            self.lease.check()
        state.wall_seconds = self.wall_seconds()
        self.files.save(asdict(state), self.model, self.tokenizer, self.optimizer, self.config_yaml)
        sharded = is_sharded(self.model)  # every rank takes part in a sharded model's forward passes
        if samples and (self.d.main or sharded):
            try:
                # Eager, never compiled: generate's KV cache puts per-layer state in the guards of the
                # blocks FSDP compiled one by one (parallelize.prepare), so each layer recompiled
                # (`past_key_values.layers[7].is_initialized`) until dynamo's limit, ~60 s a checkpoint
                # at 1b on an H200 (issue 24). The stance leaves training's compiled graphs as they are.
                with torch.compiler.set_stance("force_eager"):
                    rows = self.task.at_checkpoint(self.model, self.tokenizer, state.step, self.autocast,
                                                   synced=sharded)
                if self.d.main:
                    self.runlog.append("samples.jsonl", rows)
            except Exception as e:  # noqa: BLE001
                logger.warning(f"{self.task.name}: samples at {step_name(state.step)} failed ({e}); training goes on")
        self.runlog.flush()  # the logs up to this step are in the bucket before the checkpoint counts
        self.files.publish(background)
        self.last_step, self.rollbacks_in_a_row = state.step, 0
