"""Supervised fine-tuning: conversations -> chat-template tokens -> packed rows -> the training loop.

From a pretrained model (an export or any checkpoint, local or s3://) to a chat model:
  1. read conversations (`{"messages": [{"role": ..., "content": ...}, ...]}`, the smoltalk format)
     from sft.sources (files, or `datasets` folders and hf://datasets/ ids: trainer/data/hf_datasets.py),
     pulled like pretraining data; a bad record is reported with its file and line (a dataset row
     with its index), or skipped and counted (data.on_error);
  2. render each with the tokenizer's chat template, cut at the assistant replies and tokenized
     piece by piece, so every token is known to be prompt (no loss) or reply (loss);
  3. pack whole conversations into rows of sft.seq_len + 1 tokens (next-fit, padding at the end).
     Positions restart at every conversation; with no attention mask, transformers turns restarting
     position_ids into a block-diagonal causal mask (sdpa/eager: masking_utils.
     find_packed_sequence_indices; flash_attention_2: varlen), so packed conversations never see
     each other;
  4. train with the loss summed over reply tokens and divided by their number in the whole step
     (all micro-batches, all ranks): every reply token weighs the same however rows are split;
  5. the one training loop (trainer/training/loop.py with tasks.SftTask): checkpoints, resume, non-finite
     handling and SIGTERM exactly as pretraining, in runs/<sft.run_id>/; then the export
     runs/<sft.run_id>/final (trainer/job/stages.py: stage_sft).
This module holds what is SFT's own: conversations, the chat template, packing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from trainer.config import Config
from trainer.data.loader import global_sample_ids
from trainer.data.readers import DocumentReader
from trainer.data.sources import DataError, corpus_fingerprint, pull, resolve_sources
from trainer.data.tokenizer import CHAT_TEMPLATE, IM_END, load_tokenizer
from trainer.log import logger

ROLES = ("system", "user", "assistant")
IGNORE = -100  # label of a token without loss (F.cross_entropy's ignore_index)
PACK_VERSION = 2  # bump when tokenization or packing changes (part of the packed data's hash)


def sft_run_id(cfg: Config) -> str:
    return cfg.sft.run_id or f"{cfg.run.id}-sft"


# Reading conversations -------------------------------------------------------------------------

SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


def normalize_turns(messages):
    """Turns in the common styles as {"role", "content"} dicts: smoltalk/OpenAI messages (content a
    string or a list of {"type": "text", "text": ...} parts), ShareGPT ({"from": "human"|"gpt"|
    "system", "value": ...}). Returns (turns, None), or (None, (reason, detail)) naming what was
    found when it is a style we cannot learn from (tool calls, image parts). Other shapes are
    returned as they are, for conversation_problem to name."""
    if not isinstance(messages, list):
        return messages, None
    out = []
    for i, turn in enumerate(messages, 1):
        if not isinstance(turn, dict):
            out.append(turn)
            continue
        if "role" not in turn and "from" in turn:  # ShareGPT
            role = turn["from"]
            turn = {"role": SHAREGPT_ROLES.get(role, role), "content": turn.get("value")}
        if turn.get("tool_calls") or turn.get("role") in ("tool", "function", "ipython"):
            return None, ("tool calls", f"turn {i} ({turn.get('role')}) is an OpenAI tool call or tool result; "
                                        "tool-use conversations are not supported (drop them, or data.on_error=skip)")
        content = turn.get("content")
        if isinstance(content, list):  # OpenAI content parts
            kinds = {p.get("type") if isinstance(p, dict) else type(p).__name__ for p in content}
            if kinds - {"text"}:
                return None, ("unsupported content part",
                              f"turn {i} has content parts of type {sorted(map(str, kinds - {'text'}))}; "
                              "only text parts ({\"type\": \"text\", \"text\": ...}) are read")
            content = "".join(str(p.get("text") or "") for p in content)
        out.append({"role": turn.get("role"), "content": content})
    return out, None


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
    """Yields (where, turns) from jsonl/json/parquet conversation files and Hugging Face `datasets`
    sources (their sft.messages_field column). Reuses DocumentReader's file handling (compression,
    empty and corrupt files, datasets folders and hf:// ids) and data.on_error; `skipped` counts bad
    records by reason, over-long ones included (counted by prepare_conversations)."""

    field_key, missing_reason = "sft.messages_field", "missing messages field"

    def __init__(self, cfg: Config):
        super().__init__(dataclasses.replace(cfg.data, text_field=cfg.sft.messages_field))

    def bad(self, where: str, reason: str, detail: str):
        self._bad(where, reason, detail)

    def _checked(self, where: str, record) -> Iterator[tuple[str, list[dict]]]:
        field = self.cfg.text_field
        if isinstance(record, dict) and field not in record and "conversations" in record:
            field = "conversations"  # ShareGPT's field name
        if not isinstance(record, dict) or field not in record:
            keys = f"; its keys: {sorted(record)[:10]}" if isinstance(record, dict) else ""
            self._bad(where, "missing messages field",
                      f"record has no '{field}' field (sft.messages_field){keys}")
            return
        turns, problem = normalize_turns(record[field])
        problem = problem or conversation_problem(turns)
        if problem:
            self._bad(where, problem[0], problem[1])
            return
        yield where, [{"role": t["role"], "content": t["content"]} for t in turns]

    def _parquet(self, f, path: str):
        import pyarrow.parquet as pq

        field = self.cfg.text_field
        pf = pq.ParquetFile(path)
        if field not in pf.schema_arrow.names and "conversations" in pf.schema_arrow.names:
            field = "conversations"  # ShareGPT's column
        if field not in pf.schema_arrow.names:
            self._bad(f.url, "missing messages field", f"no column '{field}' (sft.messages_field); columns: "
                      f"{pf.schema_arrow.names}", fix="set sft.messages_field to the column of conversations")
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
    tok = load_tokenizer(path)
    if not tok.chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


# A turn's content is replaced by a mark while the template renders, so the rendered text splits into
# the template's own text (which may spell control tokens) and the turns' text (which never becomes
# one: a user pasting `<|im_end|>` means those characters). Private-use characters (U+E000, U+E001):
# a content holding the mark's own spelling is refused by the count check, not misread.
_MARK = re.compile("\ue000([0-9]+)\ue001")


def _marked(turns: list[dict]) -> list[dict]:
    return [{**t, "content": f"\ue000{i}\ue001"} for i, t in enumerate(turns)]


def _segments(text: str, turns: list[dict], seen: list[int]) -> list[tuple[str, bool]]:
    """Rendered `text` split at the marks: (template text, False) and (a turn's content, True)."""
    out, at = [], 0
    for m in _MARK.finditer(text):
        if m.start() > at:
            out.append((text[at:m.start()], False))
        seen.append(int(m.group(1)))
        out.append((turns[int(m.group(1))]["content"], True))
        at = m.end()
    if at < len(text):
        out.append((text[at:], False))
    return out


def _check_marks(seen: list[int], n: int) -> None:
    if seen != list(range(n)):
        raise ValueError("the tokenizer's chat template does not render each turn's content once and in order, so "
                         "message text cannot be told apart from the template's control tokens; use a ChatML-style "
                         "template")


def render_segments(tok, turns: list[dict]) -> list[tuple[list[tuple[str, bool]], bool]]:
    """The conversation's chat-template text as (segments, is_reply) pieces in order; a segment is
    (text, is_content): a turn's content (tokenized as text) or the template's own text (where control
    tokens come from). A reply piece is what the model writes after the generation prompt (content
    and end marker): exactly the tokens it will generate in `chat`. Raises ValueError for a
    template whose text for a longer conversation does not extend the shorter one's (then no token
    can be told apart as prompt or reply), or that does not render every content once."""
    marked, pieces, done, seen = _marked(turns), [], "", []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(marked[:i], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(marked[:i + 1], tokenize=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError("the tokenizer's chat template does not render a conversation as its prefix plus "
                             "the new turn, so reply tokens cannot be told apart; use a ChatML-style template")
        pieces += [(_segments(prompt[len(done):], turns, seen), False),
                   (_segments(full[len(prompt):], turns, seen), True)]
        done = full
    _check_marks(seen, max((i + 1 for i, t in enumerate(turns) if t["role"] == "assistant"), default=0))
    return pieces


def render_pieces(tok, turns: list[dict]) -> list[tuple[str, bool]]:
    """render_segments with each piece's text joined: (piece, is_reply)."""
    return [("".join(text for text, _ in segs), reply) for segs, reply in render_segments(tok, turns)]


def encode_text(tok, texts: list[str]) -> list[list[int]]:
    """Token ids of plain text: the spelling of a control token in it (`<|im_end|>`, `<|endoftext|>`)
    is encoded as the characters it is, as pretraining does (shards: encode_special_tokens).
    No special tokens added (no BOS)."""
    if not texts:
        return []
    return tok(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _encode_segments(tok, segments: list[tuple[str, bool]]) -> list[list[int]]:
    """Ids of each (text, is_content) segment, in two batched calls: content as text, template text
    with its control tokens."""
    content = iter(encode_text(tok, [t for t, is_content in segments if is_content]))
    template_texts = [t for t, is_content in segments if not is_content]
    template = iter(tok(template_texts, add_special_tokens=False)["input_ids"] if template_texts else [])
    return [next(content) if is_content else next(template) for _, is_content in segments]


def encode_chat(tok, turns: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """The token ids of `turns` rendered by the chat template (with the generation prompt): what
    `chat` feeds the model, tokenized as training tokenizes it (encode_conversations): control tokens
    from the template only, every content as text. Raises ValueError as render_segments."""
    marked, seen = _marked(turns), []
    text = tok.apply_chat_template(marked, tokenize=False, add_generation_prompt=add_generation_prompt)
    segments = _segments(text, turns, seen)
    _check_marks(seen, len(turns))
    return [i for ids in _encode_segments(tok, segments) for i in ids]


def encode_conversations(tok, conversations: list[list[dict]]) -> list[tuple[list[int], list[bool]]]:
    """(token ids, is-reply flag per token) for each conversation; batched tokenizer calls.

    Pieces are tokenized separately: the prompt ends right where generation starts, so training
    sees the same tokens as `chat` does at inference (a joint encoding could merge across it).
    Within a piece, each turn's content is tokenized as text (render_segments): only the template
    puts control tokens in, so a reply explaining `<|im_end|>` never teaches the model to stop there."""
    pieces = [render_segments(tok, turns) for turns in conversations]
    flat = [seg for conv in pieces for segs, _ in conv for seg in segs]
    ids = _encode_segments(tok, flat)
    out, k = [], 0
    for conv in pieces:
        tokens, reply = [], []
        for segs, is_reply in conv:
            for _ in segs:
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
        for convs, used in rows:  # noqa: B007 - convs is the row found (used after the loop)
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
    and get(ids) -> (len(ids), seq_len + 1, 3) int64 rows of [token, label, position]. tasks.PackedLoss
    splits a row into row[:, :-1] ([input, -, position]) and row[:, 1:] ([-, target, -])."""

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

    def targets_at(self, seed: int, position: int, rows_per_step: int) -> int:
        """Loss terms in the step whose first row is at global `position` (every rank's rows): a pure
        function, no communication."""
        return int(self.targets[global_sample_ids(seed, self.n, position, rows_per_step)].sum())


def packed_data_hash(cfg: Config, corpus_fp: str, tok, seq_len: int) -> str:
    key = json.dumps({
        "corpus": corpus_fp, "tokenizer": hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest(),
        "template": tok.chat_template, "seq_len": seq_len, "field": cfg.sft.messages_field,
        "on_error": cfg.data.on_error, "pad": tok.pad_token_id, "version": PACK_VERSION,
    }, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def prepare_conversations(cfg: Config, tok, seq_len: int) -> Path:
    """Read, check, tokenize and pack sft.sources into local_dir/sft-data/<hash>/ (reused when
    there): rows.bin, targets.npy, index.json (written last, with counts of skipped records).
    Every node packs for itself: the result is a pure function of the inputs."""
    scfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=cfg.sft.sources))
    files = pull(scfg, resolve_sources(scfg), progress=False)
    out = Path(cfg.storage.local_dir) / "sft-data" / packed_data_hash(cfg, corpus_fingerprint(files), tok, seq_len)
    if (out / "index.json").is_file():
        logger.info(f"sft data: reusing {out}")
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
    logger.info(f"sft data: {index['conversations']} conversations -> {index['rows']} rows of {seq_len} tokens "
        f"({index['target_tokens']} reply tokens, {index['padding_fraction']:.1%} padding), "
        f"skipped {index['skipped_records']} -> {out}")
    return out


def stop_token_ids(tok) -> list[int]:
    """A reply ends at <|im_end|> (ChatML) or at end of text."""
    ids = [tok.convert_tokens_to_ids(IM_END)] if IM_END in tok.get_vocab() else []
    return ids + [i for i in (tok.eos_token_id,) if i is not None and i not in ids]
