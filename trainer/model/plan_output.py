"""A plan (trainer.model.planner.Plan) for its readers: the config tree `run` reads
(`plan_to_config`, with a run.id of its own), plain JSON for tools (`plan_json`) and a table for
people (`format_table`). Pure functions of the plan; no torch."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict

from trainer.config.schema import SHAPE_KEYS, preset_changes
from trainer.model.data_limit import MAX_EPOCHS, REPEATED_DATA_TRAIN
from trainer.model.planner import CHINCHILLA_TOKENS_PER_PARAM, MAX_GPUS, MICRO_BATCHES, MemoryFit, Plan


def plan_to_config(plan: Plan, base: dict) -> dict:
    """A copy of the config tree `base` (as config.to_dict gives, or a YAML file's) with the plan's
    model (model.preset, and model.n_layer ... model.d_ffn of a custom shape, 0 where the preset's
    number holds), train.max_steps, batch_tokens, lr, seq_len and warmup_steps set, and a run.id of
    its own (planned_run_id): a planned model must not resume, or overwrite, base's run. A plan that
    reads its corpus more than once also gets REPEATED_DATA_TRAIN and train.max_epochs=MAX_EPOCHS.
    Memory: train.strategy=fsdp when the plan shards, train.activation_checkpointing=true when it
    needs it, and train.micro_batch_size when memory allows fewer than the loop's default of 16."""
    tree = copy.deepcopy(base)
    model, custom = tree.setdefault("model", {}), preset_changes(plan.preset, plan.shape)
    model["preset"] = plan.preset
    for key in SHAPE_KEYS:  # what was planned is what runs: never base's numbers on another preset
        if key in custom or key in model:
            model[key] = custom.get(key, 0)
    tree.setdefault("train", {}).update({
        "max_steps": plan.steps, "batch_tokens": plan.batch_tokens, "lr": plan.lr,
        "seq_len": plan.seq_len, "warmup_steps": plan.warmup_steps,
    })
    if plan.epochs is not None and plan.epochs > 1:  # repeated data: what trained it best (measured)
        tree["train"].update({**REPEATED_DATA_TRAIN, "max_epochs": MAX_EPOCHS})
    if plan.strategy == "fsdp":
        tree["train"]["strategy"] = "fsdp"
    if plan.activation_checkpointing:
        tree["train"]["activation_checkpointing"] = True
    if plan.micro_batch_size < MICRO_BATCHES[0]:  # the loop's default (0) would run up to 16
        tree["train"]["micro_batch_size"] = plan.micro_batch_size
    tree.setdefault("run", {})["id"] = planned_run_id(plan, tree)
    return tree


def planned_run_id(plan: Plan, tree: dict) -> str:
    """`<preset>-<tokens>-<6 hex digits>`, e.g. `124m-2.6b-3f9a1c`: the model and tokens to read at a
    glance, and a hash of the whole config tree without run.id, so the same plan of the same base
    gets the same id (rerunning it resumes) and any other plan or base gets another."""
    rest = {section: {k: v for k, v in body.items() if (section, k) != ("run", "id")} if isinstance(body, dict)
            else body for section, body in tree.items()}
    digest = hashlib.sha256(json.dumps(rest, sort_keys=True, default=str).encode()).hexdigest()[:6]
    return f"{plan.preset}-{short_count(plan.tokens)}-{digest}"


def short_count(n: float) -> str:
    """1234 -> 1.2k, 2.6e9 -> 2.6b (two significant figures; k, m, b, t for 1e3, 1e6, 1e9, 1e12)."""
    n = float(f"{n:.2g}")  # round first, so 999_999 reads 1m, not 1e+03k
    for unit, scale in (("t", 1e12), ("b", 1e9), ("m", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:g}{unit}"
    return f"{n:g}"


def plan_json(plan: Plan) -> dict:
    """Plain JSON-ready dict for tools."""
    return {
        "basis": plan.basis,
        "why": plan.why,
        "compute": plan.compute,
        "compute_budget": plan.compute_budget,
        "non_embedding_flops_per_token": plan.non_embedding_flops_per_token,
        "train_flops_per_token": plan.train_flops_per_token,
        "tokens": plan.tokens,
        "batch_tokens": plan.batch_tokens,
        "steps": plan.steps,
        "warmup_steps": plan.warmup_steps,
        "lr": plan.lr,
        "seq_len": plan.seq_len,
        "model": {"preset": plan.preset, **asdict(plan.shape), "params": plan.params, "vocab_size": plan.vocab_size,
                  "overrides": preset_changes(plan.preset, plan.shape), "name": plan.model},
        "deepseek_optimum": {"non_embedding_flops_per_token": plan.m_opt, "tokens": plan.d_opt,
                             "batch_tokens": plan.batch_opt, "lr": plan.lr_opt},
        "chinchilla": asdict(plan.chinchilla),
        "corpus_tokens": plan.corpus_tokens,
        "epochs": plan.epochs,
        "gpu": plan.gpu,
        "gpus": plan.gpus,
        "mfu": plan.mfu,
        "wall_hours": plan.wall_hours,
        "gpu_hours": plan.gpu_hours,
        "price_per_gpu_hour": plan.price_per_gpu_hour,
        "cost": plan.cost,
        "strategy": plan.strategy,
        "fits": plan.fits,
        "micro_batch_size": plan.micro_batch_size,
        "activation_checkpointing": plan.activation_checkpointing,
        "memory_gb_per_gpu": plan.memory_gb_per_gpu,
        "gpu_memory_gb": plan.gpu_memory_gb,
        "min_gpus_fsdp": plan.min_gpus_fsdp,
        "min_gpus_fsdp_ac": plan.min_gpus_fsdp_ac,
        "memory": {"ddp": asdict(plan.ddp), "fsdp": asdict(plan.fsdp)},
        "warnings": list(plan.warnings),
    }


def _duration(hours: float) -> str:
    if hours >= 1:
        return f"{hours:.2f} h"
    return f"{hours * 60:.1f} min" if hours >= 1 / 60 else f"{hours * 3600:.2g} s"


def _fit_cell(fit: MemoryFit) -> str:
    checkpointing = ", activation checkpointing" if fit.activation_checkpointing else ""
    verdict = "fits" if fit.fits else "does not fit"
    return f"{verdict}: {fit.gb_per_gpu:.1f} GB/GPU at micro-batch {fit.micro_batch_size}{checkpointing}"


def _gpus_cell(n: int | None) -> str:
    return "none up to " + str(MAX_GPUS) if n is None else str(n)


def format_table(plan: Plan) -> str:
    """A table for people: the DeepSeek optimum, the plan, and Chinchilla's choice side by side; then
    why the plan's model, and the warnings."""
    s, ch = plan.shape, plan.chinchilla
    rows = [
        ("", "DeepSeek optimum", "plan", "Chinchilla (20 tok/param)"),
        ("compute (FLOPs, M x D)", f"{plan.compute_budget:.3e}", f"{plan.compute:.3e}", f"{plan.compute:.3e}"),
        ("model", "", f"{plan.model} ({s.n_layer} layers, d_model {s.d_model}, {s.n_head} heads, "
                      f"{s.n_kv_head} kv heads, ffn {s.d_ffn})", ch.preset),
        ("non-embedding FLOPs/token", f"{plan.m_opt:.3e}", f"{plan.non_embedding_flops_per_token:.3e}", ""),
        ("parameters", "", f"{plan.params / 1e6:.1f}M", f"{ch.params / 1e6:.1f}M"),
        ("tokens", f"{plan.d_opt:.3e}", f"{plan.tokens:.3e}", f"{ch.tokens:.3e}"),
        ("tokens per parameter", "", f"{ch.plan_tokens_per_param:.1f}", f"{CHINCHILLA_TOKENS_PER_PARAM:g}"),
        ("batch (tokens)", f"{plan.batch_opt:.0f}", f"{plan.batch_tokens} = {plan.batch_tokens // plan.seq_len} x "
                                                    f"{plan.seq_len}", ""),
        ("peak lr", f"{plan.lr_opt:.3e}", f"{plan.lr:g}", ""),
        ("steps (warmup)", "", f"{plan.steps} ({plan.warmup_steps})", ""),
    ]
    if plan.epochs is not None:
        rows.append(("epochs of corpus", "", f"{plan.epochs:.2f} of {plan.corpus_tokens:.3e} tokens", ""))
    rows.append(("wall time", "", f"{_duration(plan.wall_hours)} on {plan.gpus} x {plan.gpu} at MFU {plan.mfu:g}", ""))
    rows.append(("GPU-hours", "", f"{plan.gpu_hours:.3g}", ""))
    if plan.cost is not None:
        rows.append(("cost", "", f"{plan.cost:.2f} at {plan.price_per_gpu_hour:g}/GPU-hour", ""))
    rows += [
        (f"memory: DDP ({plan.gpu}, {plan.gpu_memory_gb:g} GB)", "", _fit_cell(plan.ddp), ""),
        (f"memory: FSDP over {plan.gpus}", "", _fit_cell(plan.fsdp), ""),
        ("FSDP needs at least", "", f"{_gpus_cell(plan.min_gpus_fsdp)} x {plan.gpu} "
                                    f"({_gpus_cell(plan.min_gpus_fsdp_ac)} with activation checkpointing)", ""),
        ("strategy", "", f"{plan.strategy}, micro-batch {plan.micro_batch_size}, activation checkpointing "
                         f"{'on' if plan.activation_checkpointing else 'off'}{'' if plan.fits else ' (does not fit)'}",
         ""),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append(f"model chosen: {plan.why}")
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)
