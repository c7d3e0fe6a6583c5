"""Checks on the values of a Config and the relations between them: every problem, each naming the
key to change. Types and choices (Literal fields) are checked when the values are read (load.py)."""

from __future__ import annotations

import math
from collections.abc import Callable

from trainer.config.schema import SHAPE_KEYS, Config, model_shape, shape_overrides

Need = Callable[[bool, str, str], None]


def check(cfg: Config) -> list[str]:
    """Every problem with the values of cfg and the relations between them, each naming its key."""
    problems: list[str] = []

    def need(cond: bool, key: str, msg: str):
        if not cond:
            section, _, name = key.partition(".")
            problems.append(f"{key}: {msg} (got {getattr(getattr(cfg, section), name)!r})")

    _check_inputs(cfg, need)
    _check_model(cfg, need, problems)
    _check_train(cfg, need)
    _check_outputs(cfg, need, problems)
    return problems


def _check_inputs(cfg: Config, need: Need) -> None:
    """run, storage, data, tokenizer."""
    need(bool(cfg.run.id) and all(c.isalnum() or c in "-_." for c in cfg.run.id), "run.id",
         "must be non-empty letters, digits, '-', '_' or '.'")
    need(cfg.run.lease_seconds >= 10, "run.lease_seconds", "must be at least 10")
    need(bool(cfg.storage.bucket), "storage.bucket", "must be set")
    need(not cfg.storage.bucket.startswith("s3://") or len(cfg.storage.bucket) > 5, "storage.bucket",
         "s3:// needs a bucket name")
    need(cfg.storage.max_concurrency >= 1, "storage.max_concurrency", "must be at least 1")
    need(cfg.storage.retries >= 1, "storage.retries", "must be at least 1")
    need(cfg.storage.timeout_seconds >= 1, "storage.timeout_seconds", "must be at least 1")
    need(len(cfg.data.sources) > 0, "data.sources", "must list at least one file, folder or glob")
    _check_mixture(cfg, need)
    need(0 <= cfg.data.val_permille < 1000, "data.val_permille", "must be in [0, 1000)")
    need(cfg.data.shard_tokens >= 1024, "data.shard_tokens", "must be at least 1024")
    need(cfg.data.min_chars >= 0, "data.min_chars", "must be >= 0")
    need(cfg.data.prepare_workers >= 0, "data.prepare_workers", "must be >= 0 (0 = every core)")
    need(cfg.data.prepare_threads >= 0, "data.prepare_threads", "must be >= 0 (0 = automatic)")
    need(cfg.data.prepare_wait_seconds > 0, "data.prepare_wait_seconds", "must be > 0")
    need(cfg.data.max_chars >= 0, "data.max_chars", "must be >= 0 (0 = no limit)")
    need(bool(cfg.data.text_field), "data.text_field", "must be set")
    need(cfg.tokenizer.path != "" or 256 + 8 <= cfg.tokenizer.vocab_size <= 1_000_000, "tokenizer.vocab_size",
         "must be between 264 and 1000000")
    need(not (cfg.model.init and cfg.tokenizer.path), "tokenizer.path",
         "must be empty with model.init: continued pretraining uses the init model's own tokenizer")
    need(1 <= cfg.tokenizer.max_token_length <= 64, "tokenizer.max_token_length", "must be between 1 and 64")
    need(0 <= cfg.tokenizer.max_latin_token_bytes <= 256, "tokenizer.max_latin_token_bytes",
         "must be between 0 and 256")
    need(cfg.tokenizer.min_frequency >= 1, "tokenizer.min_frequency", "must be at least 1")
    need(cfg.tokenizer.sample_bytes >= 1000, "tokenizer.sample_bytes", "must be at least 1000")


def _check_mixture(cfg: Config, need: Need) -> None:
    """data.weights and data.max_epochs: one number per data.sources entry (docs/running.md, Data mixtures)."""
    d, n = cfg.data, len(cfg.data.sources)
    if d.weights:
        need(n >= 2, "data.weights", "a mixture needs at least 2 data.sources (one source is the whole stream: "
                                     "leave data.weights empty)")
        need(len(d.weights) == n, "data.weights", f"must give one weight per data.sources entry ({n})")
        need(all(math.isfinite(w) and w > 0 for w in d.weights), "data.weights",
             "every weight must be a positive number (leave a source out to give it none)")
    need(not d.max_epochs or bool(d.weights), "data.max_epochs",
         "caps the sources of a mixture: set data.weights too (one stream: train.max_epochs)")
    if d.max_epochs and d.weights:
        need(len(d.max_epochs) == n, "data.max_epochs", f"must give one cap per data.sources entry ({n}; 0 = no cap)")
        need(all(math.isfinite(e) and e >= 0 for e in d.max_epochs), "data.max_epochs",
             "every cap must be 0 (no cap) or a number of passes")


