"""What each stage trains: the seam between the one training loop (trainer/training/loop.py) and a stage.

PretrainTask: a fresh LlamaForCausalLM (or model.init's weights) on packed token shards; mean
next-token loss; validation bits per character on a fixed set of held-out sequences; samples of
sample.prompts at checkpoints.
SftTask: a pretrained model on packed conversations; the loss over reply tokens only, each reply
token weighing the same however rows are split over micro-batches and ranks.

Both losses are sums over target tokens; the loop divides by task.targets_in_step().
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.config import Config, preset_changes
from trainer.data import mixture
from trainer.data.conversations import IGNORE, PackedConversations, load_chat_tokenizer, sft_run_id, stop_token_ids
from trainer.data.loader import BatchLoader, ConcatSamples, TokenSamples, validation_batches
from trainer.data.shards import tokenizer_fingerprint
from trainer.data.tokenizer import load_tokenizer
from trainer.evaluation.evaluate import continuation, degeneration_report, val_chars_per_token
from trainer.evaluation.generate import sample
from trainer.model.hf_files import export_generation_config
from trainer.model.hf_init import description, shape_of
from trainer.model.llama import (
    CAUSAL_SDPA,
    build_model,
    flops_per_token,
    llama_config,
    model_shape,
    pick_attention,
    register_causal_sdpa,
)
from trainer.parallel.distributed import Dist
from trainer.parallel.fsdp import is_sharded

EVAL_BATCH = 16  # validation sequences per forward pass when train.micro_batch_size is 0 (no accumulation there)


class CausalLMLoss(torch.nn.Module):
    """The HF model plus the summed next-token loss in one module, so torch.compile sees both: the
    fp32 upcast and log-softmax fuse with the lm_head output instead of materialising fp32 logits
    (B x T x V x 4 bytes: 4 GB at 32 x 1024 x 32k). The HF model itself stays untouched."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """batch: (B, T + 1) int64 token ids -> 0-dim float32, the sum of B x T token losses (nats)."""
        inputs, targets = batch[:, :-1], batch[:, 1:]
        hidden = self.model.model(input_ids=inputs, use_cache=False).last_hidden_state  # (B, T, C)
        logits = self.model.lm_head(hidden)  # (B, T, V)
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")


class PackedLoss(torch.nn.Module):
    """The HF model and the summed next-token loss over reply targets (IGNORE elsewhere), for packed
    conversation rows. use_cache=False matters: with a cache, transformers skips the packed-sequence
    detection and conversations in one row would attend to each other."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """batch: (B, T + 1, 3) int64 rows of [token, label, position] -> 0-dim float32 summed loss."""
        x, y = batch[:, :-1], batch[:, 1:]
        hidden = self.model.model(input_ids=x[..., 0], position_ids=x[..., 2], use_cache=False).last_hidden_state
        logits = self.model.lm_head(hidden)  # (B, T, V)
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y[..., 1].reshape(-1),
                               ignore_index=IGNORE, reduction="sum")


def load_model(folder: Path, attn: str, empty: bool = False):
    """A Hugging Face model folder's LlamaForCausalLM in float32 on the CPU (the caller moves it),
    for SFT's sft.init and continued pretraining's model.init. empty: its shape on the meta device
    only; FSDP's rank 0 loads the weights and broadcasts them (parallelize.prepare)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if attn == CAUSAL_SDPA:
        register_causal_sdpa()
    if empty:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)), dtype=torch.float32,
                                                    attn_implementation=attn)
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation=attn)


