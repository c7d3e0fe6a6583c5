"""`status`: live or idle (the run's lease), how far (step k/N), ETA from the last logged speed."""

from __future__ import annotations

import json
import time

from trainer.config import load_config
from trainer.io.lease import lease_key
from trainer.io.storage import open_storage
from trainer.job.status import run_status, status_report


def bucket_with_a_run(tmp_path, lease_expires_in: float | None):
    store = open_storage(str(tmp_path / "bucket"))
    store.write_text("runs/r/config.yaml", "train:\n  max_steps: 8\n  batch_tokens: 1000\n")
    rows = [{"step": s, "loss": 5.0 - s / 10, "tok_per_s": 100.0, "tokens": s * 1000} for s in (2, 4)]
    store.write_text("runs/r/metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    if lease_expires_in is not None:
        store.write_text(lease_key("r"), json.dumps({"owner": "host:1:ab", "expires_at": time.time() + lease_expires_in,
                                                     "acquired_at": 0, "renewed_at": 0}))
    return store


def test_a_run_whose_lease_is_fresh_is_live_with_step_and_eta(tmp_path):
    s = run_status(bucket_with_a_run(tmp_path, 60), "r")
    assert s["live"] and s["owner"] == "host:1:ab" and s["target_steps"] == 8
    assert s["eta_seconds"] == (8 - 4) * 1000 / 100.0  # steps left x tokens per step / tokens per second
    cfg = load_config(None, {"storage.bucket": str(tmp_path / "bucket"), "run.id": "r"}, env={})
    assert "run r (this config's run.id): LIVE (host:1:ab), step 4/8, ETA 0.7 min" in status_report(cfg)


def test_an_expired_or_absent_lease_is_idle(tmp_path):
    for i, expires_in in enumerate((-5, None)):
        s = run_status(bucket_with_a_run(tmp_path / str(i), expires_in), "r")
        assert not s["live"] and s["eta_seconds"] is None and s["target_steps"] == 8
