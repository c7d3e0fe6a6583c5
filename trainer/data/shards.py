"""Corpus -> packed token shards (+ a validation split held out by document hash), cached in the bucket.

A shard is a flat little-endian array of token ids (uint16 when the vocabulary fits, else uint32):
documents joined by the tokenizer's document separator (<|endoftext|>, or an imported tokenizer's
own EOS such as LLaMA's </s>; `document_separator`). `index.json`, written last, lists the shards with token counts
and sha256, plus the counts of what each filter removed. The data folder's name is a hash of the
corpus listing, the tokenizer's content and every setting that changes the tokens, so another node,
a rerun or another run with the same inputs reuses it.

Throughput and memory: three stages overlap. A reader thread parses, normalises and hashes batches
of documents (Python, holds the GIL); `encode_batch_fast` tokenizes the next batch on every core
(Rust, releases the GIL) while the main thread appends the previous batch's ids to the open shard
file. At most a few batches are in flight, so memory does not grow with the corpus; only exact dedup
remembers something per document (8 bytes of hash, see SeenHashes). scripts/bench_tokenizer.py
measures this against raw `Tokenizer.encode_batch` on the same texts.

That is `prepare_shards`, the one-process path over any iterable of documents (tests, tools). The
job's prepare stage runs trainer/data/prepare_pool.py instead: worker processes over work units on
every core, then the same writer, making the same bytes (tests/test_prepare_parallel.py).
"""

from __future__ import annotations

import hashlib
import json
import queue
import re
import threading
import time
import unicodedata
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from trainer.config import Config, ConfigError, DataConfig
from trainer.data.sources import DataError
from trainer.data.tokenizer import EOS, backend_of, doc_hash

FORMAT_VERSION = 2  # 2: special-token strings inside documents are encoded as plain text
BATCH_DOCS = 2048  # documents per encode_batch call: enough to keep every core busy
LONG_DOC_CHARS = 1_000_000  # longer documents are encoded in pieces, in parallel (one encode is one core)
PIECE_CHARS = 100_000  # ... of about this many characters, cut after line breaks
_LINE_START = re.compile(r"\n(?=\S)")


def line_pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """`text` in pieces of about `size` characters, each cut right after a newline that a
    non-space character follows. Our pre-tokenizer isolates runs of whitespace, so the pieces
    encode to exactly the tokens of the whole text (tested); a text without such a newline stays whole."""
    pieces, start = [], 0
    while len(text) - start > size:
        m = _LINE_START.search(text, start + size)
        if not m:
            break
        pieces.append(text[start:m.end()])
        start = m.end()
    pieces.append(text[start:])
    return pieces
PREFETCH_BATCHES = 4  # normalised batches the reader thread may run ahead


