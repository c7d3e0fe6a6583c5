"""Corpus -> packed token shards (+ a validation split held out by document hash), cached in the bucket.

A shard is a flat little-endian array of token ids (uint16 when the vocabulary fits, else uint32):
documents joined by <|endoftext|>. `index.json`, written last, lists the shards with token counts
and sha256, plus the counts of what each filter removed. The data folder's name is a hash of the
corpus listing, the tokenizer's content and every setting that changes the tokens, so another node,
a rerun or another run with the same inputs reuses it.

Memory is bounded for any corpus size: documents stream through in batches, tokens go straight to
the open shard file. Only the dedup set grows with the number of documents (8 bytes of hash each).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import queue
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from trainer.config import Config, DataConfig
from trainer.tokenizer import EOS, doc_hash

FORMAT_VERSION = 1
BATCH_DOCS = 2048


def is_validation(text: str, val_permille: int) -> bool:
    """Stable across reruns, machines and world sizes: depends on the text alone."""
    return doc_hash(text) % 1000 < val_permille


def data_hash(cfg: Config, corpus_fp: str, tokenizer_fp: str) -> str:
    d = cfg.data
    key = json.dumps({"v": FORMAT_VERSION, "corpus": corpus_fp, "tokenizer": tokenizer_fp,
                      "text_field": d.text_field, "val_permille": d.val_permille, "shard_tokens": d.shard_tokens,
                      "nfkc": d.nfkc, "to_simplified": d.to_simplified, "min_chars": d.min_chars,
                      "max_chars": d.max_chars, "dedup": d.dedup}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class Normalizer:
    """NFKC, traditional->simplified, length filters and exact dedup, counting what each removed."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.counts: Counter = Counter()
        self._seen: set[int] = set()
        self._t2s = None
        if cfg.to_simplified:
            from opencc import OpenCC

            self._t2s = OpenCC("t2s")

    def __call__(self, docs: Iterable[str]) -> Iterator[str]:
        cfg = self.cfg
        for text in docs:
            self.counts["documents_read"] += 1
            if cfg.nfkc:
                text = unicodedata.normalize("NFKC", text)
            if self._t2s is not None:
                text = self._t2s.convert(text)
            if len(text) < cfg.min_chars:
                self.counts["removed_too_short"] += 1
                continue
            if cfg.max_chars and len(text) > cfg.max_chars:
                self.counts["truncated_too_long"] += 1
                text = text[: cfg.max_chars]
            if cfg.dedup:
                h = doc_hash(text)
                if h in self._seen:
                    self.counts["removed_duplicate"] += 1
                    continue
                self._seen.add(h)
            self.counts["documents_kept"] += 1
            yield text


class ShardWriter:
    """Appends token arrays to numbered shard files of at most `shard_tokens` tokens."""

    def __init__(self, out_dir: Path, split: str, dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._f = None
        self._n = 0
        self._sha = None

    def _open(self):
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._f = open(self.out_dir / name, "wb")
        self._n = 0
        self._sha = hashlib.sha256()
        self.shards.append({"name": name, "tokens": 0})

    def write(self, tokens: np.ndarray):
        while len(tokens):
            if self._f is None:
                self._open()
            room = self.shard_tokens - self._n
            part, tokens = tokens[:room], tokens[room:]
            data = part.astype(self.dtype).tobytes()
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

    def close(self) -> list[dict]:
        self._close()
        return self.shards


def _batched(docs: Iterable[str], n: int, maxsize: int = 4) -> Iterator[list[str]]:
    """Batches of documents, read in a background thread so reading overlaps tokenizing
    (encode_batch releases the GIL and uses every core)."""
    q: queue.Queue = queue.Queue(maxsize)
    done = object()

    def produce():
        try:
            batch = []
            for d in docs:
                batch.append(d)
                if len(batch) == n:
                    q.put(batch)
                    batch = []
            if batch:
                q.put(batch)
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


def prepare_shards(cfg: Config, docs: Iterable[str], tokenizer, out_dir: Path, progress: bool = True) -> dict:
    """Tokenize `docs` into shards under out_dir; return the index (also written as index.json)."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    backend = tokenizer.backend_tokenizer if hasattr(tokenizer, "backend_tokenizer") else tokenizer
    eos = backend.token_to_id(EOS)
    if eos is None:
        raise ValueError(f"the tokenizer has no {EOS} token; pretraining needs it to separate documents")
    vocab = backend.get_vocab_size()
    dtype = np.uint16 if vocab <= 65536 else np.uint32
    writers = {s: ShardWriter(out_dir, s, dtype, cfg.data.shard_tokens) for s in ("train", "val")}
    chars = Counter()
    norm = Normalizer(cfg.data)
    start = time.time()
    bar = tqdm(desc="prepare", unit=" docs", disable=not progress)
    for batch in _batched(norm(docs), BATCH_DOCS):
        split_of = ["val" if is_validation(t, cfg.data.val_permille) else "train" for t in batch]
        encodings = backend.encode_batch(batch, add_special_tokens=False)
        for split in ("train", "val"):
            ids = [np.asarray(e.ids + [eos], dtype=np.int64) for e, s in zip(encodings, split_of) if s == split]
            if ids:
                writers[split].write(np.concatenate(ids))
                chars[split] += sum(len(t) + 1 for t, s in zip(batch, split_of) if s == split)
        bar.update(len(batch))
    bar.close()
    index = {
        "format": FORMAT_VERSION, "dtype": np.dtype(dtype).name, "vocab_size": vocab, "eos_id": eos,
        "train": writers["train"].close(), "val": writers["val"].close(),
        "chars": dict(chars), "filters": dict(norm.counts), "seconds": round(time.time() - start, 2),
    }
    index["tokens"] = {s: sum(x["tokens"] for x in index[s]) for s in ("train", "val")}
    if index["tokens"]["train"] == 0:
        raise ValueError("prepare produced no training tokens: every document was filtered out or held out")
    (out_dir / "index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
    return index


def tokenizer_fingerprint(tok_dir: Path) -> str:
    return hashlib.sha256((Path(tok_dir) / "tokenizer.json").read_bytes()).hexdigest()[:16]


def shard_path_ok(path: Path, entry: dict, itemsize: int) -> bool:
    return path.is_file() and path.stat().st_size == entry["tokens"] * itemsize