def pretrain_inputs(cfg: Config, tokenizer_fp: str, data_name: str, vocab_size: int, init: dict | None = None) -> dict:
    """What pretrained weights depend on, saved in every checkpoint (LoopState.inputs): the
    tokenizer's content, the packed data (data/<name>: corpus, tokenizer and settings), the model
    shape and the sequence length. stages.check_resume compares it before a resume. A preset's
    shape is its name, as before model.* overrides existed, so older checkpoints keep resuming; a
    custom shape adds the numbers that differ from the preset's (model.n_layer=2 on tiny, whose
    n_layer is 2, is plain tiny: the same weights). With model.init (`init`: stages.init_model's
    {"config": config.json, "fingerprint": ...}) the model is the init's shape and "init" its
    weights' fingerprint, so a resume with other starting weights is refused."""
    if init:
        return {"tokenizer": tokenizer_fp, "data": data_name, "seq_len": cfg.train.seq_len,
                "model": f"model.init ({description(init['config'])})", "init": f"sha256:{init['fingerprint']}"}
    changed = preset_changes(cfg.model.preset, model_shape(cfg.model))
    overrides = "".join(f" {k}={v}" for k, v in changed.items())
    inputs = {"tokenizer": tokenizer_fp, "data": data_name, "seq_len": cfg.train.seq_len,
              "model": f"{cfg.model.preset}{overrides}, vocab {vocab_size}, tied embeddings {cfg.model.tie_embeddings}"}
    # another sample numbering: a resume must keep it (checkpoints from before the key pass: fixed windows)
    inputs["windows"] = "shifted per pass" if cfg.train.shift_windows else "fixed"
    return inputs


