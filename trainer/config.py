"""The configuration tree: frozen dataclasses, a YAML file, `--section.key=value` overrides.

Precedence: defaults in code < YAML file < environment (a few keys containers need) < overrides.
Every problem (unknown key, wrong type, bad value) is collected and raised together in one
ConfigError, each line naming the key to change. Nothing heavy happens before this passes.

Each field's docstring (the string literal under it) is the documentation of the option:
`entrypoint.py <command> --help` and docs/config.md are generated from it (field_docs, markdown).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import os
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """One or more invalid configuration values; the message lists each with its key."""


@dataclass(frozen=True)
class RunConfig:
    """Which run this is: its id names its folder in the bucket."""

    id: str = "demo"
    """run name; outputs go to <bucket>/runs/<id>/; rerunning the same id resumes"""
    takeover: bool = False
    """start even if another job holds this run's lease in the bucket"""
    lease_seconds: int = 120
    """a job's lease on run.id expires this long after its last renewal"""
    resume_on_new_data: bool = False
    """resume this run's checkpoint although its corpus changed (tokenizer, model and seq_len must not)"""
    report_to: tuple[str, ...] = ("tensorboard",)
    """where metrics also go while training: tensorboard (runs/<id>/tensorboard/), wandb (pip install '.[wandb]')"""
    wandb_project: str = ""
    """W&B project when run.report_to has wandb; "" = WANDB_PROJECT, else zh-pretrain"""
    wandb_entity: str = ""
    """W&B team or user when run.report_to has wandb; "" = WANDB_ENTITY, else your default entity"""


@dataclass(frozen=True)
class StorageConfig:
    """Where outputs go (a local folder or S3) and how transfers behave."""

    bucket: str = "./bucket"
    """root for all outputs: a local folder or s3://bucket/prefix"""
    endpoint_url: str = ""
    """S3 endpoint (MinIO, R2); empty = AWS_ENDPOINT_URL or AWS itself"""
    region: str = ""
    """S3 region; empty = AWS_REGION / AWS_DEFAULT_REGION or us-east-1"""
    local_dir: str = "./work"
    """scratch folder on this machine: pulled corpus, shards, staged checkpoints"""
    max_concurrency: int = 8
    """parallel transfers for pull and uploads"""
    retries: int = 8
    """attempts per S3 request (botocore standard retry mode, with backoff)"""
    timeout_seconds: int = 60
    """connect and read timeout of one S3 request; a stalled request is retried"""


@dataclass(frozen=True)
class DataConfig:
    """The pretraining corpus: where it is, how records are read, cleaned and split."""

    sources: tuple[str, ...] = ("data/sample",)
    """files, folders, globs (local or s3://), datasets folders, hf://datasets/<owner>/<name>[/<config>]"""
    text_field: str = "text"
    """field holding the document in jsonl/json/parquet records"""
    on_error: str = "fail"
    """bad records: fail (error names file and line) or skip (counted)"""
    val_permille: int = 5
    """documents held out for validation, per thousand, chosen by text hash"""
    shard_tokens: int = 50_000_000
    """tokens per packed shard file"""
    nfkc: bool = False
    """apply Unicode NFKC normalisation to every document"""
    to_simplified: bool = False
    """convert traditional to simplified Chinese (OpenCC t2s)"""
    min_chars: int = 1
    """drop documents shorter than this (after normalisation)"""
    max_chars: int = 0
    """cut documents longer than this many characters; 0 = no limit"""
    dedup: bool = True
    """drop exact duplicate documents (by text hash)"""


