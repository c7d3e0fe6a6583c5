"""Corpus files: resolve sources, pull them into the local cache, and read documents out of them.

Formats (by file name): .jsonl / .json (one JSON object per line, text in `data.text_field`),
.parquet (column `data.text_field`), .txt (documents separated by blank lines); each optionally
compressed as .gz or .zst. Errors name the file and line; with `data.on_error: skip` the bad
record (or the unreadable rest of a corrupt file) is skipped and counted instead.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import hashlib
import io
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from trainer.config import Config, DataConfig
from trainer.storage import is_s3, open_storage

FORMATS = (".jsonl", ".json", ".parquet", ".txt")
COMPRESSIONS = ("", ".gz", ".zst")
SUFFIXES = tuple(f + c for f in FORMATS for c in COMPRESSIONS)


class DataError(ValueError):
    """Bad corpus input; the message names the source, file and line."""


@dataclass(frozen=True)
class CorpusFile:
    url: str  # where it came from (s3://... or an absolute local path)
    size: int  # bytes
    etag: str  # content fingerprint (S3 ETag, or a hash of a local file's head, tail and size)
    local: str = ""  # path of the readable copy on this machine, once pulled

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


def _local_fingerprint(path: Path) -> str:
    """Stable across copies and machines (unlike mtime), cheap for any size: head + tail + size."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return h.hexdigest()[:32]


def _has_magic(s: str) -> bool:
    return any(c in s for c in "*?[")


def resolve_sources(cfg: Config) -> list[CorpusFile]:
    """Expand data.sources (files, folders, globs; local or s3://) into a sorted file listing.

    A source that matches no corpus file is an error naming it (a typo must not train on nothing).
    """
    files: dict[str, CorpusFile] = {}
    for i, source in enumerate(cfg.data.sources):
        found = _resolve_s3(source, cfg) if is_s3(source) else _resolve_local(source)
        if not found:
            raise DataError(f"data.sources[{i}]: {source!r} matches no corpus file "
                            f"(supported: {', '.join(FORMATS)}, optionally .gz/.zst)")
        for f in found:
            files.setdefault(f.url, f)
    return sorted(files.values(), key=lambda f: f.url)


def _resolve_local(source: str) -> list[CorpusFile]:
    path = Path(source).expanduser()
    if _has_magic(source):
        paths = [Path(p) for p in glob.glob(str(path), recursive=True)]
    elif path.is_dir():
        paths = [p for p in path.rglob("*")]
    else:
        paths = [path] if path.exists() else []
    out = []
    for p in paths:
        if p.is_file() and p.name.endswith(SUFFIXES):
            p = p.resolve()
            out.append(CorpusFile(str(p), p.stat().st_size, _local_fingerprint(p), local=str(p)))
    return out


def _resolve_s3(source: str, cfg: Config) -> list[CorpusFile]:
    bucket, _, pattern = source[len("s3://"):].partition("/")
    store = open_storage(f"s3://{bucket}", cfg.storage)
    if _has_magic(pattern):
        head = pattern[: min(pattern.index(c) for c in "*?[" if c in pattern)]
        prefix = head.rsplit("/", 1)[0] + "/" if "/" in head else ""
        objs = [o for o in store.list(prefix) if fnmatch.fnmatchcase(o.key, pattern)]
    else:
        exact = store.info(pattern) if pattern else None
        objs = [exact] if exact else store.list(pattern.rstrip("/") + "/" if pattern else "")
    return [CorpusFile(f"s3://{bucket}/{o.key}", o.size, o.etag) for o in objs if o.key.endswith(SUFFIXES)]


def pull(cfg: Config, files: list[CorpusFile], progress: bool = True) -> list[CorpusFile]:
    """Make every file readable locally: S3 objects are downloaded in parallel into the cache
    (temporary name, size check, rename); cached copies of the same size and ETag are reused."""
    cache = Path(cfg.storage.local_dir) / "corpus"
    todo, out = [], {}
    for f in files:
        if not is_s3(f.url):
            out[f.url] = f
            continue
        dest = cache / hashlib.sha256(f"{f.url}|{f.etag}".encode()).hexdigest()[:16] / f.name
        pulled = CorpusFile(f.url, f.size, f.etag, local=str(dest))
        out[f.url] = pulled
        if not (dest.is_file() and dest.stat().st_size == f.size):
            todo.append(pulled)
    if todo:
        from tqdm import tqdm

        bar = tqdm(total=sum(f.size for f in todo), unit="B", unit_scale=True, desc="pull",
                   disable=not progress)

        def fetch(f: CorpusFile):
            bucket, _, key = f.url[len("s3://"):].partition("/")
            n = open_storage(f"s3://{bucket}", cfg.storage).download_file(key, f.local)
            bar.update(n)

        with ThreadPoolExecutor(cfg.storage.max_concurrency) as pool:
            list(pool.map(fetch, todo))  # list() re-raises the first failure
        bar.close()
    return [out[f.url] for f in files]


