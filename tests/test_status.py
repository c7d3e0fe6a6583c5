"""`status`: live or idle (the run's lease), how far (step k/N), ETA from the last logged speed;
an SFT run's length (sft.max_steps), base model and validation loss."""

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


def bucket_with_sft_run(tmp_path, **settings):
    """A bucket as `sft` leaves it: the pretraining run `base`, its fine-tuning run (config.yaml as
    stage_sft saves it: the whole resolved config), metrics with an SFT validation loss."""
    from trainer.config import to_yaml

    store = open_storage(str(tmp_path / "bucket"))
    cfg = load_config(None, {"run.id": "base", "train.max_steps": 1000, "train.batch_tokens": 8192,
                             "sft.max_steps": 6, "sft.warmup_steps": 1, **settings}, env={})
    sft_id = cfg.sft.run_id or "base-sft"
    store.write_text("runs/base/config.yaml", to_yaml(cfg))
    store.write_text(f"runs/{sft_id}/config.yaml", to_yaml(cfg))
    rows = [{"step": 2, "loss": 2.5, "tok_per_s": 50.0, "tokens": 2 * 600}, {"step": 4, "val_loss": 1.75},
            {"step": 4, "loss": 2.0, "tok_per_s": 50.0, "tokens": 4 * 600}]
    store.write_text(f"runs/{sft_id}/metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    store.write_text(lease_key(sft_id), json.dumps({"owner": "host:2:cd", "expires_at": time.time() + 60,
                                                    "acquired_at": 0, "renewed_at": 0}))
    return store, cfg, sft_id


def test_an_sft_run_is_as_long_as_sft_max_steps_and_names_its_base_model(tmp_path):
    store, cfg, sft_id = bucket_with_sft_run(tmp_path)
    s = run_status(store, "base-sft")
    assert (s["stage"], s["target_steps"], s["last_val_loss"]) == ("sft", 6, 1.75)  # not train.max_steps=1000
    assert s["model"] == f"sft of {store.url('runs/base/final')}"  # sft.init "": the export of run.id
    assert s["eta_seconds"] == (6 - 4) * 600 / 50.0  # the logged tokens per step, not train.batch_tokens
    text = status_report(load_config(None, {"storage.bucket": str(tmp_path / "bucket")}, env={}))
    assert f"run base-sft: LIVE (host:2:cd), step 4/6, ETA 0.4 min\n  sft of {store.url('runs/base/final')}\n" in text
    assert "  last logged step 4  loss 2.0  sft val_loss 1.75" in text
    assert "model.preset" not in text.split("run base-sft")[1]
    base = run_status(store, "base")  # the pretraining run of the same config is not taken for the SFT
    assert (base["stage"], base["target_steps"], base["model"]) == ("pretrain", 1000, "pretrain of model.preset tiny")
    assert "run base: idle, no step yet\n  pretrain of model.preset tiny\n" in text


def test_an_sft_run_with_its_own_id_and_init(tmp_path):
    store, cfg, sft_id = bucket_with_sft_run(tmp_path, **{"sft.run_id": "chat-v1", "sft.init": "s3://models/qwen"})
    s = run_status(store, "chat-v1")
    assert (s["stage"], s["target_steps"], s["model"]) == ("sft", 6, "sft of s3://models/qwen")
    assert run_status(store, "base")["stage"] == "pretrain"