@dataclass(frozen=True)
class TokenizerConfig:
    """The byte-level BPE tokenizer trained on the corpus (or an existing one loaded)."""

    path: str = ""
    """load this Hugging Face tokenizer (folder, local or s3://) instead of training"""
    vocab_size: int = 32000
    """target vocabulary size including special and byte tokens"""
    max_token_length: int = 4
    """longest token in characters"""
    pre_tokenizer: str = "qwen2"
    """split before BPE: qwen2, deepseek-llm, gpt-2 (as those models; llama.cpp runs them), zh (until 2026-11-30)"""
    # docs/tokenizer.md: qwen2 gives 4-7% more chars/token than zh on poetry, news and reviews, and
    # only the llama.cpp splits convert to GGUF (scripts/convert_to_gguf.py).
    # Past 4 Han characters merges memorise phrases, not words (docs/tokenizer.md: 4 gives the best
    # held-out chars/token at 32k on classical poetry).
    min_frequency: int = 2
    """a merge must occur at least this often in the sample"""
    sample_bytes: int = 10_000_000
    """cap on text read for training (bytes), sampled evenly across shards in one pass; peak RSS scales with it"""
    # docs/tokenizer.md: 10 MB of Chinese is past where chars/token stops improving.


@dataclass(frozen=True)
class ModelConfig:
    """The model's shape and attention implementation."""

    preset: str = "tiny"
    """named shape from trainer/model/llama.py PRESETS (tiny, 25m, 124m, 350m, 760m, 1b)"""
    attn_implementation: str = "auto"
    """training attention: auto (flash_attention_2 if installed, else sdpa_causal), sdpa, eager"""
    tie_embeddings: bool = False
    """share input embedding and lm_head weights"""


@dataclass(frozen=True)
class TrainConfig:
    """Pretraining: batch, optimizer, schedule, checkpoints, failure handling, devices."""

    max_steps: int = 200
    """optimizer steps in the whole run (ignored when train.budget_minutes is set)"""
    max_epochs: float = 0.0
    """stop after this many passes over the training tokens (caps max_steps or the budget's steps); 0 = off"""
    budget_minutes: float = 0.0
    """train for this wall-clock time instead of max_steps: the step count is fixed after warm-up; 0 = off"""
    seq_len: int = 256
    """tokens per training sequence"""
    batch_tokens: int = 8192
    """global batch in tokens per optimizer step (all ranks, all micro-batches)"""
    micro_batch_size: int = 0
    """sequences per rank per forward pass; 0 = as many as the batch allows, up to 16"""
    lr: float = 1e-3
    """peak learning rate"""
    min_lr_ratio: float = 0.1
    """final learning rate as a fraction of lr"""
    warmup_steps: int = 20
    """linear warmup from 0 to lr"""
    schedule: str = "cosine"
    """cosine, wsd or multistep (DeepSeek LLM 80/90% steps)"""
    decay_fraction: float = 0.2
    """wsd: fraction of steps spent in the final decay"""
    optimizer: str = "adamw"
    """adamw, or muon: Muon on the decoder's hidden matrices and AdamW on the rest (torch >= 2.9)"""
    muon_lr: float = 0.0
    """muon: peak learning rate of the hidden matrices; 0 = 2 x train.lr (best of those measured, 124m)"""
    weight_decay: float = 0.1
    """weight decay on matrices (not on norms or biases); ~0.8 pays when the corpus repeats (epochs > 1)"""
    beta1: float = 0.9
    """AdamW beta1"""
    beta2: float = 0.95
    """AdamW beta2"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this; 0 = off"""
    seed: int = 1234
    """seeds weights, data order and every rank's RNG"""
    checkpoint_every_steps: int = 100
    """save and publish a checkpoint this often (and at the end)"""
    eval_every_steps: int = 100
    """validation loss this often (and at the end); 0 = only at the end"""
    eval_sequences: int = 128
    """held-out sequences scored at each evaluation: the first ones, the same set on any number of processes"""
    log_every_steps: int = 10
    """metrics line this often (the only host-device sync in the loop)"""
    grace_seconds: int = 25
    """on SIGTERM, finish the step, checkpoint and exit within this"""
    nproc: int = 0
    """processes per node for torchrun; 0 = all local GPUs (1 on CPU)"""
    device: str = "auto"
    """where to train and generate: auto (cuda when available), cuda or cpu"""
    dtype: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), bf16 or fp32"""
    compile: str = "auto"
    """torch.compile the model: auto (on GPU), on, off"""
    strategy: str = "auto"
    """ddp (each rank holds the whole model), fsdp (FSDP2: weights, grads, optimizer sharded); auto: fsdp from 2B"""
    activation_checkpointing: bool = False
    """recompute each decoder layer's activations in the backward: less memory, ~1/3 more compute"""
    float8: bool = False
    """FP8 matmuls in the decoder layers (torchao float8 training; Hopper/Ada GPUs); exports stay bf16/fp32"""
    on_nonfinite: str = "skip"
    """non-finite loss/grad: skip the update (counted), rollback to last checkpoint, fail"""
    spike_factor: float = 0.0
    """logged loss > this x running mean: a spike (counted; on_nonfinite rollback/fail); 0=off"""


