"""The configuration tree: one frozen dataclass per section, defaults in code.

Each field's docstring (the string literal under it) is the documentation of the option:
`entrypoint.py <command> --help` and docs/config.md are generated from it (trainer/config/docs.py).
A field with fixed choices is typed `Literal[...]`: validation (trainer/config/load.py) and the
docs read the choices from the type.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Literal

# The names of PRESETS below, written out so type checkers see the choices; tests/test_config.py
# checks the two lists are equal.
Preset = Literal["tiny", "6m", "25m", "124m", "350m", "760m", "1b", "3b", "7b"]


@dataclass(frozen=True)
class Shape:
    """A decoder's shape (trainer/model/llama.py turns it into a LlamaConfig)."""
    n_layer: int
    d_model: int
    n_head: int
    n_kv_head: int
    d_ffn: int  # SwiGLU hidden width


# The presets live here, not in trainer/model/, because config/check.py validates a preset with its
# model.* overrides and config must not import the model layer; trainer/model/llama.py re-exports them.
# Shapes follow GPT-2/3 widths and depths with LLaMA's SwiGLU (ffn ~ 8/3 d, rounded to 128).
# 124m and 350m are the shapes of the speed baselines in bench/RESULTS.md (at vocab 32000).
PRESETS: dict[str, Shape] = {
    "tiny": Shape(n_layer=2, d_model=64, n_head=4, n_kv_head=4, d_ffn=192),  # tests: seconds on CPU
    "6m": Shape(n_layer=4, d_model=256, n_head=4, n_kv_head=4, d_ffn=768),  # make demo on CPU
    "25m": Shape(n_layer=8, d_model=512, n_head=8, n_kv_head=8, d_ffn=1408),
    "124m": Shape(n_layer=12, d_model=768, n_head=12, n_kv_head=12, d_ffn=2048),
    "350m": Shape(n_layer=24, d_model=1024, n_head=16, n_kv_head=16, d_ffn=2816),
    "760m": Shape(n_layer=24, d_model=1536, n_head=16, n_kv_head=16, d_ffn=4096),
    "1b": Shape(n_layer=24, d_model=2048, n_head=16, n_kv_head=8, d_ffn=5632),
    # Published Llama shapes (their vocabularies are not: ours is the tokenizer's). 3b is Llama 3.2 3B
    # (config.json of meta-llama/Llama-3.2-3B: 28 layers, hidden 3072, 24 heads, 8 kv heads, intermediate
    # 8192); 7b is Llama 2 7B (Touvron et al. 2023, arXiv 2307.09288, table 1 and config.json of
    # meta-llama/Llama-2-7b-hf: 32 layers, hidden 4096, 32 heads, no GQA, intermediate 11008).
    # Both train with train.strategy=fsdp (auto picks it from FSDP_AUTO_PARAMS); `plan` says on
    # how many GPUs of which memory.
    "3b": Shape(n_layer=28, d_model=3072, n_head=24, n_kv_head=8, d_ffn=8192),
    "7b": Shape(n_layer=32, d_model=4096, n_head=32, n_kv_head=32, d_ffn=11008),
}


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
    report_to: tuple[Literal["tensorboard", "wandb"], ...] = ("tensorboard",)
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
    weights: tuple[float, ...] = ()
    """a mixture: one weight per data.sources entry, each sampled by its share (docs/running.md); empty = one stream"""
    max_epochs: tuple[float, ...] = ()
    """with data.weights: per source, the most passes over it, then the others share its weight; 0 = no cap"""
    text_field: str = "text"
    """field holding the document in jsonl/json/parquet records"""
    on_error: Literal["fail", "skip"] = "fail"
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
    prepare_workers: int = 0
    """processes that read and tokenize the corpus in prepare; 0 = every core this process may use"""
    prepare_threads: int = 0
    """Rust encoder threads per prepare worker (workers = cores // threads); 0 = chosen automatically"""
    prepare_wait_seconds: int = 21600
    """node 0 waits this long without a new unit from the other nodes before prepare fails, naming the missing units"""


@dataclass(frozen=True)
class TokenizerConfig:
    """The byte-level BPE tokenizer trained on the corpus (or an existing one loaded)."""

    path: str = ""
    """load this Hugging Face tokenizer (folder, local or s3://) instead of training"""
    vocab_size: int = 32000
    """target vocabulary size including special and byte tokens"""
    max_token_length: int = 4
    """longest token in Han characters"""
    max_latin_token_bytes: int = 24
    """longest token in bytes (Latin words, code, indentation), Han kept to max_token_length; 0: 3 x that"""
    # docs/tokenizer.md ("Latin, code and the length cap"): 24 gains 0.8-1.1% on Chinese mixed with
    # code at the same poetry compression; zh ignores it (it retrains as before 2026-12-03).
    pre_tokenizer: Literal["qwen2", "deepseek-llm", "gpt-2", "zh"] = "qwen2"
    """split before BPE: qwen2, deepseek-llm, gpt-2 (as those models; llama.cpp runs them), zh (until 2026-11-30)"""
    # docs/tokenizer.md: qwen2 gives 4-7% more chars/token than zh on poetry, news and reviews, and
    # only the llama.cpp splits convert to GGUF (scripts/convert_to_gguf.py).
    # Past 4 Han characters merges memorise phrases, not words (docs/tokenizer.md: 4 gives the best
    # held-out chars/token at 32k on classical poetry).
    min_frequency: int = 2
    """a merge must occur at least this often in the sample"""
    sample_bytes: int = 10_000_000
    """cap on the tokenizer's training text (bytes); a corpus over 2x this is read in spread windows, not whole"""
    # docs/tokenizer.md: 10 MB of Chinese is past where chars/token stops improving.


