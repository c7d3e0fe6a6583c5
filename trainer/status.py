"""`status`: what a bucket holds for each run (checkpoints, LATEST, last metrics, export)."""

from __future__ import annotations

import json

from trainer import checkpoint as ckpt
from trainer.config import Config
from trainer.storage import join, open_storage


def run_ids(store) -> list[str]:
    ids = set()
    for o in store.list("runs/"):
        parts = o.key.split("/")
        if len(parts) > 2:
            ids.add(parts[1])
    return sorted(ids)


def run_status(store, run_id: str) -> dict:
    steps = ckpt.complete_steps(store, run_id)
    latest = store.read_text_or_none(join(ckpt.checkpoints_prefix(run_id), ckpt.LATEST))
    metrics = store.read_text_or_none(f"runs/{run_id}/metrics.jsonl") or ""
    rows = [json.loads(line) for line in metrics.splitlines() if line.strip()]
    last_val = next((r for r in reversed(rows) if "val_loss" in r), None)
    final = store.read_text_or_none(f"runs/{run_id}/final/{ckpt.MANIFEST}")
    return {
        "run": run_id, "latest": latest.strip() if latest else None, "checkpoints": steps,
        "last_step": rows[-1]["step"] if rows else None, "last_loss": rows[-1].get("loss") if rows else None,
        "last_val_loss": last_val.get("val_loss") if last_val else None,
        "final": store.url(f"runs/{run_id}/final") if final else None,
    }


def status_report(cfg: Config) -> str:
    store = open_storage(cfg.storage.bucket, cfg.storage)
    lines = [f"bucket {store.url()}"]
    ids = run_ids(store)
    if not ids:
        lines.append("  no runs yet")
    for run_id in ids:
        s = run_status(store, run_id)
        marker = " (this config's run.id)" if run_id == cfg.run.id else ""
        lines.append(f"run {run_id}{marker}")
        lines.append(f"  LATEST: {s['latest']}   complete checkpoints: "
                     f"{', '.join(ckpt.step_name(x) for x in s['checkpoints']) or 'none'}")
        lines.append(f"  last logged step {s['last_step']}  loss {s['last_loss']}  val_loss {s['last_val_loss']}")
        lines.append(f"  export: {s['final'] or 'not yet'}")
    return "\n".join(lines)