@dataclass(frozen=True)
class CheckpointConfig:
    """How many checkpoints are kept and how they are uploaded."""

    keep_last: int = 3
    """keep this many newest checkpoints in the bucket, plus the final one"""
    upload_async: bool = True
    """upload in a background thread while training goes on"""


@dataclass(frozen=True)
class SampleConfig:
    """Text generation: prompts and sampling settings for samples, generate, chat and eval."""

    prompts: tuple[str, ...] = ("床前明月光", "春眠不覺曉", "白日依山盡")
    """prompts sampled after export and at checkpoints; each must hold text"""
    max_new_tokens: int = 64
    """tokens generated per prompt"""
    temperature: float = 0.8
    """sampling temperature; 0 = greedy"""
    top_k: int = 50
    """keep this many most likely tokens; 0 = off"""
    top_p: float = 0.95
    """nucleus sampling mass; 1 = off"""
    repetition_penalty: float = 1.1
    """above 1 discourages repeating earlier tokens; 1 = off"""
    at_checkpoints: bool = True
    """generate sample.prompts at every checkpoint (rank 0) into runs/<id>/samples.jsonl"""
    heldout_prompts: int = 32
    """eval/report: continue this many held-out documents from their first sample.prompt_chars characters"""
    prompt_chars: int = 5
    """eval/report: prompt length in characters of those continuations, compared with the human text"""
    eval_chars: int = 200_000
    """eval/report: held-out characters scored for bits per character"""


@dataclass(frozen=True)
class SftConfig:
    """Supervised fine-tuning (`entrypoint.py sft`). Settings not here (schedule, min_lr_ratio, betas,
    weight decay, clipping, seed, device, dtype, compile, micro_batch_size) come from train.*."""

    init: str = ""
    """model to start from: export or checkpoint folder, local or s3://; "" = runs/<run.id>/final"""
    run_id: str = ""
    """outputs go to <bucket>/runs/<sft.run_id>/; "" = <run.id>-sft; rerunning the same id resumes"""
    sources: tuple[str, ...] = ("data/sft-sample",)
    """conversations (jsonl/json/parquet): files, folders, globs, s3://, datasets folders, hf://datasets/..."""
    messages_field: str = "messages"
    """record field holding the turns: [{"role": ..., "content": ...}, ...]"""
    seq_len: int = 0
    """tokens per packed sequence; 0 = the model's context (max_position_embeddings)"""
    batch_sequences: int = 16
    """packed sequences per optimizer step (all ranks, all micro-batches)"""
    max_steps: int = 100
    """optimizer steps of fine-tuning (the conversations repeat as epochs)"""
    lr: float = 1e-4
    """peak learning rate"""
    warmup_steps: int = 10
    """linear warmup from 0 to sft.lr"""
    checkpoint_every_steps: int = 50
    """save and publish a checkpoint this often (and at the end)"""
    after_pretrain: bool = False
    """`run` fine-tunes right after pretraining and export"""