@dataclass(frozen=True)
class ModelConfig:
    """The model's shape (a preset, any of its numbers overridden: docs/running.md, Custom shapes) and
    attention implementation. Its context (max_position_embeddings) is train.seq_len. With model.init
    the shape, context and tokenizer are the init model's (docs/running.md, Continued pretraining)."""

    init: str = ""
    """continue pretraining this Llama: HF folder, s3://, a run's export or a Hub id; "" = from scratch"""
    preset: Preset = "tiny"
    """named shape from trainer/config/schema.py PRESETS; model.n_layer ... model.d_ffn override its numbers"""
    n_layer: int = 0
    """decoder layers; 0 = the preset's"""
    d_model: int = 0
    """hidden size (a multiple of model.n_head; head size d_model / n_head even, for RoPE); 0 = the preset's"""
    n_head: int = 0
    """attention heads; 0 = the preset's"""
    n_kv_head: int = 0
    """key/value heads (grouped-query attention; must divide model.n_head); 0 = the preset's"""
    d_ffn: int = 0
    """SwiGLU hidden width (intermediate_size); 0 = the preset's"""
    attn_implementation: Literal["auto", "sdpa_causal", "sdpa", "eager", "flash_attention_2"] = "auto"
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
    shift_windows: bool = False
    """each pass over the data cuts its seq_len-token windows at another seeded offset (repeated data)"""
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
    schedule: Literal["cosine", "wsd", "multistep"] = "cosine"
    """cosine, wsd or multistep (DeepSeek LLM 80/90% steps)"""
    decay_fraction: float = 0.2
    """wsd: fraction of steps spent in the final decay"""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """adamw, or muon: Muon on the decoder's hidden matrices and AdamW on the rest (torch >= 2.9)"""
    muon_lr: float = 0.0
    """muon: peak learning rate of the hidden matrices; 0 = 2 x train.lr (best of those measured, 124m)"""
    muon_ns: Literal["newton-schulz", "polar-express"] = "newton-schulz"
    """muon: orthogonaliser: newton-schulz (torch.optim.Muon's) or polar-express (Amsel et al. 2025)"""
    normuon: bool = False
    """muon: NorMuon: each row of the update divided by its running RMS (Li et al. 2025); not with FSDP"""
    cautious_weight_decay: bool = False
    """muon: decay a hidden matrix's entry only where its update has the same sign (Chen et al. 2025)"""
    weight_decay: float = 0.1
    """weight decay on matrices (not on norms or biases); ~0.8 pays when the corpus repeats (epochs > 1)"""
    dropout: float = 0.0
    """dropout on each decoder layer's attention and MLP output while training (export unchanged); 0 = off"""
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
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """where to train and generate: auto (cuda when available), cuda or cpu"""
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """auto (bf16 on GPU, fp32 on CPU), bf16 or fp32"""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile the model: auto (on GPU), on, off"""
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    """ddp (each rank holds the whole model), fsdp (FSDP2: weights, grads, optimizer sharded); auto: fsdp from 2B"""
    activation_checkpointing: bool = False
    """recompute each decoder layer's activations in the backward: less memory, ~1/3 more compute"""
    float8: bool = False
    """FP8 matmuls in the decoder layers (torchao float8 training; Hopper/Ada GPUs); exports stay bf16/fp32"""
    on_nonfinite: Literal["skip", "rollback", "fail"] = "skip"
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


SHAPE_KEYS = tuple(f.name for f in fields(Shape))  # model.<key> overrides the preset's number


def shape_overrides(model: ModelConfig) -> dict[str, int]:
    """{Shape field: value} of the model.* numbers set (non-zero), in Shape's order."""
    return {k: getattr(model, k) for k in SHAPE_KEYS if getattr(model, k)}


def model_shape(model: ModelConfig) -> Shape:
    """The run's model: PRESETS[model.preset] with every non-zero model.n_layer ... model.d_ffn in its
    place. The one place the shape is read; config/check.py checks what it returns."""
    return replace(PRESETS[model.preset], **shape_overrides(model))


def preset_changes(preset: str, shape: Shape) -> dict[str, int]:
    """{Shape field: value} of shape's numbers that are not PRESETS[preset]'s: the model.* overrides
    that make it from the preset (model_shape's inverse)."""
    base = PRESETS[preset]
    return {k: getattr(shape, k) for k in SHAPE_KEYS if getattr(shape, k) != getattr(base, k)}


def model_label(preset: str, overrides: dict[str, int]) -> str:
    """A run's model for people (report, status, model card, plan): `124m`, or `124m with
    model.n_layer=16, model.d_ffn=3072` when model.* numbers (shape_overrides) replace the preset's."""
    return preset + (" with " + ", ".join(f"model.{k}={v}" for k, v in overrides.items()) if overrides else "")
