"""The training loop: one for every stage (pretraining and SFT), read top to bottom.

What differs between stages sits behind `Task` (trainer/training/tasks.py): the starting weights, the batches,
the loss (a sum over target tokens; the loop divides by the step's target count), evaluation and
samples at checkpoints. Everything else is written once, here:
  * the batch geometry: a global batch of task.samples_per_step sequences, the micro-batch an upper
    bound (train.micro_batch_size), gradient accumulation derived, so a config runs on any number
    of processes that divides the batch;
  * no host-device sync per step: a non-finite gradient is detected on the device and the fused
    AdamW skips the update there; at log and checkpoint steps (the only syncs) train.on_nonfinite
    decides whether skipped steps and loss spikes are counted, rolled back to the last checkpoint
    (their data skipped) or fatal, so a checkpoint never holds weights of a window that failed;
  * SIGTERM/SIGINT: every rank stops at the same step, the checkpoint is published, exit 75; the
    previous signal handlers are back when the loop returns;
  * when to checkpoint, and what a checkpoint takes (samples, logs, publication, pruning, rollback):
    the Checkpointer (trainer/training/checkpointer.py), which the loop only calls;
  * the loop state (LoopState) is saved in every checkpoint and restored whole, so a resume continues
    at the same step, data position and counters (bit for bit on CPU).
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Protocol

import torch

from trainer.config import Config, TrainConfig
from trainer.io.storage import Storage
from trainer.log import logger
from trainer.model.llama import peak_flops
from trainer.model.schedule import lr_at
from trainer.parallel.distributed import Dist
from trainer.parallel.fsdp import clip_grad_norm
from trainer.state.run import LoopState, run_steps
from trainer.training import parallelize
from trainer.training.checkpointer import Checkpointer
from trainer.training.optim import build_optimizer, step_skipping_nonfinite
from trainer.training.runlog import RunLog

LOSS_EMA_DECAY = 0.9  # running mean of logged losses for spike detection (spikes left out)


class Task(Protocol):
    """What one stage trains (trainer/training/tasks.py: PretrainTask, SftTask)."""
    name: str  # log prefix: "pretrain", "sft"
    run_id: str  # checkpoints and logs go to runs/<run_id>/
    hp: TrainConfig  # this stage's optimizer, schedule, length, batch and logging settings
    samples_per_step: int  # global batch in sequences (all ranks, all micro-batches)
    tokens_per_step: int
    flops_per_token: float | None  # for MFU; None: not reported
    inputs: dict  # what the weights depend on (tokenizer, data, model, seq_len): saved, checked on resume
    sequences_per_epoch: int  # training sequences (rows) in one pass over the data: train.max_epochs
    sequence_limit: int | None  # where the data order ends (a mixture of capped sources), None: never

    def build_model(self, device: torch.device, empty: bool = False): ...  # -> (HF model, tokenizer): the
    # starting weights on device; empty: parameters on the meta device (for FSDP: sharding.materialize)
    def loss_module(self, model) -> torch.nn.Module: ...  # forward(micro-batch) -> summed loss (0-dim)
    def loader(self, position: int, d: Dist, micro: int): ...  # BatchLoader from global sequence `position`
    def targets_in_step(self, position: int) -> int: ...  # loss terms in the step starting at `position`
    def evaluate(self, loss_module, d: Dist, autocast) -> dict: ...  # metrics row entries, {} if none
    def at_checkpoint(self, model, tokenizer, step: int, autocast, synced: bool = False) -> list[dict]: ...
    # sample rows (rank 0; synced: every rank generates in step, the model being sharded)


def batch_geometry(samples_per_step: int, world: int, micro_max: int, key: str = "train.batch_tokens"
                   ) -> tuple[int, int]:
    """(micro-batch size, accumulation steps) for a global batch of samples_per_step sequences over
    `world` processes: the largest micro-batch up to micro_max (0: 16) that divides the per-rank
    share. Raises ValueError naming `key` when the batch does not split over the processes."""
    if samples_per_step % world:
        raise ValueError(f"{key}: the global batch of {samples_per_step} sequences does not split evenly over "
                         f"{world} processes")
    per_rank = samples_per_step // world
    micro = max(k for k in range(1, min(micro_max or 16, per_rank) + 1) if per_rank % k == 0)
    return micro, per_rank // micro


class StopFlag:
    """Set by SIGTERM/SIGINT while the loop runs; ranks agree on it at a step boundary. The handlers
    that were there before are put back on exit."""

    def __enter__(self) -> "StopFlag":
        self.requested_at: float | None = None
        self._saved = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._saved.items():
            signal.signal(s, h)

    def _handle(self, signum, frame):
        if self.requested_at is None:
            self.requested_at = time.time()
            logger.warning(f"received signal {signum}: stopping at the next step boundary to checkpoint")


BUDGET_MEASURE_STEPS = 10  # steps timed to fix the count (after BUDGET_SKIP_STEPS of compile and warm caches)
BUDGET_SKIP_STEPS = 3
BUDGET_UNFIXED_STEPS = 10**9
BUDGET_RESERVE = 0.05  # of the budget left for evaluation, checkpoints and the last upload


class Budget:
    """train.budget_minutes: time steps BUDGET_SKIP_STEPS..+BUDGET_MEASURE_STEPS of this attempt
    (one host sync), then fix the step count so that training ends within the budget, counting the
    training time of earlier attempts and the evaluations to come (estimated: forward passes only);
    BUDGET_RESERVE is left for checkpoints and the last upload. The schedule then decays to that
    step, and the count is saved in the checkpoint (LoopState.max_steps) so a resume ends at the
    same step."""

    def __init__(self, hp: TrainConfig, step: int, wall_before: float, samples_per_step: int):
        self.budget_s, self.wall_before = hp.budget_minutes * 60, wall_before
        # Evaluation runs forward passes only (about a third of a training step's work per sequence).
        evals_per_step = 1 / hp.eval_every_steps if hp.eval_every_steps else 0.0
        self.eval_share = evals_per_step * hp.eval_sequences / samples_per_step / 3
        self.measure_from = step + BUDGET_SKIP_STEPS
        self.measure_until = self.measure_from + BUDGET_MEASURE_STEPS
        self.started = time.time()
        self.t0: float | None = None

    def tick(self, step: int) -> None:
        """Called after every step until the count is fixed (cheap: a clock read at one step)."""
        if step == self.measure_from:
            _sync()
            self.t0 = time.time()

    def fix_steps(self, state: LoopState, d: Dist, cap: int | None = None) -> int:
        """The step count (the same on every rank: rank 0's measurement; at most `cap`, the
        train.max_epochs limit), stored in state.max_steps."""
        _sync()
        step_s = (time.time() - self.t0) / BUDGET_MEASURE_STEPS
        left = self.budget_s * (1 - BUDGET_RESERVE) - self.wall_before - (time.time() - self.started)
        steps = d.broadcast_object(state.step + max(0, int(left / (step_s * (1 + self.eval_share)))))
        state.max_steps = max(min(steps, cap or steps), state.step)
        logger.info(f"train.budget_minutes={self.budget_s / 60:g}: {step_s:.3f}s per step -> {state.max_steps} steps "
                    f"in all ({_hms(self.budget_s)} budget, {BUDGET_RESERVE:.0%} kept for evaluation and checkpoints"
                    + (f"; train.max_epochs caps it at {cap}" if cap and steps > cap else "") + ")")
        return state.max_steps


def _run_length(hp: TrainConfig, state: LoopState, task: Task) -> tuple[int, int | None]:
    """(the run's step count, the train.max_epochs cap): the count a wall-clock budget
    fixed before the checkpoint (the same schedule and end), a placeholder until Budget fixes it
    (warm-up's lr does not depend on it), or train.max_steps within the cap."""
    cap = epoch_cap(hp, task)
    steps = run_steps(hp.max_steps, hp.budget_minutes, state, cap)
    return steps or BUDGET_UNFIXED_STEPS, cap


def epoch_cap(hp: TrainConfig, task: Task) -> int | None:
    """Steps in hp.max_epochs passes over the task's training sequences, at most the whole steps
    before its data order ends (data.max_epochs capping every source of a mixture), or None when
    neither limits it."""
    caps = [max(1, math.ceil(hp.max_epochs * task.sequences_per_epoch / task.samples_per_step))] \
        if hp.max_epochs else []
    if task.sequence_limit is not None:
        caps.append(max(1, task.sequence_limit // task.samples_per_step))
    return min(caps) if caps else None


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Window:
    """Sums over the steps since the last log, kept on the device (no host sync until close)."""

    def __init__(self, device: torch.device, step: int, wait: float):
        self.loss = torch.zeros((), device=device)
        self.skipped = torch.zeros((), device=device)
        self.norm = torch.zeros((), device=device)
        self.start_step, self.start_time, self.start_wait = step, time.time(), wait

    @classmethod
    def resumed(cls, device: torch.device, state: LoopState, wait: float, d: Dist) -> "Window":
        """The window open at state.step as the checkpoint saved it (a stop between log steps), so
        the next logged row equals the uninterrupted run's; else an empty one. Each rank takes back
        its own loss share when as many processes resume, else rank 0 takes the sum."""
        window, saved = cls(device, state.step, wait), state.window
        state.window = None
        if saved and saved["start_step"] < state.step:
            shares = saved["loss"]
            share = shares[d.rank] if len(shares) == d.world else (sum(shares) if d.main else 0.0)
            window.loss.fill_(share)
            window.skipped.fill_(saved["skipped"])
            window.start_step = saved["start_step"]
            window.start_time -= saved["seconds"]
            window.start_wait -= saved["wait_seconds"]
        return window

    def saved(self, d: Dist, wait: float) -> dict:
        """The open window's sums for the checkpoint (every rank's loss share; one host sync)."""
        return {"start_step": self.start_step, "loss": d.all_gather_object(self.loss.item()),
                "skipped": self.skipped.item(), "seconds": time.time() - self.start_time,
                "wait_seconds": wait - self.start_wait}

    def add(self, loss: torch.Tensor, found_inf: torch.Tensor, norm: torch.Tensor) -> None:
        self.skipped += found_inf
        self.loss += torch.where(found_inf > 0, torch.zeros_like(loss), loss)  # skipped steps' loss left out
        self.norm = norm

    def close(self, d: Dist) -> tuple[float, int, float]:
        """(mean loss of the steps that were not skipped, skipped steps, last grad norm): the sync."""
        stats = torch.stack([self.loss, self.skipped, self.norm.float()])
        if d.world > 1:  # loss: each rank holds its share of the mean; skipped and norm are equal on all ranks
            torch.distributed.all_reduce(stats)
            stats /= torch.tensor([1.0, d.world, d.world], device=stats.device)
        loss, skipped, norm = stats.tolist()
        return loss, round(skipped), norm


def judge(mean_loss: float, skipped: int, loss_ema: float | None, spike_factor: float) -> tuple[str, bool]:
    """(what went wrong in a logged window, or "", whether it was a loss spike)."""
    if skipped:
        return f"{skipped} step(s) with a non-finite loss or gradient", False
    if spike_factor and loss_ema is not None and mean_loss > spike_factor * loss_ema:
        return (f"a loss spike ({mean_loss:.4g} > train.spike_factor={spike_factor} x running mean "
                f"{loss_ema:.4g})"), True
    return "", False


def train(task: Task, cfg: Config, store: Storage, d: Dist, lease=None) -> LoopState:
    """Train task from its newest checkpoint (or its starting weights) to the step count _run_length
    derives (kept here, not in task.hp). Raises Preempted (exit 75) after a signal, FloatingPointError
    per train.on_nonfinite, LeaseLost (from `lease`, before every checkpoint) when another job took it."""
    hp = task.hp
    micro, accum = batch_geometry(task.samples_per_step, d.world, hp.micro_batch_size)
    run_local = Path(cfg.storage.local_dir) / "runs" / task.run_id
    run_local.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 leftovers on GPU
    use_bf16 = hp.dtype == "bf16" or (hp.dtype == "auto" and d.device.type == "cuda")
    model, tokenizer, strategy = parallelize.build(task, hp, d, use_bf16)
    optimizer = build_optimizer(model, hp)
    ckpt = Checkpointer(task, cfg, store, d, run_local, model, tokenizer, optimizer, lease)
    state = ckpt.resume()
    state.inputs = task.inputs  # the stages refused a resume whose inputs changed (stages.check_resume)
    max_steps, cap = _run_length(hp, state, task)  # derived: kept here, never written into hp

    train_model, eval_model = parallelize.wrap(task.loss_module(model), d, hp.compile, strategy, use_bf16)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()
    runlog = RunLog(store, task.run_id, run_local, state.step, d.main)
    loader = task.loader(state.data_position, d, micro)
    params = [p for p in model.parameters() if p.requires_grad]
    logger.info(f"{task.name}: {sum(p.numel() for p in params) / 1e6:.1f}M params on {d.world} x {d.device.type} "
                f"({strategy}{', activation checkpointing' if hp.activation_checkpointing else ''}), "
                f"{task.samples_per_step} sequences per step ({micro} per micro-batch, {accum} accumulation), "
                f"steps {state.step} -> {max_steps}")

    ckpt.start(runlog, autocast)
    model.train()
    window = Window.resumed(d.device, state, loader.wait_seconds, d)
    budget = Budget(hp, state.step, state.wall_seconds, task.samples_per_step)
    with StopFlag() as stop:
        try:
            while state.step < max_steps:
                if (d.world > 1 or stop.requested_at is not None) and d.any(stop.requested_at is not None):
                    loader.close()
                    if state.step > ckpt.last_step:  # the open window goes into the last checkpoint
                        state.window = window.saved(d, loader.wait_seconds) if state.step > window.start_step else None
                    ckpt.stop(state, stop.requested_at)  # raises Preempted
                lr = lr_at(state.step, hp, max_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)  # optimizer.build_optimizer; older: none
                # Sum of the step's per-token losses / their number over all ranks (DDP averages over ranks).
                scale = d.world / max(1, task.targets_in_step(state.data_position))
                window.add(*_step(train_model, loader, optimizer, params, autocast, scale, accum, hp.grad_clip, d))
                state.step += 1
                state.tokens_seen += task.tokens_per_step
                state.data_position += task.samples_per_step
                if hp.budget_minutes and not state.max_steps:
                    budget.tick(state.step)
                    if state.step == budget.measure_until:
                        max_steps = budget.fix_steps(state, d, cap)
                at_eval = state.step % max(1, hp.eval_every_steps or max_steps) == 0
                if not (state.step % hp.log_every_steps == 0 or ckpt.due(state.step, max_steps) or at_eval):
                    continue
                # Judged at log steps and before every checkpoint (the only host syncs).
                row, rollback_from, now = _close_window(window, state, task, hp, lr, loader.wait_seconds, d)
                if at_eval or state.step == max_steps:
                    model.eval()
                    with torch.no_grad():
                        row.update(task.evaluate(eval_model, d, autocast))
                    model.train()
                runlog.append("metrics.jsonl", [row])
                eta = (max_steps - state.step) * (now - window.start_time) / (state.step - window.start_step)
                logger.info(f"{task.name} step {state.step}/{max_steps} {_fields(row)} "
                            f"elapsed={_hms(ckpt.wall_seconds(now))} eta={_hms(eta)}")
                window = Window(d.device, state.step, loader.wait_seconds)
                if rollback_from:
                    loader.close()
                    state = ckpt.roll_back(state, rollback_from)
                    loader = task.loader(state.data_position, d, micro)
                    window = Window(d.device, state.step, loader.wait_seconds)
                    continue
                ckpt.maybe_save(state, max_steps)
        finally:
            loader.close()
    ckpt.close()
    runlog.close()
    d.barrier()
    return state


def _step(train_model, loader, optimizer, params, autocast, scale: float, accum: int, grad_clip: float, d: Dist
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step over `accum` micro-batches, each loss multiplied by `scale`: (this rank's
    share of the step's mean loss, 1.0 when the update was skipped for a non-finite gradient else
    0.0, the gradient norm before clipping), all left on the device (no host sync)."""
    step_loss = torch.zeros((), device=d.device)
    for k in range(accum):
        batch = loader.next()
        with train_model.no_sync() if k < accum - 1 and d.world > 1 and hasattr(train_model, "no_sync") \
                else nullcontext():
            with autocast:
                loss = train_model(batch)
            (loss * scale).backward()
        step_loss += loss.detach() * (scale / d.world)
    norm = clip_grad_norm(params, grad_clip if grad_clip > 0 else math.inf)
    found_inf = (~torch.isfinite(norm)).float()
    step_skipping_nonfinite(optimizer, found_inf)
    optimizer.zero_grad(set_to_none=True)
    return step_loss, found_inf, norm


def _close_window(window: Window, state: LoopState, task: Task, hp: TrainConfig, lr: float, data_wait_seconds: float,
                  d: Dist) -> tuple[dict, str, float]:
    """Judge the window ending at state.step (the host sync) per train.on_nonfinite and
    train.spike_factor, counting skipped steps, spikes and the running loss into state: (its metrics
    row, the trouble to roll back from or "", time.time() when it closed). Raises FloatingPointError
    for trouble under train.on_nonfinite=fail."""
    mean_loss, skipped, norm = window.close(d)
    n_steps = state.step - window.start_step
    mean_loss /= max(1, n_steps - skipped)
    state.skipped_steps += skipped
    trouble, spike = judge(mean_loss, skipped, state.loss_ema, hp.spike_factor)
    state.spikes += spike
    if trouble and hp.on_nonfinite == "fail":
        raise FloatingPointError(f"{trouble} before step {state.step} (train.on_nonfinite=fail)")
    rolling_back = bool(trouble) and hp.on_nonfinite == "rollback"
    if not spike and n_steps > skipped:
        state.loss_ema = mean_loss if state.loss_ema is None else \
            LOSS_EMA_DECAY * state.loss_ema + (1 - LOSS_EMA_DECAY) * mean_loss
    now = time.time()
    row = {"step": state.step, "loss": round(mean_loss, 6), "lr": lr, "grad_norm": round(norm, 4),
           **_speed(task, d, n_steps, now - window.start_time, data_wait_seconds - window.start_wait),
           "tokens": state.tokens_seen, "skipped_steps": state.skipped_steps, "spikes": state.spikes,
           "rollbacks": state.rollbacks + rolling_back}
    return row, trouble if rolling_back else "", now


def _speed(task: Task, d: Dist, n_steps: int, seconds: float, data_wait_seconds: float) -> dict:
    """Tokens per second, the fraction of time spent waiting for data, MFU and peak memory on GPU."""
    tok_s = n_steps * task.tokens_per_step / seconds
    row = {"tok_per_s": round(tok_s, 1), "data_wait": round(data_wait_seconds / seconds, 4)}
    if d.device.type == "cuda":
        peak = peak_flops(torch.cuda.get_device_name(d.device))
        if peak and task.flops_per_token:
            row["mfu"] = round(tok_s * task.flops_per_token / (d.world * peak), 4)
        row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(d.device) / 1e9, 2)
    return row


def _fields(row: dict) -> str:
    """A metrics row for the log line: floats to 4 significant digits (lr=0.0002742, loss=8.437),
    1000 and above as whole numbers (tok_per_s=553034); metrics.jsonl keeps the full values."""
    def text(v) -> str:
        if isinstance(v, float):
            return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4g}"
        return str(v)
    return " ".join(f"{k}={text(v)}" for k, v in row.items() if k != "step")


def _hms(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"