@dataclass(frozen=True)
class Config:
    """The whole configuration: one section per concern."""

    run: RunConfig = field(default_factory=RunConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    sft: SftConfig = field(default_factory=SftConfig)


# Environment variables that set config keys (containers and launchers pass settings this way).
# Credentials are never config keys: boto3 reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY itself.
ENV_KEYS = {
    "RUN_ID": "run.id",
    "BUCKET": "storage.bucket",
    "AWS_ENDPOINT_URL": "storage.endpoint_url",
    "AWS_REGION": "storage.region",
    "LOCAL_DIR": "storage.local_dir",
}

CHOICES = {
    "data.on_error": ("fail", "skip"),
    "model.attn_implementation": ("auto", "sdpa_causal", "sdpa", "eager", "flash_attention_2"),
    "train.schedule": ("cosine", "wsd", "multistep"),
    "train.device": ("auto", "cuda", "cpu"),
    "train.dtype": ("auto", "bf16", "fp32"),
    "train.compile": ("auto", "on", "off"),
    "train.on_nonfinite": ("skip", "rollback", "fail"),
    "train.optimizer": ("adamw", "muon"),
    "train.strategy": ("auto", "ddp", "fsdp"),
    "tokenizer.pre_tokenizer": ("zh", "qwen2", "deepseek-llm", "gpt-2"),
}
REPORT_TO = ("tensorboard", "wandb")  # run.report_to: trainer/training/runlog.py RunLog writes to each


def _resolve(cls: type, name: str):
    return typing.get_type_hints(cls)[name]


def _coerce(value, hint, key: str, problems: list[str]):
    """Convert `value` (from YAML, a CLI string or fire) to the field's type, or record a problem."""
    if isinstance(value, str) and hint is not str:
        try:
            value = yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError:
            pass
    origin = typing.get_origin(hint)
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}: expected a list, got {value!r}")
            return None
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        out = [_coerce(v, item, f"{key}[{i}]", problems) for i, v in enumerate(value)]
        return tuple(out)
    if hint is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{key}: expected true or false, got {value!r}")
        return None
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        problems.append(f"{key}: expected an integer, got {value!r}")
        return None
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        problems.append(f"{key}: expected a number, got {value!r}")
        return None
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append(f"{key}: expected a string, got {value!r}")
        return None
    raise TypeError(f"unsupported config type {hint} for {key}")


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not prefix:
            flat.update(_flatten(v, f"{key}."))
        else:
            flat[key] = v
    return flat


def load_config(path: str | None = None, overrides: dict | None = None, env: dict | None = None) -> Config:
    """Build the Config from defaults, the YAML file at `path`, the environment and overrides.

    `overrides` maps dotted keys ("train.max_steps") to values (strings are parsed as YAML).
    Raises ConfigError listing every problem; from this machine's environment (env None) that
    includes optional packages the config needs and this machine lacks (missing_packages).
    """
    problems: list[str] = []
    layers: list[tuple[str, dict]] = []
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections (run:, data:, ...)")
        for section, body in tree.items():
            if not isinstance(body, dict):
                problems.append(f"{section}: expected a mapping of keys, got {body!r} (in {path})")
        layers.append((str(path), _flatten({k: v for k, v in tree.items() if isinstance(v, dict)})))
    here = env is None  # this machine's environment: a command about to run here, not a saved or rendered config
    env = os.environ if env is None else env
    layers.append(("environment", {key: env[name] for name, key in ENV_KEYS.items() if env.get(name)}))
    layers.append(("overrides", dict(overrides or {})))

    hints = {s.name: typing.get_type_hints(_resolve(Config, s.name)) for s in dataclasses.fields(Config)}
    values: dict[str, dict] = {s: {} for s in hints}
    for source, flat in layers:
        for key, raw in flat.items():
            section, _, name = key.partition(".")
            if section not in hints:
                problems.append(f"{key}: unknown section '{section}' (from {source}); known: {', '.join(hints)}")
                continue
            if name not in hints[section]:
                problems.append(f"{key}: unknown key (from {source}); known in {section}: {', '.join(hints[section])}")
                continue
            before = len(problems)
            value = _coerce(raw, hints[section][name], key, problems)
            if len(problems) == before:  # a value that doesn't parse keeps the default (and its problem)
                values[section][name] = value
    # Check the values that parsed too, so one error lists every problem, not the first kind only.
    sections = {s: _resolve(Config, s)(**values[s]) for s in hints}
    cfg = Config(**sections)
    problems += check(cfg) + (missing_packages(cfg) if here else [])
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return cfg


def missing_packages(cfg: Config) -> list[str]:
    """Optional packages the config names that this machine lacks. Checked only for a command about
    to run here (load_config from the environment): a config saved with a run or rendered by
    `submit` for another machine (the image) may name them."""
    from importlib.util import find_spec

    if "wandb" in cfg.run.report_to and find_spec("wandb") is None:
        return ["run.report_to: wandb is not installed here: pip install '.[wandb]', or leave wandb out of "
                "run.report_to"]
    return []