def corpus_fingerprint(files: list[CorpusFile]) -> str:
    """Identifies a corpus listing: names, sizes and content fingerprints (not machine paths)."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: (f.name, f.etag)):
        h.update(f"{f.name}|{f.size}|{f.etag}\n".encode())
    return h.hexdigest()


# Reading documents ---------------------------------------------------------------------------

def _open_binary(path: str) -> io.BufferedIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        import zstandard

        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), 1 << 20)
    return open(path, "rb", buffering=1 << 20)


def _format(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path[:-4] if path.endswith(".zst") else path
    return Path(name).suffix


class DocumentReader:
    """Iterates documents of corpus files, applying data.on_error; `skipped` counts what was dropped."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.skipped: Counter = Counter()  # reason -> records skipped

    def _bad(self, where: str, reason: str, detail: str):
        if self.cfg.on_error == "fail":
            raise DataError(f"{where}: {detail} (set data.on_error=skip to skip such records)")
        self.skipped[reason] += 1

    def iter_file(self, f: CorpusFile) -> Iterator[str]:
        path = f.local or f.url
        fmt = _format(path)
        if f.size == 0 or os.path.getsize(path) == 0:
            self._bad(f.url, "empty file", "empty file")
            return
        try:
            if fmt == ".parquet":
                yield from self._parquet(f, path)
            elif fmt == ".txt":
                yield from self._txt(f, path)
            else:
                yield from self._jsonl(f, path)
        except DataError:
            raise
        except (EOFError, OSError, ValueError) as e:  # corrupt or truncated compressed stream
            self._bad(f.url, "unreadable file", f"cannot read ({type(e).__name__}: {e}); the file is corrupt "
                                                f"or truncated")

    def _jsonl(self, f: CorpusFile, path: str) -> Iterator[str]:
        field = self.cfg.text_field
        with _open_binary(path) as fh:
            line_no = 0
            for line_no, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                where = f"{f.url}:{line_no}"
                try:
                    rec = json.loads(raw)
                except UnicodeDecodeError as e:
                    self._bad(where, "invalid UTF-8", f"invalid UTF-8 ({e.reason} at byte {e.start})")
                    continue
                except ValueError as e:
                    self._bad(where, "invalid JSON", f"invalid JSON: {e}")
                    continue
                if not isinstance(rec, dict) or field not in rec:
                    self._bad(where, "missing text field", f"record has no '{field}' field (data.text_field)")
                    continue
                text = rec[field]
                if not isinstance(text, str):
                    self._bad(where, "non-string text", f"'{field}' is {type(text).__name__}, not a string")
                    continue
                yield text

    def _txt(self, f: CorpusFile, path: str) -> Iterator[str]:
        with _open_binary(path) as fh:
            lines: list[str] = []
            for line_no, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    self._bad(f"{f.url}:{line_no}", "invalid UTF-8", f"invalid UTF-8 ({e.reason} at byte {e.start})")
                    continue
                if line.strip():
                    lines.append(line)
                elif lines:
                    yield "".join(lines).rstrip("\n")
                    lines = []
            if lines:
                yield "".join(lines).rstrip("\n")

    def _parquet(self, f: CorpusFile, path: str) -> Iterator[str]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if self.cfg.text_field not in pf.schema_arrow.names:
            self._bad(f.url, "missing text field",
                      f"no column '{self.cfg.text_field}' (data.text_field); columns: {pf.schema_arrow.names}")
            return
        row = 0
        for batch in pf.iter_batches(columns=[self.cfg.text_field], batch_size=4096):
            for text in batch.column(0).to_pylist():
                row += 1
                if not isinstance(text, str):
                    self._bad(f"{f.url}:row {row}", "non-string text", f"'{self.cfg.text_field}' is not a string")
                    continue
                yield text


def iter_documents(cfg: DataConfig, files: list[CorpusFile], reader: DocumentReader | None = None) -> Iterator[str]:
    reader = reader or DocumentReader(cfg)
    for f in files:
        yield from reader.iter_file(f)


def local_files(paths: list[str | Path]) -> list[CorpusFile]:
    """CorpusFile entries for local paths (tests and tools)."""
    out = []
    for p in paths:
        p = Path(p).resolve()
        out.append(CorpusFile(str(p), p.stat().st_size, _local_fingerprint(p), local=str(p)))
    return out

