"""The resume contract of a run, without torch (`status` and the job's stages read it before, or
instead of, starting the training processes):

  * LoopState: what the loop carries from step to step, saved whole as trainer_state.json in every
    checkpoint; newest_state() reads the newest complete checkpoint's;
  * run_steps(): how many steps the run trains in all, the one place that decides it;
  * check_resume(): a resume must train on the inputs its checkpoint was trained on;
  * the preemption marker: the workers leave it once their last checkpoint is published, the
    launcher judges it (torchrun reports the workers' exit 75 as a failure).

Publishing, verifying and pruning checkpoints: trainer/state/protocol.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from trainer.config import ConfigError
from trainer.errors import PREEMPTED_MARKER
from trainer.io.artifacts import Artifacts
from trainer.io.storage import Storage, join
from trainer.log import logger
from trainer.state.protocol import LATEST, checkpoints_prefix, complete_steps, step_name

STATE_FILE = "trainer_state.json"


@dataclass
class LoopState:
    """Everything the loop carries from step to step, saved whole in trainer_state.json. Loaded
    leniently: unknown keys are ignored and missing ones take these defaults (logged), so older
    checkpoints keep loading."""
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0  # tokens trained on (padding included for SFT)
    data_position: int = 0  # global sequences consumed: where the data order continues
    skipped_steps: int = 0  # updates skipped for a non-finite loss or gradient
    spikes: int = 0  # logged windows whose loss exceeded train.spike_factor x the running mean
    rollbacks: int = 0  # times training went back to the last checkpoint (train.on_nonfinite=rollback)
    loss_ema: float | None = None  # running mean of logged losses (spikes left out)
    wall_seconds: float = 0.0  # training time over all attempts
    world_size: int = 1  # processes that saved this state
    max_steps: int | None = None  # the step count fixed by train.budget_minutes (None: train.max_steps)
    inputs: dict = field(default_factory=dict)  # what it trains on (Task.inputs); a resume must match
    # The logging window still open at this step (a stop between log steps): its sums, so the first
    # row logged after a resume equals the uninterrupted run's. None: the window closed here.
    window: dict | None = None

    @classmethod
    def from_dict(cls, saved: dict) -> "LoopState":
        known = {f.name for f in fields(cls)}
        missing = sorted(known - set(saved) - {"window"})  # no window: it was closed (or saved before windows)
        if missing:
            logger.info(f"trainer state of step {saved.get('step')} predates {', '.join(missing)}: "
                        f"{'they take' if len(missing) > 1 else 'it takes'} the default")
        return cls(**{k: v for k, v in saved.items() if k in known})


def newest_state(store: Storage, run_id: str) -> LoopState | None:
    """The loop state of run_id's newest complete checkpoint, or None without one."""
    steps = complete_steps(store, run_id)
    if not steps:
        return None
    return LoopState.from_dict(json.loads(store.read_text(join(checkpoints_prefix(run_id), step_name(steps[0]),
                                                                STATE_FILE))))


def run_steps(max_steps: int | None, budget_minutes: float, saved: LoopState | None, epoch_cap: int | None = None
              ) -> int | None:
    """How many steps the run trains in all: the count train.budget_minutes fixed (saved in the
    checkpoint, so a resume ends at the same step and the schedule decays to it); None while a
    budget has not fixed it yet (or max_steps is None: unknown); else max_steps, at most epoch_cap
    (train.max_epochs)."""
    if saved is not None and saved.max_steps:
        return saved.max_steps
    if budget_minutes or max_steps is None:
        return None
    return min(max_steps, epoch_cap or max_steps)


def finished(saved: LoopState | None, steps: int | None) -> bool:
    """Whether the newest checkpoint already holds the run's last step."""
    return saved is not None and steps is not None and saved.step >= steps


# The inputs contract ---------------------------------------------------------------------------

def changed_inputs(saved: dict, inputs: dict, resume_on_new_data: bool = False) -> list[str]:
    """The keys of `inputs` whose value differs from the checkpoint's (keys it did not record
    pass: older checkpoints); the corpus may change with run.resume_on_new_data."""
    return [k for k in inputs if k in saved and saved[k] != inputs[k]
            and not (k == "data" and resume_on_new_data)]


def check_resume(store: Storage, run_id: str, inputs: dict, resume_on_new_data: bool = False) -> None:
    """Refuse to resume run_id's newest checkpoint on other inputs than it was trained on: a
    ConfigError (exit 2) saying what changed and what to do, raised before anything of the run is
    written. run.resume_on_new_data=true lets a run continue on a changed corpus (same tokenizer,
    model and seq_len). A run without a checkpoint, or one saved before inputs were recorded, passes."""
    saved = newest_state(store, run_id)
    if saved is None:
        return
    changed = changed_inputs(saved.inputs, inputs, resume_on_new_data)
    if not changed:
        return
    what = "; ".join(f"{k}: {saved.inputs[k]} -> {inputs[k]}" for k in changed)
    fix = "start a new run (another run.id) to train on them"
    if set(changed) <= {"tokenizer", "data"}:
        old = store.read_text_or_none(f"runs/{run_id}/artifacts.json")
        tok_url = store.url(Artifacts.from_json(old).tokenizer_key) if old else "<the run's tokenizer>"
        fix += (f", or continue this run on the new corpus with its own tokenizer: tokenizer.path={tok_url} "
                f"run.resume_on_new_data=true")
    raise ConfigError(f"run.id={run_id}: {step_name(saved.step)} was trained on other inputs ({what}); resuming it "
                      f"would train the wrong thing: {fix}")


# The preemption marker -------------------------------------------------------------------------

def clear_preempted(run_local: Path) -> None:
    (Path(run_local) / PREEMPTED_MARKER).unlink(missing_ok=True)


def mark_preempted(run_local: Path, step: int, seconds: float) -> None:
    """Left by the workers (local rank 0) once the checkpoint of `step` is published after a signal."""
    (Path(run_local) / PREEMPTED_MARKER).write_text(json.dumps({"step": step, "seconds": seconds}))


def preempted_step(run_local: Path) -> int | None:
    """The step the workers stopped at after a signal (its checkpoint published), or None."""
    marker = Path(run_local) / PREEMPTED_MARKER
    return json.loads(marker.read_text())["step"] if marker.is_file() else None


def published_as_newest(store: Storage, run_id: str, step: int) -> tuple[bool, str]:
    """(whether `step` is the bucket's newest complete checkpoint and LATEST names it, what the
    bucket holds instead)."""
    steps = complete_steps(store, run_id)
    latest = (store.read_text_or_none(join(checkpoints_prefix(run_id), LATEST)) or "").strip()
    ok = bool(steps) and steps[0] == step and latest == step_name(step)
    return ok, f"{step_name(steps[0]) if steps else 'none'} (LATEST {latest or 'absent'})"
