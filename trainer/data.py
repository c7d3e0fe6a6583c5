"""Corpus files: resolve sources, pull them into the local cache, and read documents out of them.

Formats (by file name): .jsonl / .json (one JSON object per line, text in `data.text_field`),
.parquet (column `data.text_field`), .txt (documents separated by blank lines); each optionally
compressed as .gz or .zst. Errors name the file and line; with `data.on_error: skip` the bad
record (or the unreadable rest of a corrupt file) is skipped and counted instead.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import re
import zlib
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


def _glob_regex(pattern: str) -> re.Pattern:
    """A glob as glob.glob(recursive=True) reads it, for object keys: * and ? stay inside one path
    segment, ** spans segments (fnmatch's * would cross '/', unlike the same glob on a local disk)."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] in "*?":
            out.append("[^/]*" if pattern[i] == "*" else "[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


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
        match = _glob_regex(pattern).match
        objs = [o for o in store.list(prefix) if match(o.key)]
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

class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a .zst file of one or more frames. zstandard's stream_reader stops
    silently where a truncated file ends (dropping the rest of the corpus without a word); here a
    file that ends inside a frame raises EOFError, and corrupt data raises ValueError."""

    def __init__(self, path: str):
        import zstandard

        self._f = open(path, "rb")
        self._dctx = zstandard.ZstdDecompressor()
        self._zstd_error = zstandard.ZstdError
        self._frame = self._dctx.decompressobj()
        self._in_frame = False  # bytes of the current frame have been fed, its end not yet seen
        self._out, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while self._pos == len(self._out):
            chunk = self._f.read(1 << 16)  # small: text can expand 10-1000x
            if not chunk:
                if self._in_frame:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            self._out, self._pos = self._feed(chunk), 0
        n = min(len(buf), len(self._out) - self._pos)
        buf[:n] = self._out[self._pos:self._pos + n]
        self._pos += n
        return n

    def _feed(self, data: bytes) -> bytes:
        out = []
        while data:
            self._in_frame = True
            try:
                out.append(self._frame.decompress(data))
            except self._zstd_error as e:
                raise ValueError(f"zstd: {e}") from None
            if not self._frame.eof:
                break
            data, self._frame, self._in_frame = self._frame.unused_data, self._dctx.decompressobj(), False
        return b"".join(out)

    def close(self):
        if hasattr(self, "_f"):  # not when open() failed in __init__
            self._f.close()
        super().close()


def _open_binary(path: str) -> io.BufferedIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        return io.BufferedReader(_ZstdFrames(path), 1 << 20)
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
        self._lines_read = 0  # where a corrupt stream broke off, for the message
        try:
            if fmt == ".parquet":
                yield from self._parquet(f, path)
            elif fmt == ".txt":
                yield from self._txt(f, path)
            else:
                yield from self._jsonl(f, path)
        except DataError:
            raise
        except (EOFError, OSError, ValueError, zlib.error) as e:  # corrupt or truncated compressed stream
            after = f" after line {self._lines_read}" if fmt != ".parquet" else ""
            self._bad(f.url, "unreadable file", f"cannot read{after} ({type(e).__name__}: {e}); the file is corrupt "
                                                f"or truncated")

    def _jsonl(self, f: CorpusFile, path: str) -> Iterator:
        with _open_binary(path) as fh:
            for line_no, raw in enumerate(fh, 1):
                self._lines_read = line_no
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
                yield from self._checked(where, rec)

    def _checked(self, where: str, rec) -> Iterator[str]:
        """The document of one parsed record (none if it is bad); subclasses read other records."""
        field = self.cfg.text_field
        if not isinstance(rec, dict) or field not in rec:
            self._bad(where, "missing text field", f"record has no '{field}' field (data.text_field)")
            return
        text = rec[field]
        if not isinstance(text, str):
            self._bad(where, "non-string text", f"'{field}' is {type(text).__name__}, not a string")
            return
        yield text

    def _txt(self, f: CorpusFile, path: str) -> Iterator[str]:
        with _open_binary(path) as fh:
            lines: list[str] = []
            for line_no, raw in enumerate(fh, 1):
                self._lines_read = line_no
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