def is_validation(text: str, val_permille: int) -> bool:
    """Stable across reruns, machines and world sizes: depends on the text alone."""
    return doc_hash(text) % 1000 < val_permille


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65536), else uint32: half the disk and page cache."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def data_hash(cfg: Config, corpus_fp: str, tokenizer_fp: str) -> str:
    d = cfg.data
    key = json.dumps({"v": FORMAT_VERSION, "corpus": corpus_fp, "tokenizer": tokenizer_fp,
                      "text_field": d.text_field, "val_permille": d.val_permille, "shard_tokens": d.shard_tokens,
                      "nfkc": d.nfkc, "to_simplified": d.to_simplified, "min_chars": d.min_chars,
                      "max_chars": d.max_chars, "dedup": d.dedup}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class SeenHashes:
    """Exact set of 64-bit document hashes at about 9 bytes each (a Python set of ints costs ~70):
    a sorted array, plus a set of recent hashes merged into it whenever it reaches 1/8 of the array."""

    def __init__(self):
        self._sorted = np.empty(0, dtype=np.uint64)
        self._recent: set[int] = set()

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def add_batch(self, hashes: list[int]) -> list[bool]:
        """Add the hashes; True where a hash was new (not seen before, nor earlier in this batch)."""
        known = [False] * len(hashes)
        if len(self._sorted) and hashes:
            h = np.array(hashes, dtype=np.uint64)
            i = np.minimum(np.searchsorted(self._sorted, h), len(self._sorted) - 1)
            known = (self._sorted[i] == h).tolist()
        new = []
        recent = self._recent
        for h, k in zip(hashes, known):
            fresh = not k and h not in recent
            if fresh:
                recent.add(h)
            new.append(fresh)
        if len(recent) > max(1 << 16, len(self._sorted) // 8):
            merged = np.concatenate([self._sorted, np.fromiter(recent, np.uint64, len(recent))])
            merged.sort(kind="stable")  # radix sort for integers: linear time
            self._sorted = merged
            recent.clear()
        return new


class Normalizer:
    """NFKC, traditional->simplified, length filters and exact dedup, counting what each removed.

    `normalizer(docs)` yields texts; `normalizer.batches(docs, n)` yields (texts, hashes) lists of
    up to n documents, the hash being `doc_hash` of the final text (dedup and validation split)."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.counts: Counter = Counter()
        self._seen = SeenHashes() if cfg.dedup else None
        self._t2s = None
        if cfg.to_simplified:
            from opencc import OpenCC

            self._t2s = OpenCC("t2s")

    def __call__(self, docs: Iterable[str]) -> Iterator[str]:
        for texts, _ in self.batches(docs, 256, hashes=False):
            yield from texts

    def batches(self, docs: Iterable[str], n: int = BATCH_DOCS, hashes: bool = True
                ) -> Iterator[tuple[list[str], list[int]]]:
        cfg, t2s = self.cfg, self._t2s
        texts: list[str] = []
        read = short = truncated = 0
        for text in docs:
            read += 1
            if cfg.nfkc:
                text = unicodedata.normalize("NFKC", text)
            if t2s is not None:
                text = t2s.convert(text)
            if len(text) < cfg.min_chars:
                short += 1
                continue
            if cfg.max_chars and len(text) > cfg.max_chars:
                truncated += 1
                text = text[: cfg.max_chars]
            texts.append(text)
            if len(texts) == n:
                self._count(documents_read=read, removed_too_short=short, truncated_too_long=truncated)
                read = short = truncated = 0
                yield self._dedup(texts, hashes)
                texts = []
        self._count(documents_read=read, removed_too_short=short, truncated_too_long=truncated)
        if texts:
            yield self._dedup(texts, hashes)

    def _dedup(self, texts: list[str], want_hashes: bool) -> tuple[list[str], list[int]]:
        hashes = [doc_hash(t) for t in texts] if want_hashes or self._seen is not None else []
        if self._seen is not None:
            new = self._seen.add_batch(hashes)
            removed = len(new) - sum(new)
            if removed:
                texts = [t for t, keep in zip(texts, new) if keep]
                hashes = [h for h, keep in zip(hashes, new) if keep]
            self._count(removed_duplicate=removed)
        self._count(documents_kept=len(texts))
        return texts, hashes if want_hashes else []

    def _count(self, **counts: int):
        self.counts.update({k: n for k, n in counts.items() if n})  # no zero entries in the report


class ShardWriter:
    """Appends token arrays to numbered shard files of at most `shard_tokens` tokens."""

    def __init__(self, out_dir: Path, split: str, dtype, shard_tokens: int, on_close=None, open_shard=None):
        """on_close(path), when given, is called as each shard file is complete (prepare uploads it
        then); open_shard(name), when given, is the binary file a shard is written to instead of
        out_dir/name (prepare streams shards into the bucket: io/upload_stream.py; closing it publishes)."""
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.on_close, self.open_shard = on_close, open_shard
        self.shards: list[dict] = []
        self._f = None
        self._n = 0
        self._sha = None

    def _open(self):
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._f = self.open_shard(name) if self.open_shard else open(self.out_dir / name, "wb")
        self._n = 0
        self._sha = hashlib.sha256()
        self.shards.append({"name": name, "tokens": 0})

    def write(self, tokens: np.ndarray):
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        while len(tokens):
            if self._f is None:
                self._open()
            room = self.shard_tokens - self._n
            part, tokens = tokens[:room], tokens[room:]
            data = part.tobytes()
            self._f.write(data)
            self._sha.update(data)
            self._n += len(part)
            if self._n >= self.shard_tokens:
                self._close()

    def _close(self):
        if self._f is not None:
            self._f.close()
            self.shards[-1].update(tokens=self._n, sha256=self._sha.hexdigest())
            self._f = None
            if self.on_close is not None:
                self.on_close(self.out_dir / self.shards[-1]["name"])

    def abort(self) -> None:
        """Drop the shard being written (a streamed one is not published)."""
        if self._f is not None:
            getattr(self._f, "abort", self._f.close)()
            self._f = None

    def close(self) -> list[dict]:
        self._close()
        return self.shards


def _prefetch(items: Iterable, maxsize: int) -> Iterator:
    """Iterate `items` in a background thread, at most `maxsize` ahead (reading overlaps encoding)."""
    q: queue.Queue = queue.Queue(maxsize)
    done = object()

    def produce():
        try:
            for item in items:
                q.put(item)
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(e)

    threading.Thread(target=produce, daemon=True).start()
    while True:
        item = q.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def encoding_backend(tokenizer):
    """A private copy of the Rust tokenizer for packing: no truncation or padding, and special-token
    strings that occur inside a document (say a scraped "<|endoftext|>") encoded as plain text, so
    that the only EOS ids in a shard are the document separators we put there."""
    from tokenizers import Tokenizer

    backend = backend_of(tokenizer)
    if not isinstance(backend, Tokenizer):  # any object with token_to_id, get_vocab_size, encode_batch
        return backend
    return packing_tokenizer(backend.to_str())


def packing_tokenizer(tokenizer_json: str):
    """encoding_backend's copy made from a tokenizer.json string, as prepare's worker processes get
    it (the string pickles; encode_special_tokens is not part of it, so it is set here)."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer_json)
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = True
    return backend


def document_separator(tokenizer, backend=None) -> tuple[str, int]:
    """(token, id) put between documents: <|endoftext|> when the vocabulary has it (ours, GPT-2's,
    Qwen's, whose chat models name <|im_end|> as eos_token), else the tokenizer's own eos_token
    (LLaMA and Mistral: </s>). Raises ConfigError naming tokenizer.path when it has neither."""
    backend = backend or backend_of(tokenizer)
    for token in (EOS, getattr(tokenizer, "eos_token", None)):
        if isinstance(token, str) and backend.token_to_id(token) is not None:
            return token, backend.token_to_id(token)
    raise ConfigError(f"tokenizer.path: the tokenizer has no {EOS} token and no eos_token in its vocabulary; "
                      f"pretraining needs one to separate documents")


def encode_documents(backend, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added; a text past LONG_DOC_CHARS is encoded in
    line_pieces, in the same batch, so that it spreads over the cores like the others."""
    encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast: no offsets
    if max(map(len, texts), default=0) <= LONG_DOC_CHARS:
        return [e.ids for e in encode_batch(texts, add_special_tokens=False)]
    pieces = [line_pieces(t) if len(t) > LONG_DOC_CHARS else [t] for t in texts]
    encodings = iter(encode_batch([p for ps in pieces for p in ps], add_special_tokens=False))
    return [[i for _ in ps for i in next(encodings).ids] for ps in pieces]


def train_samples(shards: list[dict], seq_len: int) -> int:
    """Training sequences of seq_len + 1 tokens that a split's shards hold (a sequence never crosses
    a shard), as dataset.TokenSamples counts them."""
    return sum(max(0, (s["tokens"] - 1) // seq_len) for s in shards)


def check_trainable(index: dict, seq_len: int, skipped: dict | None = None) -> None:
    """Raise DataError (exit 2, before torchrun starts) when the training split of a prepare index
    holds no sequence of seq_len + 1 tokens; the message gives the corpus counts."""
    if train_samples(index["train"], seq_len):
        return
    tokens, docs = index.get("tokens", {}).get("train", 0), index.get("documents", {})
    if tokens > seq_len:  # enough tokens, but cut into shards shorter than one sequence
        raise DataError(f"data.shard_tokens: no training shard holds train.seq_len+1 = {seq_len + 1} tokens "
                        f"(largest {max(s['tokens'] for s in index['train']):,}); raise data.shard_tokens")
    counts = (f"{docs.get('train', 0)} training and {docs.get('val', 0)} validation document(s), "
              f"{tokens:,} training tokens")
    filters = ", ".join(f"{k} {v}" for k, v in index.get("filters", {}).items() if k != "documents_kept")
    bad = ", ".join(f"{k}: {v}" for k, v in (skipped or index.get("skipped_records") or {}).items())
    raise DataError(f"data.sources: the corpus is too small to train on: {counts}, fewer than one sequence of "
                    f"train.seq_len+1 = {seq_len + 1} tokens" + (f"; filters: {filters}" if filters else "")
                    + (f"; bad records skipped: {bad}" if bad else "") + "; add text or lower train.seq_len")


def prepare_shards(cfg: Config, docs: Iterable[str], tokenizer, out_dir: Path, progress: bool = True,
                   skipped: dict | None = None) -> dict:
    """Tokenize `docs` into shards under out_dir; return the index (also written as index.json).

    Raises DataError, with the counts (`skipped`: the reader's counts of bad records), when no
    training token is left (every document filtered out or held out), and ConfigError when the
    tokenizer has no document separator (document_separator). Whether the tokens fill one
    sequence of train.seq_len + 1 is check_trainable's question: the index is reused by runs with
    other sequence lengths, so the stage asks it of every index, new or reused."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    backend = encoding_backend(tokenizer)
    eos_token, eos = document_separator(tokenizer, backend)
    vocab = backend.get_vocab_size()
    dtype = token_dtype(vocab)
    writers = {s: ShardWriter(out_dir, s, dtype, cfg.data.shard_tokens) for s in ("train", "val")}
    chars, documents = Counter(), Counter()
    norm = Normalizer(cfg.data)
    permille = cfg.data.val_permille
    start = time.time()
    # disable=None: a bar on a terminal; in a log file (containers, CI) no carriage-return spam.
    bar = tqdm(desc="prepare", unit="char", unit_scale=True, disable=None if progress else True)

    def encode(batch):
        texts, hashes = batch
        return texts, hashes, encode_documents(backend, texts)

    def write(texts, hashes, token_ids):
        is_val = [h % 1000 < permille for h in hashes]  # == is_validation(text), hash computed once
        for split, want in (("train", False), ("val", True)):
            picked = [(t, ids) for t, ids, v in zip(texts, token_ids, is_val) if v is want]
            if picked:
                ids = np.fromiter(chain.from_iterable(chain(doc, (eos,)) for _, doc in picked), dtype=dtype)
                writers[split].write(ids)
                n_chars = sum(len(t) + 1 for t, _ in picked)
                chars[split] += n_chars
                documents[split] += len(picked)
                bar.update(n_chars)

    # The main thread writes batch i while a worker encodes batch i + 1 and the reader prepares i + 2.
    with ThreadPoolExecutor(1) as pool:
        pending = None
        for batch in _prefetch(norm.batches(docs, BATCH_DOCS), PREFETCH_BATCHES):
            nxt = pool.submit(encode, batch)
            if pending is not None:
                write(*pending.result())
            pending = nxt
        if pending is not None:
            write(*pending.result())
    bar.close()
    seconds = time.time() - start
    index = {
        "format": FORMAT_VERSION, "dtype": dtype.name, "vocab_size": vocab, "eos_id": eos, "eos_token": eos_token,
        "train": writers["train"].close(), "val": writers["val"].close(),
        "chars": dict(chars), "documents": dict(documents), "filters": dict(norm.counts),
        "seconds": round(seconds, 2), "chars_per_second": round(sum(chars.values()) / max(seconds, 1e-9)),
    }
    index["tokens"] = {s: sum(x["tokens"] for x in index[s]) for s in ("train", "val")}
    if index["tokens"]["train"] == 0:
        check_trainable(index, 1, skipped)  # the message with the counts
    (out_dir / "index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
    return index


def tokenizer_fingerprint(tok_dir: Path) -> str:
    return hashlib.sha256((Path(tok_dir) / "tokenizer.json").read_bytes()).hexdigest()[:16]


def shard_path_ok(path: Path, entry: dict, itemsize: int) -> bool:
    return path.is_file() and path.stat().st_size == entry["tokens"] * itemsize