def validate(cfg: Config) -> None:
    """Check values and relations between them; raise ConfigError listing every problem."""
    problems = check(cfg)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


def check(cfg: Config) -> list[str]:
    """Every problem with the values of cfg and the relations between them, each naming its key."""
    problems = []
    for key, allowed in CHOICES.items():
        value = get(cfg, key)
        if value not in allowed:
            problems.append(f"{key}: {value!r} is not one of {', '.join(allowed)}")

    def need(cond: bool, key: str, msg: str):
        if not cond:
            problems.append(f"{key}: {msg} (got {get(cfg, key)!r})")

    need(bool(cfg.run.id) and all(c.isalnum() or c in "-_." for c in cfg.run.id), "run.id",
         "must be non-empty letters, digits, '-', '_' or '.'")
    need(cfg.run.lease_seconds >= 10, "run.lease_seconds", "must be at least 10")
    for i, name in enumerate(cfg.run.report_to):
        if name not in REPORT_TO:
            problems.append(f"run.report_to[{i}]: {name!r} is not one of {', '.join(REPORT_TO)}")
    need(bool(cfg.storage.bucket), "storage.bucket", "must be set")
    need(not cfg.storage.bucket.startswith("s3://") or len(cfg.storage.bucket) > 5, "storage.bucket",
         "s3:// needs a bucket name")
    need(cfg.storage.max_concurrency >= 1, "storage.max_concurrency", "must be at least 1")
    need(cfg.storage.retries >= 1, "storage.retries", "must be at least 1")
    need(cfg.storage.timeout_seconds >= 1, "storage.timeout_seconds", "must be at least 1")
    need(len(cfg.data.sources) > 0, "data.sources", "must list at least one file, folder or glob")
    need(0 <= cfg.data.val_permille < 1000, "data.val_permille", "must be in [0, 1000)")
    need(cfg.data.shard_tokens >= 1024, "data.shard_tokens", "must be at least 1024")
    need(cfg.data.min_chars >= 0, "data.min_chars", "must be >= 0")
    need(cfg.data.max_chars >= 0, "data.max_chars", "must be >= 0 (0 = no limit)")
    need(bool(cfg.data.text_field), "data.text_field", "must be set")
    need(cfg.tokenizer.path != "" or 256 + 8 <= cfg.tokenizer.vocab_size <= 1_000_000, "tokenizer.vocab_size",
         "must be between 264 and 1000000")
    need(1 <= cfg.tokenizer.max_token_length <= 64, "tokenizer.max_token_length", "must be between 1 and 64")
    need(cfg.tokenizer.min_frequency >= 1, "tokenizer.min_frequency", "must be at least 1")
    need(cfg.tokenizer.sample_bytes >= 1000, "tokenizer.sample_bytes", "must be at least 1000")
    from trainer.model.llama import PRESETS  # local import: model.py imports torch

    need(cfg.model.preset in PRESETS, "model.preset", f"must be one of {', '.join(PRESETS)}")
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
    return problems


def get(cfg: Config, key: str):
    section, _, name = key.partition(".")
    return getattr(getattr(cfg, section), name)


def to_dict(cfg: Config) -> dict:
    """Plain nested dict (tuples as lists) for YAML/JSON. Holds no secrets: credentials are never keys."""
    def plain(v):
        return list(v) if isinstance(v, tuple) else v
    return {s: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, s)).items()} for s in
            (f.name for f in dataclasses.fields(Config))}


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), allow_unicode=True, sort_keys=False)


def from_dict(tree: dict) -> Config:
    """Rebuild a Config saved by to_dict (inside a checkpoint or a run folder), ignoring the environment."""
    return load_config_tree(tree)


def load_config_tree(tree: dict) -> Config:
    flat = _flatten(tree)
    return load_config(None, flat, env={})


def replace(cfg: Config, **dotted) -> Config:
    """A copy of cfg with dotted keys changed: replace(cfg, **{"train.max_steps": 5})."""
    tree = to_dict(cfg)
    for key, value in dotted.items():
        section, _, name = key.partition(".")
        tree[section][name] = value
    return load_config_tree(tree)


