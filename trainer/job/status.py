"""`status`: what a bucket holds for each run (checkpoints, LATEST, last metrics, export), whether
a job is running it now (its lease in the bucket is unexpired) and how far it is (step k/N, ETA)."""

from __future__ import annotations

import json
import time

import yaml

from trainer.config import Config
from trainer.io.lease import lease_key
from trainer.io.storage import join, open_storage
from trainer.state import protocol
from trainer.state.run import newest_state, run_steps


def run_ids(store) -> list[str]:
    ids = set()
    for o in store.list("runs/"):
        parts = o.key.split("/")
        if len(parts) > 2:
            ids.add(parts[1])
    return sorted(ids)


def run_status(store, run_id: str) -> dict:
    steps = protocol.complete_steps(store, run_id)
    latest = store.read_text_or_none(join(protocol.checkpoints_prefix(run_id), protocol.LATEST))
    metrics = store.read_text_or_none(f"runs/{run_id}/metrics.jsonl") or ""
    rows = [json.loads(line) for line in metrics.splitlines() if line.strip()]
    last_val = next((r for r in reversed(rows) if "val_loss" in r), None)
    final = store.read_text_or_none(f"runs/{run_id}/final/{protocol.MANIFEST}")
    lease = json.loads(store.read_text_or_none(lease_key(run_id)) or "null")
    live = bool(lease) and lease["expires_at"] > time.time()
    target, eta = run_length(store, run_id), None
    if live and rows and target and rows[-1].get("tok_per_s"):
        cfg = yaml.safe_load(store.read_text_or_none(f"runs/{run_id}/config.yaml") or "{}") or {}
        tokens_per_step = (cfg.get("train") or {}).get("batch_tokens") or rows[-1]["tokens"] / rows[-1]["step"]
        eta = max(0.0, (target - rows[-1]["step"]) * tokens_per_step / rows[-1]["tok_per_s"])
    return {
        "live": live, "owner": lease["owner"] if live else None, "target_steps": target, "eta_seconds": eta,
        "run": run_id, "latest": latest.strip() if latest else None, "checkpoints": steps,
        "last_step": rows[-1]["step"] if rows else None, "last_loss": rows[-1].get("loss") if rows else None,
        "last_val_loss": last_val.get("val_loss") if last_val else None,
        "final": store.url(f"runs/{run_id}/final") if final else None,
    }


def run_length(store, run_id: str) -> int | None:
    """The steps the run trains to (run_steps: fixed by a budget in its newest checkpoint, else its
    config's; None while a budget has not fixed it)."""
    cfg = yaml.safe_load(store.read_text_or_none(f"runs/{run_id}/config.yaml") or "{}") or {}
    train = cfg.get("train") or cfg.get("sft") or {}
    return run_steps(train.get("max_steps"), train.get("budget_minutes") or 0.0, newest_state(store, run_id))


def status_report(cfg: Config) -> str:
    store = open_storage(cfg.storage.bucket, cfg.storage)
    lines = [f"bucket {store.url()}"]
    ids = run_ids(store)
    if not ids:
        lines.append("  no runs yet")
    for run_id in ids:
        s = run_status(store, run_id)
        marker = " (this config's run.id)" if run_id == cfg.run.id else ""
        progress = f"step {s['last_step']}/{s['target_steps'] or '?'}" if s["last_step"] is not None else "no step yet"
        state = (f"LIVE ({s['owner']}), {progress}" + (f", ETA {s['eta_seconds'] / 60:.1f} min" if s["eta_seconds"]
                                                          is not None else "")) if s["live"] else f"idle, {progress}"
        lines.append(f"run {run_id}{marker}: {state}")
        lines.append(f"  LATEST: {s['latest']}   complete checkpoints: "
                     f"{', '.join(protocol.step_name(x) for x in s['checkpoints']) or 'none'}")
        lines.append(f"  last logged step {s['last_step']}  loss {s['last_loss']}  val_loss {s['last_val_loss']}")
        lines.append(f"  export: {s['final'] or 'not yet'}")
    return "\n".join(lines)
