"""A run's logs in the bucket: metrics.jsonl (one JSON row per logged step) and samples.jsonl
(continuations at checkpoints). Kept locally, trimmed on resume to the rows up to the resumed
step (a killed run's later rows are dropped, so each step appears once), appended by rank 0, and
uploaded at every checkpoint and at the end. The numbers also go to TensorBoard event files while
training (runs/<id>/tensorboard/, one file per attempt: `tensorboard --logdir` on a copy, or on the
bucket through TensorBoard's S3 support, shows the run live)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from trainer.storage import Storage


class RunLog:
    def __init__(self, store: Storage, run_id: str, local_root: Path, resumed_step: int, main: bool,
                 names: tuple[str, ...] = ("metrics.jsonl", "samples.jsonl")):
        self.store, self.run_id, self.main = store, run_id, main
        self.paths = {name: Path(local_root) / name for name in names}
        self.tb = None
        if main:
            from torch.utils.tensorboard import SummaryWriter

            self.tb_dir = Path(local_root) / "tensorboard"
            self.tb = SummaryWriter(str(self.tb_dir), filename_suffix=f".{int(time.time())}")
            for name, path in self.paths.items():
                old = store.read_text_or_none(f"runs/{run_id}/{name}") or ""
                kept = [line for line in old.splitlines()
                        if line.strip() and json.loads(line).get("step", 0) <= resumed_step]
                path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def append(self, name: str, rows: list[dict]) -> None:
        if self.main:
            with open(self.paths[name], "a", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            if name == "metrics.jsonl":
                for row in rows:
                    for key, value in row.items():
                        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                            self.tb.add_scalar(key, value, row["step"])

    def flush(self) -> None:
        """Upload every log that has rows (rank 0)."""
        if self.main:
            for name, path in self.paths.items():
                if path.stat().st_size or self.store.exists(f"runs/{self.run_id}/{name}"):
                    self.store.upload_file(path, f"runs/{self.run_id}/{name}")
            self.tb.flush()
            for path in self.tb_dir.glob("events.out.tfevents.*"):
                self.store.upload_file(path, f"runs/{self.run_id}/tensorboard/{path.name}")