# Documentation generated from the dataclasses ---------------------------------------------------

@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its docstring} for a config dataclass: the string literal right under each
    field (as LitGPT and jsonargparse document options). Raises ValueError naming a field without one."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in docs]
    if missing:
        raise ValueError(f"{cls.__name__}: fields without a docstring: {', '.join(missing)}")
    return docs


def section_doc(section: str) -> str:
    """The section's class docstring, on one line."""
    return " ".join((_resolve(Config, section).__doc__ or "").split())


def sections() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def type_name(key: str) -> str:
    """How a key's value is written: int, float, true|false, list of str, or its choices a|b|c."""
    if key in CHOICES:
        return "|".join(CHOICES[key])
    section, _, name = key.partition(".")
    hint = typing.get_type_hints(_resolve(Config, section))[name]
    if typing.get_origin(hint) is tuple:
        return "list of str"
    return "true|false" if hint is bool else hint.__name__


def format_value(value) -> str:
    """A value as it would be written in YAML or on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return json.dumps(list(value), ensure_ascii=False)
    if value == "":
        return '""'
    return str(value)


def key_rows(section: str) -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) for every key of a section, in declaration order."""
    cls = _resolve(Config, section)
    docs = field_docs(cls)
    return [(f"{section}.{f.name}", type_name(f"{section}.{f.name}"), format_value(getattr(cls(), f.name)),
             docs[f.name]) for f in dataclasses.fields(cls)]


def help_text(names: list[str]) -> str:
    """`--help`'s list of config keys: `names` are sections ("train", every key) or keys
    ("train.device"), grouped by section, each key with its default, type and one-line doc."""
    lines = []
    for section in sections():
        wanted = section in names
        rows = [r for r in key_rows(section) if wanted or r[0] in names]
        if rows:
            lines.append(f"  {section}: {section_doc(section)}")
        for key, kind, default, doc in rows:
            lines.append(f"    --{key}={default}  ({kind})")
            lines.append(f"        {doc}")
    return "\n".join(lines)


def markdown() -> str:
    """docs/config.md: every section and key with its type, default and docstring."""
    env = {key: name for name, key in ENV_KEYS.items()}
    out = ["# Configuration", "",
           "<!-- Generated from trainer/config.py by `python entrypoint.py config-docs > docs/config.md`; "
           "tests/test_cli_help.py fails when this file is not current. -->", "",
           "Values come from, in order: the defaults below, the YAML file (`--config` or `CONFIG`), environment "
           "variables, then `--section.key=value` overrides. Unknown keys, wrong types and bad values are all "
           "reported together, each with its key. `python entrypoint.py <command> --help` lists the keys a "
           "command uses.", ""]
    for section in sections():
        out += [f"## {section}", "", section_doc(section), "", "| key | type | default | |", "|---|---|---|---|"]
        for key, kind, default, doc in key_rows(section):
            doc = doc + (f" (environment: `{env[key]}`)" if key in env else "")
            doc = doc.replace("|", "\\|").replace("<", "\\<")  # a table cell; <bucket> is not an HTML tag
            cells = [f"`{key}`", kind.replace("|", " \\| "), f"`{default}`", doc]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def summary(cfg: Config) -> str:
    """Two or three lines for the start of a command: the run, the bucket, and every key whose value
    differs from its default (the full resolved config is saved with the run as config.yaml)."""
    default = _flatten(to_dict(Config()))
    changed = [f"{k}={format_value(v)}" for k, v in _flatten(to_dict(cfg)).items()
               if v != default[k] and k not in ("run.id", "storage.bucket")]
    changed = [c if len(c) <= 80 else c[:77] + "..." for c in changed]
    head = f"config: run.id={cfg.run.id} storage.bucket={cfg.storage.bucket} model.preset={cfg.model.preset}"
    body = textwrap.wrap("set: " + (", ".join(changed) or "(all defaults)"), 110, subsequent_indent="  ",
                         break_long_words=False, break_on_hyphens=False)
    return "\n".join([head, *body])
