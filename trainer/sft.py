"""Supervised fine-tuning: conversations -> chat-template tokens -> packed rows -> the training loop.

From a pretrained model (an export or any checkpoint, local or s3://) to a chat model:
  1. read conversations (`{"messages": [{"role": ..., "content": ...}, ...]}`, the smoltalk format)
     from sft.sources, pulled like pretraining data; a bad record is reported with its file and
     line, or skipped and counted (data.on_error);
  2. render each with the tokenizer's chat template, cut at the assistant replies and tokenized
     piece by piece, so every token is known to be prompt (no loss) or reply (loss);
  3. pack whole conversations into rows of sft.seq_len + 1 tokens (next-fit, padding at the end).
     Positions restart at every conversation; with no attention mask, transformers turns restarting
     position_ids into a block-diagonal causal mask (sdpa/eager: masking_utils.
     find_packed_sequence_indices; flash_attention_2: varlen), so packed conversations never see
     each other;
  4. train with the loss summed over reply tokens and divided by their number in the whole step
     (all micro-batches, all ranks): every reply token weighs the same however rows are split;
  5. checkpoint, resume and stop on SIGTERM exactly as pretraining (trainer.checkpoint, StopFlag,
     exit 75) in runs/<sft.run_id>/, then export runs/<sft.run_id>/final.
SFT checkpoints also hold the Hugging Face files (config.json, tokenizer), so every one of them
loads with from_pretrained: chat with it, or fine-tune it again.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer import checkpoint as ckpt
from trainer.config import Config, from_dict, load_config, to_yaml
from trainer.data import DataError, DocumentReader, corpus_fingerprint, pull, resolve_sources
from trainer.launch import bucket, default_nproc, log, node_rank
from trainer.storage import Storage, is_s3, join, open_storage, split_url

ROLES = ("system", "user", "assistant")
IGNORE = -100  # label of a token without loss (F.cross_entropy's ignore_index)
PACK_VERSION = 1  # bump when tokenization or packing changes (part of the packed data's hash)


def sft_run_id(cfg: Config) -> str:
    return cfg.sft.run_id or f"{cfg.run.id}-sft"


def init_url(cfg: Config) -> str:
    return cfg.sft.init or bucket(cfg).url(f"runs/{cfg.run.id}/final")


# Reading conversations -------------------------------------------------------------------------

def conversation_problem(messages) -> tuple[str, str] | None:
    """(reason, detail) when `messages` is not a conversation to learn from, else None.

    A conversation is an optional system turn, then user and assistant turns alternating, starting
    with user and ending with assistant (a trailing user turn has no reply to learn), every turn
    with non-empty text."""
    if not isinstance(messages, list) or not messages:
        return "not a conversation", "expected a non-empty list of turns"
    roles = []
    for i, turn in enumerate(messages, 1):
        if not isinstance(turn, dict):
            return "not a conversation", f"turn {i} is {type(turn).__name__}, not an object"
        role, content = turn.get("role"), turn.get("content")
        if not role:
            return "missing role", f"turn {i} has no role"
        if role not in ROLES:
            return "unknown role", f"turn {i} has role {role!r}; expected one of {', '.join(ROLES)}"
        if not isinstance(content, str) or not content.strip():
            return "empty content", f"turn {i} ({role}) has empty or missing content"
        roles.append(role)
    offset = 1 if roles[0] == "system" else 0
    for j, role in enumerate(roles[offset:]):
        want = "user" if j % 2 == 0 else "assistant"
        if role != want:
            i = j + 1 + offset
            if role == "system":
                return "wrong order", f"turn {i} is a system turn; only the first turn may be one"
            if j == 0:
                return "wrong order", f"turn {i}: {role} before any user turn"
            return "wrong order", f"turn {i}: two {role} turns in a row"
    if roles[-1] != "assistant":
        return "no reply", "the conversation does not end with an assistant turn (nothing to learn)"
    return None


class ConversationReader(DocumentReader):
    """Yields (where, turns) from jsonl/json/parquet conversation files. Reuses DocumentReader's
    file handling (compression, empty and corrupt files) and data.on_error; `skipped` counts bad
    records by reason, over-long ones included (counted by prepare_conversations)."""

    def __init__(self, cfg: Config):
        super().__init__(dataclasses.replace(cfg.data, text_field=cfg.sft.messages_field))

    def bad(self, where: str, reason: str, detail: str):
        self._bad(where, reason, detail)

    def _checked(self, where: str, record) -> Iterator[tuple[str, list[dict]]]:
        field = self.cfg.text_field
        if not isinstance(record, dict) or field not in record:
            self._bad(where, "missing messages field", f"record has no '{field}' field (sft.messages_field)")
            return
        problem = conversation_problem(record[field])
        if problem:
            self._bad(where, problem[0], problem[1])
            return
        yield where, [{"role": t["role"], "content": t["content"]} for t in record[field]]

    def _parquet(self, f, path: str):
        import pyarrow.parquet as pq

        field = self.cfg.text_field
        pf = pq.ParquetFile(path)
        if field not in pf.schema_arrow.names:
            self._bad(f.url, "missing messages field",
                      f"no column '{field}' (sft.messages_field); columns: {pf.schema_arrow.names}")
            return
        row = 0
        for batch in pf.iter_batches(columns=[field], batch_size=1024):
            for turns in batch.column(0).to_pylist():
                row += 1
                yield from self._checked(f"{f.url}:row {row}", {field: turns})

    def _txt(self, f, path: str):
        self._bad(f.url, "not a conversation file", "plain text holds no conversations; use jsonl, json or parquet")
        yield from ()


# Chat template -> tokens with a loss mask ---------------------------------------------------------

def load_chat_tokenizer(path: str | Path):
    """The model folder's tokenizer; one without a chat template gets ChatML (ours, as Qwen's)."""
    from trainer.tokenizer import CHAT_TEMPLATE, load_tokenizer

    tok = load_tokenizer(path)
    if not tok.chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def render_pieces(tok, turns: list[dict]) -> list[tuple[str, bool]]:
    """The conversation's chat-template text as (piece, is_reply) in order. A reply piece is what
    the model writes after the generation prompt (content and end marker): exactly the tokens it
    will generate in `chat`. Raises ValueError for a template whose text for a longer conversation
    does not extend the shorter one's (then no token can be told apart as prompt or reply)."""
    pieces, done = [], ""
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(turns[:i], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(turns[:i + 1], tokenize=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError("the tokenizer's chat template does not render a conversation as its prefix plus "
                             "the new turn, so reply tokens cannot be told apart; use a ChatML-style template")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return pieces


def encode_conversations(tok, conversations: list[list[dict]]) -> list[tuple[list[int], list[bool]]]:
    """(token ids, is-reply flag per token) for each conversation; one batched tokenizer call.

    Pieces are tokenized separately: the prompt ends right where generation starts, so training
    sees the same tokens as `chat` does at inference (a joint encoding could merge across it)."""
    pieces = [render_pieces(tok, turns) for turns in conversations]
    flat = [text for conv in pieces for text, _ in conv]
    ids = tok(flat, add_special_tokens=False)["input_ids"] if flat else []
    out, k = [], 0
    for conv in pieces:
        tokens, reply = [], []
        for _, is_reply in conv:
            tokens += ids[k]
            reply += [is_reply] * len(ids[k])
            k += 1
        out.append((tokens, reply))
    return out


# Packing ---------------------------------------------------------------------------------------

def pack(encoded: Iterable[tuple[list[int], list[bool]]], seq_len: int, pad_id: int,
         open_rows: int = 8) -> Iterator[np.ndarray]:
    """Rows of whole conversations: (seq_len + 1, 3) int32 of [token, label, position].

    label = the token where it is part of a reply, else IGNORE; position restarts at 0 for every
    conversation and for the padding at the end. Inputs are row[:-1], targets row[1:], so a
    conversation's first token (never a reply) is the masked target of the one before it.
    First fit over the last `open_rows` rows (a new row when none has room; the oldest is written
    out when there are too many): less padding than next-fit, order kept roughly, memory bounded.
    Conversations must be at most seq_len + 1 tokens (prepare_conversations drops longer ones)."""
    width = seq_len + 1
    rows: list[tuple[list, list[int]]] = []  # (conversations, [tokens used])
    for tokens, reply in encoded:
        for convs, used in rows:
            if used[0] + len(tokens) <= width:
                break
        else:
            if len(rows) == open_rows:
                yield _row(rows.pop(0)[0], width, pad_id)
            rows.append(([], [0]))
            convs, used = rows[-1]
        convs.append((tokens, reply))
        used[0] += len(tokens)
    for convs, _ in rows:
        yield _row(convs, width, pad_id)


def _row(conversations: list[tuple[list[int], list[bool]]], width: int, pad_id: int) -> np.ndarray:
    row = np.empty((width, 3), dtype=np.int32)
    at = 0
    for tokens, reply in conversations:
        n = len(tokens)
        ids = np.asarray(tokens, dtype=np.int32)
        row[at:at + n, 0] = ids
        row[at:at + n, 1] = np.where(np.asarray(reply, dtype=bool), ids, IGNORE)
        row[at:at + n, 2] = np.arange(n)
        at += n
    row[at:, 0], row[at:, 1], row[at:, 2] = pad_id, IGNORE, np.arange(width - at)
    return row


class PackedConversations:
    """Packed rows on disk (rows.bin, memory-mapped), in the interface BatchLoader reads: len()
    and get(ids) -> (len(ids), seq_len + 1, 3) int64. BatchLoader's inputs/targets split
    (row[:, :-1], row[:, 1:]) then gives [input, -, position] and [-, target, -]."""

    def __init__(self, data_dir: Path):
        self.index = json.loads((Path(data_dir) / "index.json").read_text())
        self.seq_len = self.index["seq_len"]
        self.n = self.index["rows"]
        self.rows = np.memmap(Path(data_dir) / "rows.bin", dtype=np.int32, mode="r",
                              shape=(self.n, self.seq_len + 1, 3))
        self.targets = np.load(Path(data_dir) / "targets.npy")  # reply tokens (loss terms) per row

    def __len__(self) -> int:
        return self.n

    def get(self, ids: np.ndarray) -> np.ndarray:
        return self.rows[np.asarray(ids)].astype(np.int64)

    def step_targets(self, seed: int, step: int, rows_per_step: int) -> int:
        """Loss terms in the whole of `step` (every rank's rows): a pure function, no communication."""
        from trainer.dataset import global_sample_ids

        return int(self.targets[global_sample_ids(seed, self.n, step * rows_per_step, rows_per_step)].sum())


def packed_data_hash(cfg: Config, corpus_fp: str, tok, seq_len: int) -> str:
    key = json.dumps({
        "corpus": corpus_fp, "tokenizer": hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest(),
        "template": tok.chat_template, "seq_len": seq_len, "field": cfg.sft.messages_field,
        "on_error": cfg.data.on_error, "pad": tok.pad_token_id, "version": PACK_VERSION,
    }, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def prepare_conversations(cfg: Config, tok, seq_len: int, say=log) -> Path:
    """Read, check, tokenize and pack sft.sources into local_dir/sft-data/<hash>/ (reused when
    there): rows.bin, targets.npy, index.json (written last, with counts of skipped records).
    Every node packs for itself: the result is a pure function of the inputs."""
    scfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=cfg.sft.sources))
    files = pull(scfg, resolve_sources(scfg), progress=False)
    out = Path(cfg.storage.local_dir) / "sft-data" / packed_data_hash(cfg, corpus_fingerprint(files), tok, seq_len)
    if (out / "index.json").is_file():
        say(f"sft data: reusing {out}")
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    reader = ConversationReader(cfg)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id or 0
    stats = {"conversations": 0, "tokens": 0}

    def encoded() -> Iterator[tuple[list[int], list[bool]]]:
        batch: list[tuple[str, list[dict]]] = []

        def flush():
            for (where, _), (tokens, reply) in zip(batch, encode_conversations(tok, [t for _, t in batch])):
                if len(tokens) > seq_len + 1:
                    reader.bad(where, "over-long conversation", f"{len(tokens)} tokens, more than sft.seq_len + 1 = "
                                                               f"{seq_len + 1} (raise sft.seq_len or shorten it)")
                    continue
                stats["conversations"] += 1
                stats["tokens"] += len(tokens)
                yield tokens, reply
            batch.clear()

        for f in files:
            for item in reader.iter_file(f):
                batch.append(item)
                if len(batch) == 512:
                    yield from flush()
        yield from flush()

    targets = []
    with open(tmp / "rows.bin", "wb") as fh:
        for row in pack(encoded(), seq_len, pad_id):
            fh.write(row.tobytes())
            targets.append(int((row[1:, 1] != IGNORE).sum()))
    if not targets:
        raise DataError(f"sft.sources: no usable conversation in {len(files)} file(s); skipped {dict(reader.skipped)}")
    np.save(tmp / "targets.npy", np.asarray(targets, dtype=np.int64))
    index = {"rows": len(targets), "seq_len": seq_len, "conversations": stats["conversations"],
             "tokens": stats["tokens"], "target_tokens": int(sum(targets)),
             "padding_fraction": round(1 - stats["tokens"] / (len(targets) * (seq_len + 1)), 4),
             "skipped_records": dict(reader.skipped), "files": [f.url for f in files], "version": PACK_VERSION}
    (tmp / "index.json").write_text(json.dumps(index, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    say(f"sft data: {index['conversations']} conversations -> {index['rows']} rows of {seq_len} tokens "
        f"({index['target_tokens']} reply tokens, {index['padding_fraction']:.1%} padding), "
        f"skipped {index['skipped_records']} -> {out}")
    return out


# The starting model ------------------------------------------------------------------------------

CHECKPOINT_URL = re.compile(r"^(?:(?P<root>.*)/)?runs/(?P<run>[^/]+)/checkpoints/step-(?P<step>\d+)/?$")
TRAINING_FILES = ("optimizer.pt", "rng.pt", "trainer_state.json", "config.yaml", ckpt.MANIFEST)


def model_folder(url: str, cfg: Config, say=log) -> Path:
    """A local Hugging Face model folder for `url` (local path or s3://): an export
    (runs/<id>/final), an SFT checkpoint (it holds config.json), or a pretraining checkpoint
    (runs/<id>/checkpoints/step-N: checked against its manifest, converted with the model shape in
    its config.yaml and the tokenizer of its run)."""
    cache = Path(cfg.storage.local_dir) / "models" / hashlib.sha256(url.encode()).hexdigest()[:16]
    m = CHECKPOINT_URL.match(url)
    root = open_storage(m["root"] or ".", cfg.storage) if m else None
    if m:
        src = ckpt.fetch_verified(root, m["run"], int(m["step"]), cache / "checkpoint")
    elif is_s3(url):
        store, key = split_url(url, cfg.storage)
        store.download_dir(key, cache / "download")
        src = cache / "download"
    else:
        src = Path(url).expanduser()
    if (src / "config.json").is_file():
        return src
    if (src / "model.safetensors").is_file() and (src / "config.yaml").is_file():
        tok_dir = find_tokenizer(src, root, m["run"] if m else None, cfg, cache / "tokenizer")
        say(f"converting pretraining checkpoint {url} (tokenizer from {tok_dir})")
        return checkpoint_to_hf(src, tok_dir, cache / "hf")
    raise FileNotFoundError(f"{url}: neither a model folder (config.json) nor a checkpoint folder (model.safetensors, "
                            f"config.yaml); pass <bucket>/runs/<id>/final or <bucket>/runs/<id>/checkpoints/step-N")


def find_tokenizer(src: Path, root: Storage | None, run_id: str | None, cfg: Config, dest: Path) -> Path:
    """The tokenizer of a pretraining checkpoint, which does not hold one: the folder itself, the
    run's export, the run's tokenizer.path, or tokenizers/<hash> of its corpus and settings."""
    from trainer.tokenizer import tokenizer_hash

    if (src / "tokenizer.json").is_file():
        return src
    ckpt_cfg = from_dict(_yaml(src / "config.yaml"))
    candidates = []
    if root is not None:
        candidates.append((root, f"runs/{run_id}/final"))
    if ckpt_cfg.tokenizer.path:
        if not is_s3(ckpt_cfg.tokenizer.path):
            return Path(ckpt_cfg.tokenizer.path)
        candidates.append(split_url(ckpt_cfg.tokenizer.path, cfg.storage))
    if root is not None:
        try:
            fp = corpus_fingerprint(resolve_sources(dataclasses.replace(ckpt_cfg, storage=cfg.storage)))
            candidates.append((root, f"tokenizers/{tokenizer_hash(ckpt_cfg, fp)}"))
        except (DataError, OSError) as e:
            log(f"cannot list the checkpoint's corpus to find its tokenizer by hash: {e}")
    for store, key in candidates:
        if store.exists(join(key, "tokenizer.json")):
            shutil.rmtree(dest, ignore_errors=True)
            for o in store.list(key.rstrip("/") + "/"):
                name = o.key.rsplit("/", 1)[-1]
                if name.startswith(("tokenizer", "special_tokens", "chat_template")):
                    store.download_file(o.key, dest / name)
            return dest
    raise FileNotFoundError(f"{src}: cannot find the tokenizer of this checkpoint (looked in the folder, the run's "
                            f"export, tokenizer.path and the bucket's tokenizers/); export the run first "
                            f"(entrypoint.py export --config ...) and start from runs/<id>/final")


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8"))


def checkpoint_to_hf(src: Path, tok_dir: Path, out: Path) -> Path:
    """A pretraining checkpoint as a Hugging Face folder (what stage_export writes for a run)."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    from trainer.model import build_model, llama_config

    ckpt_cfg = from_dict(_yaml(src / "config.yaml"))
    tok = load_chat_tokenizer(tok_dir)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        vocab_rows = f.get_slice("model.embed_tokens.weight").get_shape()[0]
    model_cfg = llama_config(ckpt_cfg.model.preset, vocab_rows, ckpt_cfg.train.seq_len, ckpt_cfg.model.tie_embeddings,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = build_model(model_cfg, "sdpa")
    load_model(model, str(src / "model.safetensors"))
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def stop_token_ids(tok) -> list[int]:
    """A reply ends at <|im_end|> (ChatML) or at end of text."""
    from trainer.tokenizer import IM_END

    ids = [tok.convert_tokens_to_ids(IM_END)] if IM_END in tok.get_vocab() else []
    return ids + [i for i in (tok.eos_token_id,) if i is not None and i not in ids]


# Training --------------------------------------------------------------------------------------

class PackedLoss(torch.nn.Module):
    """The HF model and the summed next-token loss over reply targets (IGNORE elsewhere).

    use_cache=False matters: with a cache, transformers skips the packed-sequence detection and
    conversations in one row would attend to each other."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self.model.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        logits = self.model.lm_head(hidden)  # (B, T, V)
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")


def sft_attention(requested: str, device_type: str) -> str:
    """Attention that keeps packed conversations apart: flash_attention_2 (varlen from position_ids)
    or sdpa/eager with the block-diagonal mask transformers builds. Never CAUSAL_SDPA, pretraining's
    default: it ignores every mask, so conversations in a row would attend to each other."""
    from trainer.model import CAUSAL_SDPA, pick_attention

    choice = pick_attention(requested, device_type)
    return "sdpa" if choice == CAUSAL_SDPA else choice


def batch_geometry(cfg: Config, world: int) -> tuple[int, int]:
    """(micro-batch size, accumulation steps) for sft.batch_sequences over `world` processes."""
    rows = cfg.sft.batch_sequences
    if rows % world:
        raise ValueError(f"sft.batch_sequences={rows} does not split evenly over {world} processes")
    per_rank = rows // world
    micro = cfg.train.micro_batch_size or max(k for k in range(1, min(16, per_rank) + 1) if per_rank % k == 0)
    if per_rank % micro:
        raise ValueError(f"train.micro_batch_size={micro} does not divide the {per_rank} rows each of {world} "
                         f"processes runs per step (sft.batch_sequences / world)")
    return micro, per_rank // micro


def save_sft_checkpoint(local_dir: Path, model, tok, optimizer, state: dict, cfg: Config, rng_states: list) -> None:
    """train.save_checkpoint's files, with the model saved as a Hugging Face folder (config.json,
    generation_config.json, tokenizer) so the checkpoint loads with from_pretrained."""
    shutil.rmtree(local_dir, ignore_errors=True)
    local_dir.mkdir(parents=True)
    model.save_pretrained(str(local_dir))
    tok.save_pretrained(str(local_dir))
    torch.save(optimizer.state_dict(), local_dir / "optimizer.pt")
    torch.save(rng_states, local_dir / "rng.pt")
    (local_dir / "trainer_state.json").write_text(json.dumps(state, indent=1))
    (local_dir / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    ckpt.write_manifest(local_dir, state["step"])


def finetune(cfg: Config, store: Storage, data_dir: Path, init_dir: Path, log=print, lease=None) -> dict:
    """Fine-tune from init_dir (or the newest complete checkpoint of the SFT run) to sft.max_steps.
    With a `lease` (trainer.lease), stops with LeaseLost before writing a checkpoint once another
    job has taken the run."""
    from transformers import AutoModelForCausalLM

    from trainer.dataset import BatchLoader
    from trainer.schedule import lr_at
    from trainer.train import EXIT_PREEMPTED, Preempted, StopFlag, _drop_staged, param_groups, rng_state, \
        set_rng_state, setup_distributed

    s, run_id = cfg.sft, sft_run_id(cfg)
    d = setup_distributed(cfg)
    say = log if d.main else (lambda *a, **k: None)
    rows = PackedConversations(data_dir)
    seq_len = rows.seq_len
    # The schedule of train.* with the SFT's own length, peak and warmup (lr_at reads a TrainConfig).
    t = dataclasses.replace(cfg.train, max_steps=s.max_steps, lr=s.lr, warmup_steps=s.warmup_steps, seq_len=seq_len)
    micro, accum = batch_geometry(cfg, d.world)
    run_local = Path(cfg.storage.local_dir) / "runs" / run_id
    run_local.mkdir(parents=True, exist_ok=True)
    use_bf16 = t.dtype == "bf16" or (t.dtype == "auto" and d.device.type == "cuda")

    # Model, optimizer: from the newest SFT checkpoint when there is one (it is a full HF folder) ------
    found = ckpt.fetch_newest(store, run_id, run_local / "resume", log=say) if d.main else None
    if d.world > 1:
        box = [found[0] if found else -1]
        dist.broadcast_object_list(box, src=0)
        if box[0] >= 0 and not d.main:
            found = box[0], ckpt.fetch_verified(store, run_id, box[0], run_local / f"resume-rank{d.rank}")
    source = found[1] if found else init_dir
    tok = load_chat_tokenizer(init_dir)
    model = AutoModelForCausalLM.from_pretrained(
        str(source), dtype=torch.float32,
        attn_implementation=sft_attention(cfg.model.attn_implementation, d.device.type)).to(d.device)
    if seq_len > model.config.max_position_embeddings:  # stage_sft warned; RoPE itself has no limit
        model.config.max_position_embeddings = seq_len
    model.generation_config.eos_token_id = stop_token_ids(tok)
    model.generation_config.pad_token_id = tok.pad_token_id
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                                  eps=1e-8, fused=True)
    step, tokens_seen, skipped_total, wall_before = 0, 0, 0, 0.0
    if found:
        optimizer.load_state_dict(torch.load(found[1] / "optimizer.pt", map_location=d.device, weights_only=False))
        state = json.loads((found[1] / "trainer_state.json").read_text())
        step, tokens_seen = state["step"], state["tokens_seen"]
        skipped_total, wall_before = state.get("skipped_steps", 0), state.get("wall_seconds", 0.0)
        rngs = torch.load(found[1] / "rng.pt", weights_only=False)
        if len(rngs) == d.world:
            set_rng_state(rngs[d.rank])
        else:
            torch.manual_seed(t.seed + 1000 * step + d.rank)
        say(f"sft: resumed from {ckpt.step_name(found[0])} (saved by {state['world_size']} process(es), now {d.world})")
    else:
        torch.manual_seed(t.seed + d.rank)
        say(f"sft: starting from {init_dir}")

    loss_model = train_model = ddp = PackedLoss(model)
    if d.world > 1:
        train_model = ddp = torch.nn.parallel.DistributedDataParallel(
            loss_model, device_ids=[d.local_rank] if d.device.type == "cuda" else None, gradient_as_bucket_view=True)
    if t.compile == "on" or (t.compile == "auto" and d.device.type == "cuda"):
        train_model = torch.compile(train_model)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()
    loader = BatchLoader(rows, t.seed, s.batch_sequences, d.rank, d.world, micro, d.device, step, s.max_steps)
    tokens_per_step = s.batch_sequences * seq_len

    metrics_path = run_local / "metrics.jsonl"
    if d.main:  # the bucket's history up to the resumed step (a killed run's later lines are dropped)
        old = store.read_text_or_none(f"runs/{run_id}/metrics.jsonl") or ""
        kept = [line for line in old.splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
        metrics_path.write_text("".join(line + "\n" for line in kept))
    uploader = ckpt.Uploader(store, run_id, cfg.checkpoint.keep_last, log=say)

    def flush_metrics():
        if d.main:
            store.upload_file(metrics_path, f"runs/{run_id}/metrics.jsonl")

    def checkpoint_now(background: bool):
        nonlocal last_ckpt_step
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise FloatingPointError(f"non-finite weights at sft step {step}: refusing to checkpoint them")
        rngs = [None] * d.world
        if d.world > 1:
            dist.all_gather_object(rngs, rng_state(), group=d.control)
        else:
            rngs = [rng_state()]
        if d.main:
            state = {"step": step, "tokens_seen": tokens_seen, "skipped_steps": skipped_total, "world_size": d.world,
                     "data_position": step * s.batch_sequences, "wall_seconds": wall_before + time.time() - t_start}
            local = run_local / "staged" / ckpt.step_name(step)
            save_sft_checkpoint(local, model, tok, optimizer, state, cfg, rngs)
            flush_metrics()
            uploader.submit(local, step, background=background,
                            on_done=lambda done: _drop_staged(run_local / "staged", ckpt.step_name(done)))
        last_ckpt_step = step

    # The loop ---------------------------------------------------------------------------------
    say(f"sft: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params on {d.world} x {d.device.type}, "
        f"{s.batch_sequences} x {seq_len} tokens per step ({micro} per micro-batch, {accum} accumulation), "
        f"{len(rows)} rows, steps {step} -> {s.max_steps}")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    loss_sum = torch.zeros((), device=d.device)
    skipped = torch.zeros((), device=d.device)
    last_ckpt_step = step
    t_start = t_log = time.time()
    steps_at_log = step
    saved_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    stop = StopFlag()  # a signal before this point kills the process: there is nothing to save yet
    try:
        while step < s.max_steps:
            if d.world > 1 or stop.requested_at is not None:
                if stop.agreed(d):
                    loader.close()
                    if step > last_ckpt_step:
                        checkpoint_now(background=False)
                    uploader.wait()
                    flush_metrics()
                    say(f"sft: stopped at step {step} after a signal; checkpoint published, exiting with "
                        f"{EXIT_PREEMPTED}")
                    raise Preempted()
            lr = lr_at(step, t)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # Sum of the step's reply-token losses / their number, over all ranks: DDP averages the
            # gradients over ranks, hence the factor world.
            scale = d.world / max(1, rows.step_targets(t.seed, step, s.batch_sequences))
            for k in range(accum):
                x, y = loader.next()  # (B, T, 3) each: [input, -, position], [-, target, -]
                with (ddp.no_sync() if k < accum - 1 and d.world > 1 else nullcontext()):
                    with autocast:
                        loss = train_model(x[..., 0], x[..., 2], y[..., 1])
                    (loss * scale).backward()
                loss_sum += loss.detach() * (scale / d.world)
            norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else float("inf"),
                                                  foreach=True)
            found_inf = (~torch.isfinite(norm)).float()
            optimizer.found_inf, optimizer.grad_scale = found_inf, None  # fused AdamW skips the update on device
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            skipped += found_inf
            step += 1
            tokens_seen += tokens_per_step

            if step % t.log_every_steps == 0 or step == s.max_steps:
                stats = torch.stack([loss_sum, skipped, norm.float()])
                if d.world > 1:  # loss: each rank holds its share of the step's mean; the rest are equal
                    dist.all_reduce(stats)
                    stats /= torch.tensor([1.0, d.world, d.world], device=d.device)
                loss_v, skipped_v, norm_v = stats.tolist()
                n_steps = step - steps_at_log
                skipped_total += int(skipped_v)
                if t.on_nonfinite == "fail" and skipped_v > 0:
                    raise FloatingPointError(f"non-finite loss or gradient before sft step {step} "
                                             f"(train.on_nonfinite=fail)")
                now = time.time()
                row = {"step": step, "loss": round(loss_v / n_steps, 6), "lr": lr, "grad_norm": round(norm_v, 4),
                       "tok_per_s": round(n_steps * tokens_per_step / (now - t_log), 1), "tokens": tokens_seen,
                       "skipped_steps": skipped_total}
                if d.main:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    say(" ".join(f"{k}={v}" for k, v in row.items()))
                loss_sum.zero_()
                skipped.zero_()
                t_log, steps_at_log = now, step
            if step % s.checkpoint_every_steps == 0 or step == s.max_steps:
                if lease is not None:
                    lease.check()
                checkpoint_now(background=cfg.checkpoint.upload_async and step < s.max_steps)
        loader.close()
        uploader.wait()
        flush_metrics()
        if d.world > 1:
            dist.barrier()
    finally:
        loader.close()
        for sig, handler in saved_handlers.items():
            signal.signal(sig, handler)
    return {"step": step, "tokens_seen": tokens_seen, "skipped_steps": skipped_total,
            "run_url": store.url(f"runs/{run_id}")}


# The stage -----------------------------------------------------------------------------------------

def export_sft(cfg: Config, say=log) -> str:
    """runs/<sft run>/final from its newest checkpoint: the checkpoint's HF files (manifest last)."""
    store, run_id = bucket(cfg), sft_run_id(cfg)
    key = f"runs/{run_id}/final"
    if ckpt.newest_to_export(store, run_id, key, "sft export") is None:
        say(f"sft export: {store.url(key)} is up to date")
        return key
    local_root = Path(cfg.storage.local_dir)
    step, src = ckpt.fetch_newest(store, run_id, local_root / "runs" / run_id / "export-src", log=say)
    out = local_root / key
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for path in src.iterdir():
        if path.is_file() and path.name not in TRAINING_FILES:
            shutil.copy2(path, out / path.name)
    ckpt.publish_folder(store, out, key, step, replace=True)
    say(f"sft export: step {step} -> {store.url(key)}")
    return key


def stage_sft(cfg: Config) -> int:
    """The SFT job: starting model, packed conversations, training (torchrun when more than one
    process), export. Node 0 holds the SFT run's lease. Returns the exit code (0 done, 75
    preempted: rerun to resume)."""
    from trainer.config import ConfigError
    from trainer.train import EXIT_PREEMPTED, Preempted

    store, run_id = bucket(cfg), sft_run_id(cfg)
    nproc, nnodes = default_nproc(cfg), int(os.environ.get("NNODES", "1") or 1)
    try:
        batch_geometry(cfg, nproc * nnodes)
    except ValueError as e:
        raise ConfigError(f"invalid configuration:\n  {e}") from None
    old = {s: signal.signal(s, _preempted_outside_training) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _stage(cfg, store, run_id, nproc, nnodes)
    except Preempted:
        return EXIT_PREEMPTED
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _preempted_outside_training(signum, frame):
    """A signal before or after the training loop (which checkpoints on one itself): nothing to
    save, every step is redone or reused by the rerun, so exit 75 at once."""
    from trainer.train import Preempted

    log(f"sft: received signal {signum} outside training: exiting with 75 (rerun to continue)")
    raise Preempted()


def _stage(cfg: Config, store: Storage, run_id: str, nproc: int, nnodes: int) -> int:
    done = ckpt.complete_steps(store, run_id)
    if done and done[0] >= cfg.sft.max_steps:
        log(f"sft: {ckpt.step_name(done[0])} of {run_id} is published (sft.max_steps={cfg.sft.max_steps}); "
            f"nothing to train")
    else:
        lease = _hold_lease(cfg, store, run_id)
        try:
            code = _train(cfg, store, run_id, nproc, nnodes, lease)
        finally:
            if lease is not None:
                lease.release()
        if code:
            log(f"sft exited with {code}" + (" (preempted: rerun the same command to resume)" if code == 75 else ""))
            return code
    if node_rank() == 0:
        key = export_sft(cfg)
        log(f"sft done. model: {store.url(key)}  chat: python entrypoint.py chat --checkpoint {store.url(key)}")
    return 0


def _train(cfg: Config, store: Storage, run_id: str, nproc: int, nnodes: int, lease) -> int:
    from transformers import AutoConfig

    from trainer.config import ConfigError

    init = init_url(cfg)
    log(f"sft: {init} -> {store.url(f'runs/{run_id}')}")
    try:
        init_dir = model_folder(init, cfg)
    except FileNotFoundError as e:
        raise ConfigError(f"sft.init: {e}") from None
    tok = load_chat_tokenizer(init_dir)
    context = AutoConfig.from_pretrained(str(init_dir)).max_position_embeddings
    seq_len = cfg.sft.seq_len or context
    if seq_len > context:
        log(f"sft: sft.seq_len={seq_len} is longer than the model's context ({context} tokens): positions beyond it "
            f"were never pretrained (here only conversations that long train them) and RoPE extrapolates poorly; "
            f"the export's context becomes {seq_len}")
    data_dir = prepare_conversations(cfg, tok, seq_len)
    run_local = Path(cfg.storage.local_dir) / "runs" / run_id
    run_local.mkdir(parents=True, exist_ok=True)
    cfg_path = run_local / "resolved.yaml"
    cfg_path.write_text(to_yaml(cfg), encoding="utf-8")
    if node_rank() == 0:
        store.write_text(f"runs/{run_id}/config.yaml", to_yaml(cfg))
    if nproc * nnodes == 1:  # one process: no torchrun (its start costs seconds and adds nothing)
        finetune(cfg, store, data_dir, init_dir, log=lambda m, **k: log(m), lease=lease)
        return 0
    return _torchrun(nproc, nnodes, ["-m", "trainer.sft", f"--config={cfg_path}", f"--data={data_dir}",
                                     f"--init={init_dir}"], lease, cfg.train.grace_seconds)


def _hold_lease(cfg: Config, store: Storage, run_id: str):
    """Node 0 holds runs/<sft run>/lease.json, as `run` does for pretraining (trainer.lease)."""
    if node_rank() != 0:
        return None
    from trainer.lease import Lease

    return Lease(store, run_id, cfg.run.lease_seconds, log=log).acquire(takeover=cfg.run.takeover)


def _torchrun(nproc: int, nnodes: int, tail: list[str], lease, grace_seconds: int) -> int:
    """torchrun as stage_pretrain starts it (launch.torchrun); torchrun exits 1 when its workers exit
    75 after a forwarded signal, so a forwarded signal makes the result 75."""
    from trainer.launch import torchrun
    from trainer.train import EXIT_PREEMPTED

    code, signalled = torchrun(nproc, nnodes, tail, lease, grace_seconds, "sft")
    return EXIT_PREEMPTED if code and signalled else code


def _worker(argv: list[str]) -> None:
    """One torchrun process (python -m trainer.sft --config ... --data ... --init ...)."""
    parser = argparse.ArgumentParser(prog="trainer.sft")
    for name in ("--config", "--data", "--init"):
        parser.add_argument(name, required=True)
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    from trainer.train import shutdown_distributed

    try:
        finetune(cfg, bucket(cfg), Path(args.data), Path(args.init), log=lambda m, **k: log(m))
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    _worker(sys.argv[1:])
