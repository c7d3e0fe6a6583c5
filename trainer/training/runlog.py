"""A run's logs in the bucket: metrics.jsonl (one JSON row per logged step) and samples.jsonl
(continuations at checkpoints). Kept locally, trimmed on resume to the rows up to the resumed
step (a killed run's later rows are dropped, so each step appears once), appended by rank 0, and
uploaded at every checkpoint, at the end, and at the first log step UPLOAD_EVERY_S after the last
upload, so the bucket (status, TensorBoard on it) is at most about a minute behind.

run.report_to sends the same rows elsewhere while training (rank 0):
  * tensorboard: event files in runs/<id>/tensorboard/, one per attempt (`tensorboard --logdir` on a
    copy, or on the bucket through TensorBoard's S3 support, shows the run live), under the tags
    the report's event files use (train/loss, val/loss, ...: report.tensorboard_tag);
  * wandb: Weights & Biases, one W&B run per run id (resumed, never duplicated: WandbLog). A W&B
    failure warns once and training goes on without it.
The settings come from the stage's resolved.yaml beside the logs (trainer/job/stages.py writes it before
training starts on every node); without one, TensorBoard only.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from trainer.config import Config, load_config, to_dict
from trainer.evaluation.report import tensorboard_tag
from trainer.io.storage import Storage
from trainer.log import logger

WANDB_DEFAULT_PROJECT = "zh-pretrain"
UPLOAD_EVERY_S = 60.0  # the logs reach the bucket at least this often while training (rank 0)


class RunLog:
    def __init__(self, store: Storage, run_id: str, local_root: Path, resumed_step: int, main: bool,
                 names: tuple[str, ...] = ("metrics.jsonl", "samples.jsonl")):
        self.store, self.run_id, self.main = store, run_id, main
        self.paths = {name: Path(local_root) / name for name in names}
        self.tb, self.wandb = None, None
        self.uploaded_at = time.monotonic()
        if main:
            resolved = Path(local_root) / "resolved.yaml"
            cfg = load_config(str(resolved), env={}) if resolved.is_file() else None
            report_to = cfg.run.report_to if cfg else ("tensorboard",)
            self.tb_dir = Path(local_root) / "tensorboard"
            if "tensorboard" in report_to:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.tb_dir), filename_suffix=f".{int(time.time())}")
            for name, path in self.paths.items():
                old = store.read_text_or_none(f"runs/{run_id}/{name}") or ""
                kept = [line for line in old.splitlines()
                        if line.strip() and json.loads(line).get("step", 0) <= resumed_step]
                path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            if "wandb" in report_to:
                self.wandb = WandbLog(cfg, run_id, Path(local_root))

    def append(self, name: str, rows: list[dict]) -> None:
        if self.main:
            with open(self.paths[name], "a", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            if name == "metrics.jsonl":
                for row in rows:
                    for key, value in row.items():
                        if self.tb is not None and key != "step" and _is_number(value):
                            self.tb.add_scalar(tensorboard_tag(key), value, row["step"])
                    if self.wandb is not None:
                        self.wandb.metrics(row)
                if time.monotonic() - self.uploaded_at >= UPLOAD_EVERY_S:
                    self.upload()
            elif name == "samples.jsonl" and rows and self.wandb is not None:
                self.wandb.samples(rows)

    def upload(self) -> None:
        """Upload every log that has rows and the TensorBoard event files (rank 0)."""
        if self.main:
            for name, path in self.paths.items():
                if path.stat().st_size or self.store.exists(f"runs/{self.run_id}/{name}"):
                    self.store.upload_file(path, f"runs/{self.run_id}/{name}")
            if self.tb is not None:
                self.tb.flush()
                for path in self.tb_dir.glob("events.out.tfevents.*"):
                    self.store.upload_file(path, f"runs/{self.run_id}/tensorboard/{path.name}")
            self.uploaded_at = time.monotonic()

    def flush(self) -> None:
        """At a checkpoint and the end: upload (rank 0); W&B gets the step logged last."""
        if self.main:
            self.upload()
            if self.wandb is not None:
                self.wandb.commit()

    def close(self) -> None:
        """End of training (after flush): close the TensorBoard writer and finish the W&B run, so
        what the job does next (export, report) is not recorded in it."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class WandbLog:
    """One W&B run per run id (its id and name), resumed by every attempt (resume="allow"): the
    resolved config once per attempt, each metrics row at its step (train/loss, val/loss, ...; the
    names of the report's TensorBoard charts), samples as a table at their checkpoint's step.

    W&B cannot delete steps, and a resumed attempt trains again the steps after its checkpoint that
    the killed one had logged: those are left out, only steps beyond the last one W&B holds go there.
    That step is kept in <local_dir>/runs/<id>/wandb.json (written when W&B commits a row: when the
    next step is logged, and at every checkpoint) and, online, read back from W&B (run.starting_step),
    so neither a rerun on this machine nor one on another machine logs a step twice. A row still
    pending when the process is killed may be missing from W&B; none is there twice.

    Any W&B error (no network, a dead W&B process, no login) warns once; training goes on without
    W&B, whose rows are all in metrics.jsonl anyway. WANDB_MODE (offline, disabled), WANDB_DIR
    (default: the run's folder in storage.local_dir) and WANDB_API_KEY are read by wandb itself."""

    def __init__(self, cfg: Config, run_id: str, local_root: Path):
        self.run, self.record = None, local_root / "wandb.json"
        self.done = self._read_record(run_id)  # the last step W&B holds
        self.pending: int | None = None  # the step of rows logged but not committed yet
        try:
            import wandb

            self.wandb = wandb
            self.run = wandb.init(
                id=run_id, name=run_id, resume="allow", group=cfg.run.id, config=to_dict(cfg), allow_val_change=True,
                project=cfg.run.wandb_project or os.environ.get("WANDB_PROJECT") or WANDB_DEFAULT_PROJECT,
                entity=cfg.run.wandb_entity or None, dir=os.environ.get("WANDB_DIR") or str(local_root),
                reinit="finish_previous")  # an SFT after pretraining in this process is a run of its own
            self.done = max(self.done, self.run.starting_step - 1)  # online: what W&B holds of this run
        except Exception as e:  # noqa: BLE001 - W&B never stops training
            self._failed("starting a run", e)
        if self.run is not None and self.done > 0:
            logger.info(f"W&B: run {run_id} holds steps up to {self.done}; logging the steps after it")

    def _read_record(self, run_id: str) -> int:
        try:
            record = json.loads(self.record.read_text())
            return int(record["step"]) if record.get("id") == run_id else 0
        except (OSError, ValueError, KeyError):
            return 0

    def _failed(self, what: str, e: Exception) -> None:
        logger.warning(f"W&B: {what} failed ({type(e).__name__}: {e}); training goes on without W&B "
                       f"(metrics.jsonl has every row)")
        self.run = None

    def _log(self, data: dict, step: int) -> None:
        if self.pending is not None and step > self.pending:  # W&B commits the pending step now
            self._done(self.pending)
        self.run.log(data, step=step)
        self.pending = step

    def _done(self, step: int) -> None:
        self.done, self.pending = step, None
        self.record.write_text(json.dumps({"id": self.run.id, "step": step}))

    def metrics(self, row: dict) -> None:
        step = row["step"]
        if self.run is None or step <= self.done or (self.pending is not None and step <= self.pending):
            return
        try:
            self._log({tensorboard_tag(k): v for k, v in row.items() if k != "step" and _is_number(v)}, step)
        except Exception as e:  # noqa: BLE001
            self._failed(f"logging step {step}", e)

    def samples(self, rows: list[dict]) -> None:
        """Rows of samples.jsonl (one checkpoint's) as a W&B table at their step: logged with that
        step's metrics when it is the pending one, left out when W&B already holds the step."""
        step = rows[0]["step"]
        if self.run is None or step <= self.done or (self.pending is not None and step < self.pending):
            return
        try:
            columns = list(rows[0])
            table = self.wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
            self._log({"samples": table}, step)
        except Exception as e:  # noqa: BLE001
            self._failed(f"logging the samples of step {step}", e)

    def finish(self) -> None:
        """Finish the W&B run (its files are complete; the next init starts or resumes one)."""
        if self.run is None:
            return
        try:
            self.run.finish()
        except Exception as e:  # noqa: BLE001
            self._failed("finishing the run", e)
        self.run = None

    def commit(self) -> None:
        """Commit the pending step (at checkpoints and at the end): W&B holds it from now on."""
        if self.run is None or self.pending is None:
            return
        try:
            self.run.log({}, commit=True)
            self._done(self.pending)
        except Exception as e:  # noqa: BLE001
            self._failed("committing a step", e)