def _check_model(cfg: Config, need: Need, problems: list[str]) -> None:
    """model.n_layer ... model.d_ffn, each 0 (the preset's) or positive, and the shape they make with
    the preset: whole heads, whole key/value groups, an even head size."""
    for key in SHAPE_KEYS:
        need(getattr(cfg.model, key) >= 0, f"model.{key}", "must be 0 (the preset's) or a positive number")
    if any(getattr(cfg.model, key) < 0 for key in SHAPE_KEYS):
        return
    shape, overridden = model_shape(cfg.model), shape_overrides(cfg.model)

    def value(key: str) -> str:  # a sibling's value as the shape has it, and where it comes from
        n = getattr(shape, key)
        return f"model.{key}={n}" + ("" if key in overridden else f" from preset {cfg.model.preset}")

    def refuse(keys: tuple[str, str], msg: str) -> None:  # named by the key the user set, else the first
        key = next((k for k in keys if k in overridden), keys[0])
        problems.append(f"model.{key}: {msg} ({', '.join(value(k) for k in keys)})")

    if shape.d_model % shape.n_head:
        refuse(("n_head", "d_model"), "heads split the hidden size evenly: model.d_model must be a multiple of "
                                      "model.n_head")
    elif (shape.d_model // shape.n_head) % 2:
        refuse(("d_model", "n_head"), f"the head size model.d_model / model.n_head = {shape.d_model // shape.n_head} "
                                      "must be even: RoPE rotates pairs of dimensions")
    if shape.n_head % shape.n_kv_head:
        refuse(("n_kv_head", "n_head"), "each key/value head serves a whole group of heads: model.n_head must be "
                                        "a multiple of model.n_kv_head")


def _check_train(cfg: Config, need: Need) -> None:
    t = cfg.train
    need(t.max_steps >= 1, "train.max_steps", "must be at least 1")
    need(t.budget_minutes >= 0, "train.budget_minutes", "must be 0 (off) or a number of minutes")
    need(t.max_epochs >= 0, "train.max_epochs", "must be 0 (off) or a number of epochs")
    need(t.muon_lr >= 0, "train.muon_lr", "must be 0 (2 x train.lr) or a learning rate")
    need(t.seq_len >= 8, "train.seq_len", "must be at least 8")
    need(t.batch_tokens >= t.seq_len and t.batch_tokens % t.seq_len == 0, "train.batch_tokens",
         f"must be a positive multiple of train.seq_len ({t.seq_len})")
    need(t.micro_batch_size >= 0, "train.micro_batch_size", "must be >= 0 (0 = automatic)")
    need(0 < t.lr < 1, "train.lr", "must be in (0, 1)")
    need(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
    need(0 <= t.warmup_steps < t.max_steps or t.max_steps < 1, "train.warmup_steps", "must be in [0, train.max_steps)")
    need(0 < t.decay_fraction <= 1, "train.decay_fraction", "must be in (0, 1]")
    need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(0 <= t.dropout < 1, "train.dropout", "must be in [0, 1) (0 = off)")
    need(0 <= t.beta1 < 1, "train.beta1", "must be in [0, 1)")
    need(0 <= t.beta2 < 1, "train.beta2", "must be in [0, 1)")
    need(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 = off)")
    need(t.checkpoint_every_steps >= 1, "train.checkpoint_every_steps", "must be at least 1")
    need(t.eval_every_steps >= 0, "train.eval_every_steps", "must be >= 0")
    need(t.eval_sequences >= 1, "train.eval_sequences", "must be at least 1")
    need(t.log_every_steps >= 1, "train.log_every_steps", "must be at least 1")
    need(1 <= t.grace_seconds <= 3600, "train.grace_seconds", "must be between 1 and 3600")
    need(t.spike_factor == 0 or t.spike_factor > 1, "train.spike_factor", "must be 0 (off) or greater than 1")
    need(t.nproc >= 0, "train.nproc", "must be >= 0 (0 = automatic)")


def _check_outputs(cfg: Config, need: Need, problems: list[str]) -> None:
    """checkpoint, sample, sft."""
    need(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be at least 1")
    need(cfg.sample.max_new_tokens >= 1, "sample.max_new_tokens", "must be at least 1")
    need(cfg.sample.temperature >= 0, "sample.temperature", "must be >= 0 (0 = greedy)")
    need(cfg.sample.top_k >= 0, "sample.top_k", "must be >= 0 (0 = off)")
    need(0 < cfg.sample.top_p <= 1, "sample.top_p", "must be in (0, 1]")
    need(cfg.sample.repetition_penalty > 0, "sample.repetition_penalty", "must be > 0 (1 = off)")
    need(cfg.sample.heldout_prompts >= 0, "sample.heldout_prompts", "must be >= 0")
    need(cfg.sample.prompt_chars >= 1, "sample.prompt_chars", "must be at least 1")
    need(cfg.sample.eval_chars >= 0, "sample.eval_chars", "must be >= 0 (0 = no bits-per-character score)")
    for i, prompt in enumerate(cfg.sample.prompts):  # an empty prompt gives the model 0 tokens to continue
        if not prompt.strip():
            problems.append(f"sample.prompts[{i}]: must hold text, not only whitespace (got {prompt!r})")
    sft = cfg.sft
    need(sft.run_id == "" or all(c.isalnum() or c in "-_." for c in sft.run_id), "sft.run_id",
         "must be letters, digits, '-', '_' or '.' (or empty for <run.id>-sft)")
    need(len(sft.sources) > 0, "sft.sources", "must list at least one conversation file, folder or glob")
    need(bool(sft.messages_field), "sft.messages_field", "must be set")
    need(sft.seq_len == 0 or sft.seq_len >= 8, "sft.seq_len", "must be 0 (the model's context) or at least 8")
    need(sft.batch_sequences >= 1, "sft.batch_sequences", "must be at least 1")
    need(sft.max_steps >= 1, "sft.max_steps", "must be at least 1")
    need(0 < sft.lr < 1, "sft.lr", "must be in (0, 1)")
    need(0 <= sft.warmup_steps < max(1, sft.max_steps), "sft.warmup_steps", "must be in [0, sft.max_steps)")
    need(sft.checkpoint_every_steps >= 1, "sft.checkpoint_every_steps", "must be at least 1")
