"""`status`: what a bucket holds for each run (checkpoints, LATEST, last metrics, export), whether
a job is running it now (its lease in the bucket is unexpired) and how far it is (step k/N, ETA).
A run's own saved config (runs/<id>/config.yaml) says what it is: pretraining of model.preset, or
fine-tuning (`sft`) of a base model, whose length is sft.max_steps."""

from __future__ import annotations

import json
import time

import yaml

from trainer.config import SHAPE_KEYS, Config, model_label
from trainer.io.artifacts import Artifacts
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


def saved_config(store, run_id: str) -> dict:
    """The run's resolved config as its job saved it ({} before the job wrote it)."""
    return yaml.safe_load(store.read_text_or_none(f"runs/{run_id}/config.yaml") or "{}") or {}


def is_sft(saved: dict, run_id: str) -> bool:
    """Whether run_id is the fine-tuning run of its saved config: outputs of `sft` go to sft.run_id,
    "" meaning <run.id>-sft (trainer/data/conversations.sft_run_id)."""
    run, sft = saved.get("run") or {}, saved.get("sft") or {}
    return run.get("id") != run_id and (sft.get("run_id") or f"{run.get('id')}-sft") == run_id


def base_model(store, saved: dict, run_id: str) -> str:
    """What the run trains: `sft of <model>` (sft.init, or the export of run.id, as stage_sft starts
    from), `pretrain continued from <model.init>` or `pretrain of model.preset <preset>` (with the
    model.* numbers of a custom shape)."""
    if is_sft(saved, run_id):
        init = (saved.get("sft") or {}).get("init") or store.url(f"runs/{(saved.get('run') or {}).get('id')}/final")
        return f"sft of {init}"
    model = saved.get("model") or {}
    if model.get("init"):
        return f"pretrain continued from {model['init']}"
    custom = {k: model[k] for k in SHAPE_KEYS if model.get(k)}
    return f"pretrain of model.preset {model_label(model.get('preset', '?'), custom)}"


def run_status(store, run_id: str) -> dict:
    steps = protocol.complete_steps(store, run_id)
    latest = store.read_text_or_none(join(protocol.checkpoints_prefix(run_id), protocol.LATEST))
    metrics = store.read_text_or_none(f"runs/{run_id}/metrics.jsonl") or ""
    rows = [json.loads(line) for line in metrics.splitlines() if line.strip()]
    last_val = next((r for r in reversed(rows) if "val_loss" in r), None)
    final = store.read_text_or_none(f"runs/{run_id}/final/{protocol.MANIFEST}")
    lease = json.loads(store.read_text_or_none(lease_key(run_id)) or "null")
    live = bool(lease) and lease["expires_at"] > time.time()
    saved = saved_config(store, run_id)
    sft = is_sft(saved, run_id)
    target, eta = run_length(store, run_id, saved), None
    if live and rows and target and rows[-1].get("tok_per_s"):
        # SFT steps hold sft.batch_sequences packed rows (their length may be the model's): the logged mean
        per_step = None if sft else (saved.get("train") or {}).get("batch_tokens")
        tokens_per_step = per_step or rows[-1]["tokens"] / rows[-1]["step"]
        eta = max(0.0, (target - rows[-1]["step"]) * tokens_per_step / rows[-1]["tok_per_s"])
    return {
        "live": live, "owner": lease["owner"] if live else None, "target_steps": target, "eta_seconds": eta,
        "run": run_id, "stage": "sft" if sft else "pretrain", "model": base_model(store, saved, run_id),
        "latest": latest.strip() if latest else None, "checkpoints": steps,
        "last_step": rows[-1]["step"] if rows else None, "last_loss": rows[-1].get("loss") if rows else None,
        "last_val_loss": last_val.get("val_loss") if last_val else None,
        "final": store.url(f"runs/{run_id}/final") if final else None,
        "mixture": None if sft else mixture_progress(store, run_id, saved),
    }


def mixture_progress(store, run_id: str, saved: dict) -> list[dict] | None:
    """A mixture's tokens and passes per source at the newest checkpoint (mixture.source_progress),
    or None for a run of one stream (or before its shards are known)."""
    data, train = saved.get("data") or {}, saved.get("train") or {}
    arts = store.read_text_or_none(f"runs/{run_id}/artifacts.json")
    if not data.get("weights") or not arts:
        return None
    texts = [store.read_text_or_none(join(key, "index.json")) for key in Artifacts.from_json(arts).keys]
    if not all(texts) or len(texts) != len(data.get("sources") or ()):
        return None
    from trainer.data.mixture import source_progress  # numpy: only for a mixture (status imports none otherwise)

    state = newest_state(store, run_id)
    return source_progress(data["sources"], data["weights"], data.get("max_epochs") or (), train.get("seed", 1234),
                           train.get("seq_len", 256), [json.loads(t) for t in texts],
                           state.data_position if state else 0)


def run_length(store, run_id: str, saved: dict | None = None) -> int | None:
    """The steps the run trains to (run_steps, as its stage decides it: sft.max_steps for a
    fine-tuning run; train.max_steps or the count a train.budget_minutes fixed in the newest
    checkpoint for pretraining; None while a budget has not fixed it)."""
    saved = saved_config(store, run_id) if saved is None else saved
    if is_sft(saved, run_id):
        return run_steps((saved.get("sft") or {}).get("max_steps"), 0.0, newest_state(store, run_id))
    train = saved.get("train") or {}
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
        lines.append(f"  {s['model']}")
        lines.append(f"  LATEST: {s['latest']}   complete checkpoints: "
                     f"{', '.join(protocol.step_name(x) for x in s['checkpoints']) or 'none'}")
        val = "sft val_loss" if s["stage"] == "sft" else "val_loss"
        lines.append(f"  last logged step {s['last_step']}  loss {s['last_loss']}  {val} {s['last_val_loss']}")
        if s["mixture"]:
            from trainer.data.mixture import describe_progress

            lines.append(f"  mixture at {s['latest'] or 'the start'}: {describe_progress(s['mixture'])}")
        lines.append(f"  export: {s['final'] or 'not yet'}")
    return "\n".join(lines)