class PretrainTask:
    name = "pretrain"

    def __init__(self, cfg: Config, data_dir: Path, index: dict, tok_dir: Path, init: dict | None = None,
                 components: list[tuple[Path, dict]] | None = None):
        """init: with model.init, stages.init_model's {"dir", "config", "fingerprint"}: the model
        starts from that folder's weights and has its shape and context. components: a mixture
        (data.weights): every data.sources entry's (shards folder, index.json), in order; data_dir
        and index are then the first's (the tokenizer's numbers are the same in all)."""
        self.cfg, self.hp, self.run_id = cfg, cfg.train, cfg.run.id
        self.tok_dir, self.init = tok_dir, init
        self.samples_per_step = self.hp.batch_tokens // self.hp.seq_len
        self.tokens_per_step = self.samples_per_step * self.hp.seq_len
        self._data(cfg, data_dir, index, components)
        if len(self.train_samples) == 0:
            raise ValueError(f"the training split has fewer than train.seq_len+1={self.hp.seq_len + 1} tokens "
                             f"per shard")
        self.sequences_per_epoch = len(self.train_samples)
        if init:
            shape, tied = shape_of(init["config"]), bool(init["config"].get("tie_word_embeddings"))
            vocab = init["config"]["vocab_size"]
        else:
            shape, tied = model_shape(cfg.model), cfg.model.tie_embeddings
            self.model_config = llama_config(shape, index["vocab_size"], self.hp.seq_len, tied,
                                             eos_token_id=index["eos_id"])
            vocab = self.model_config.vocab_size
        self.flops_per_token = flops_per_token(shape, vocab, self.hp.seq_len, tied)
        data_name = Path(data_dir).name if components is None else mixture.describe(
            mixture.source_names(cfg.data.sources), [str(d) for d, _ in components], cfg.data.weights,
            cfg.data.max_epochs)
        self.inputs = pretrain_inputs(cfg, tokenizer_fingerprint(tok_dir), data_name, index["vocab_size"], init)

    def _data(self, cfg: Config, data_dir: Path, index: dict, components: list[tuple[Path, dict]] | None) -> None:
        """The training samples, their order (None: the one stream's; else the mixture's) and the
        validation parts (name, samples, sequences evaluated, characters per token): with a mixture
        each source's first train.eval_sequences / S held-out sequences, so evaluation costs as much."""
        seq_len, n_eval = self.hp.seq_len, self.hp.eval_sequences
        shift = self.hp.seed if self.hp.shift_windows else None  # each pass's windows at another offset
        self.order, self.sequence_limit = None, None
        if components is None:
            self.train_samples = TokenSamples(data_dir, index, "train", seq_len, shift)
            self.val_parts = [("", TokenSamples(data_dir, index, "val", seq_len), n_eval, val_chars_per_token(index))]
            return
        names = mixture.source_names(cfg.data.sources)
        parts = [TokenSamples(d, i, "train", seq_len, shift) for d, i in components]
        self.train_samples = ConcatSamples(parts)
        self.order = mixture.MixtureOrder(self.hp.seed, [len(p) for p in parts], cfg.data.weights,
                                          cfg.data.max_epochs)
        self.sequence_limit = self.order.total  # every source capped: the mixture ends there
        per_source = -(-n_eval // len(components))
        self.val_parts = [(name, TokenSamples(d, i, "val", seq_len), per_source, val_chars_per_token(i))
                          for name, (d, i) in zip(names, components)]

    def build_model(self, device: torch.device, empty: bool = False):
        tok = load_tokenizer(self.tok_dir)
        attn = pick_attention(self.cfg.model.attn_implementation, device.type)
        if self.init:  # its weights (FSDP: its shape here, the weights from rank 0's load, parallelize.prepare)
            model = load_model(Path(self.init["dir"]), attn, empty)
        else:
            self.model_config.pad_token_id = tok.pad_token_id
            # Initialised where it trains: seconds for billions of weights on a GPU, not minutes on CPU
            # (FSDP: the meta model here, the weights from rank 0's CPU build, see parallelize.prepare).
            with torch.device("meta") if empty else device:
                model = build_model(self.model_config, attn)
        # Sampling defaults in every checkpoint and export: plain model.generate() does not parrot.
        model.generation_config = export_generation_config(self.cfg.sample, tok.eos_token_id, tok.pad_token_id)
        return (model if empty else model.to(device)), tok

    def loss_module(self, model) -> torch.nn.Module:
        return CausalLMLoss(model)

    def loader(self, position: int, d: Dist, micro: int) -> BatchLoader:
        return BatchLoader(self.train_samples, self.hp.seed, self.samples_per_step, d.rank, d.world, micro, d.device,
                           position, order=self.order and (self.order.sample_ids_and_passes if self.hp.shift_windows
                                                           else self.order.sample_ids))

    def targets_in_step(self, position: int) -> int:
        return self.tokens_per_step

    def evaluate(self, loss_module, d: Dist, autocast) -> dict:
        """Validation loss (nats per token) and bits per character on the first train.eval_sequences
        held-out sequences: the same set whatever the number of processes or the micro-batch. A
        mixture pools its sources' sequences (val_loss, val_bpc) and gives each source's val_loss/<name>."""
        parts = [p for p in self.val_parts if len(p[1])]
        if not parts:
            return {}
        totals = torch.stack([self._val_sums(loss_module, samples, n, d, autocast) for _, samples, n, _ in parts])
        if d.world > 1:
            torch.distributed.all_reduce(totals)
        total = totals.sum(0)
        val = (total[0] / total[1]).item()
        row = {"val_loss": round(val, 6)}
        if len(parts) == 1:
            if parts[0][3]:
                row["val_bpc"] = round(val / math.log(2) / parts[0][3], 6)
            return row
        chars = sum(t[1].item() * cpt for t, (_, _, _, cpt) in zip(totals, parts))
        if chars:
            row["val_bpc"] = round(total[0].item() / math.log(2) / chars, 6)
        for (name, _, _, _), t in zip(parts, totals):
            row[f"val_loss/{name}"] = round((t[0] / t[1]).item(), 6)
        return row

    def _val_sums(self, loss_module, samples, n_sequences: int, d: Dist, autocast) -> torch.Tensor:
        """(summed loss, target tokens) of this rank's share of samples' first n_sequences, float64."""
        batch_size = self.hp.micro_batch_size or EVAL_BATCH  # memory bound; the sums are float64
        total = torch.zeros(2, dtype=torch.float64, device=d.device)
        batches = list(validation_batches(samples, n_sequences, batch_size, d.rank, d.world))
        if is_sharded(loss_module):  # every rank runs as many forwards (each all-gathers weights); extras don't count
            n_batches = -(-min(n_sequences, len(samples)) // batch_size)
            first = next(validation_batches(samples, n_sequences, batch_size, 0, 1))
            batches += [None] * (-(-n_batches // d.world) - len(batches))
        for batch in batches:
            with autocast:
                loss = loss_module((first if batch is None else batch).to(d.device))
            if batch is not None:
                total += torch.stack([loss.double(), torch.tensor(float(batch[:, 1:].numel()), dtype=torch.float64,
                                                                  device=d.device)])
        return total

    def at_checkpoint(self, model, tokenizer, step: int, autocast, synced: bool = False) -> list[dict]:
        """Continuations of sample.prompts from this step's weights (a few seconds), with their
        degeneration metrics, so a run that starts to parrot shows it while it trains. synced: every
        rank calls this and generates in step (a sharded model)."""
        s = self.cfg.sample
        if not (s.at_checkpoints and s.prompts):
            return []
        prompts = list(s.prompts)
        model.eval()
        device = next(model.parameters()).device
        # fork_rng: sampling seeds its own generator; training's RNG streams (saved in checkpoints) stay untouched.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast:
            generated = sample(model, tokenizer, prompts, s, synced_gpus=synced)
            texts = [continuation(p, g) for p, g in zip(prompts, generated)]
        model.train()
        rep = degeneration_report(prompts, texts)
        return [{"step": step, "prompt": p, "text": text, "distinct_2": round(rep["distinct_2"], 4),
                 "repeated_4gram_fraction": round(rep["repeated_4gram_fraction"], 4)}
                for p, text in zip(prompts, texts)]


def sft_inputs(seq_len: int, data_name: str) -> dict:
    """What fine-tuned weights depend on (as pretrain_inputs): the packed conversations (their hash
    covers the conversations, the starting model's tokenizer and chat template) and seq_len."""
    return {"data": data_name, "seq_len": seq_len}


def sft_attention(requested: str, device_type: str) -> str:
    """Attention that keeps packed conversations apart: flash_attention_2 (varlen from position_ids)
    or sdpa/eager with the block-diagonal mask transformers builds. Never CAUSAL_SDPA, pretraining's
    default: it ignores every mask, so conversations in a row would attend to each other."""
    choice = pick_attention(requested, device_type)
    return "sdpa" if choice == CAUSAL_SDPA else choice


class SftTask:
    name = "sft"
    flops_per_token = None

    def __init__(self, cfg: Config, data_dir: Path, init_dir: Path):
        s = cfg.sft
        self.cfg, self.init_dir, self.run_id = cfg, Path(init_dir), sft_run_id(cfg)
        self.rows = PackedConversations(data_dir)
        # The schedule and optimizer of train.* with the SFT's own length, peak, warmup and checkpoints.
        self.hp = dataclasses.replace(cfg.train, max_steps=s.max_steps, lr=s.lr, warmup_steps=s.warmup_steps,
                                      seq_len=self.rows.seq_len, checkpoint_every_steps=s.checkpoint_every_steps,
                                      budget_minutes=0.0)
        self.samples_per_step = s.batch_sequences
        self.sequences_per_epoch = len(self.rows)
        self.tokens_per_step = s.batch_sequences * self.rows.seq_len
        self.inputs = sft_inputs(self.rows.seq_len, Path(data_dir).name)

    def build_model(self, device: torch.device, empty: bool = False):
        tok = load_chat_tokenizer(self.init_dir)
        model = load_model(self.init_dir, sft_attention(self.cfg.model.attn_implementation, device.type), empty)
        if self.rows.seq_len > model.config.max_position_embeddings:  # stage_sft warned; RoPE itself has no limit
            model.config.max_position_embeddings = self.rows.seq_len
        model.generation_config = export_generation_config(self.cfg.sample, stop_token_ids(tok), tok.pad_token_id)
        return (model if empty else model.to(device)), tok

    def loss_module(self, model) -> torch.nn.Module:
        return PackedLoss(model)

    def loader(self, position: int, d: Dist, micro: int) -> BatchLoader:
        return BatchLoader(self.rows, self.hp.seed, self.samples_per_step, d.rank, d.world, micro, d.device, position)

    def targets_in_step(self, position: int) -> int:
        return self.rows.targets_at(self.hp.seed, position, self.samples_per_step)

    sequence_limit = None  # no end to the order: the run's length is sft.max_steps

    def evaluate(self, loss_module, d: Dist, autocast) -> dict:
        return {}

    def at_checkpoint(self, model, tokenizer, step: int, autocast, synced: bool = False) -> list[dict]:
        return []
