"""Corpus files in an S3 bucket read in parts, so that local disk holds a bounded working set (issue 22).

prepare and the tokenizer's sample read an s3:// corpus file without pulling it first (sources.pull
leaves such files remote): the bytes one read needs (a unit's byte range, a parquet file's footer
and the column chunks of its row groups, or a whole compressed file) are fetched with ranged GETs
(Storage.read_range) into a *sparse* local copy of the object's full size, each at its own offset.
The readers open that copy as if it were the file, so byte offsets, line cuts and parquet metadata
are the object's own and trainer/data/readers.py needs no second code path; the disk holds only the
bytes fetched (the holes read as zeros and are never read). The copy is deleted as soon as its
documents are read. Where a record boundary must be found (unit cuts, sample windows), the object
is read through `open_bytes`, a buffered file over ranged GETs, a few KB at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from dataclasses import dataclass, replace
from pathlib import Path

from trainer.config import StorageConfig
from trainer.data.sources import CorpusFile
from trainer.io.storage import Storage, is_s3, split_url

FETCH_CHUNK = 16 << 20  # bytes per ranged GET into a local copy (bounds memory per worker)
SCAN_BUFFER = 64 << 10  # read-ahead of open_bytes: a boundary scan reads a line or two


@dataclass(frozen=True)
class Remote:
    """How to reach s3:// corpus files: the storage settings and the local folder for partial copies."""
    storage: StorageConfig
    scratch: Path


def is_remote(f: CorpusFile) -> bool:
    """An S3 object with no local copy (sources.pull leaves those to be read in parts)."""
    return f.dataset is None and is_s3(f.url) and not f.local


class _RangeRaw(io.RawIOBase):
    """A read-only, seekable file over an object, each read one ranged GET."""

    def __init__(self, store: Storage, key: str, size: int):
        self._store, self._key, self._size, self._pos = store, key, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:
        end = min(self._size, self._pos + len(buffer))
        data = self._store.read_range(self._key, self._pos, end) if end > self._pos else b""
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)


def open_object(store: Storage, key: str, size: int, buffer: int = SCAN_BUFFER) -> io.BufferedReader:
    """A seekable, read-only file over a bucket object of `size` bytes: ranged GETs through a
    read-ahead buffer (a zip member, a parquet footer or a line is read without the rest)."""
    return io.BufferedReader(_RangeRaw(store, key, size), buffer)


def open_bytes(f: CorpusFile, remote: Remote | None, buffer: int = SCAN_BUFFER) -> io.BufferedReader:
    """The stored bytes of `f`: its local file, or (remote) the object through open_object."""
    if remote is not None and is_remote(f):
        return open_object(*split_url(f.url, remote.storage), f.size, buffer)
    return open(f.local or f.url, "rb", buffering=buffer)


def parquet_ranges(f: CorpusFile, remote: Remote, row_groups: tuple[int, int] | None) -> list[tuple[int, int]]:
    """The byte ranges a reader of row groups [first, last) of a parquet object touches: the magic
    at its start, the footer, and the span of those row groups' column chunks (the whole object
    when its metadata cannot be read: the reader then names the file as corrupt)."""
    import pyarrow.parquet as pq

    try:
        with open_bytes(f, remote) as fh:
            meta = pq.ParquetFile(fh).metadata
            fh.seek(f.size - 8)
            footer = int.from_bytes(fh.read(4), "little") + 8
    except Exception:  # noqa: BLE001 - a corrupt object: read whole, the reader reports it
        return [(0, f.size)]
    first, last = row_groups or (0, meta.num_row_groups)
    starts, ends = [], []
    for g in range(first, last):
        rg = meta.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            start = col.data_page_offset
            if col.has_dictionary_page and col.dictionary_page_offset:  # some writers leave it 0
                start = min(start, col.dictionary_page_offset)
            starts.append(start)
            ends.append(start + col.total_compressed_size)
    spans = [(0, 4), (f.size - footer, f.size)]
    return spans + ([(min(starts), max(ends))] if starts else [])


def _copy_path(f: CorpusFile, remote: Remote) -> Path:
    name = hashlib.sha256(f"{f.url}|{f.etag}".encode()).hexdigest()[:16]
    return remote.scratch / f"{name}.{os.getpid()}.{f.name}"


def fetch_ranges(f: CorpusFile, remote: Remote, ranges: list[tuple[int, int]], into: Path | None = None) -> CorpusFile:
    """`f` with `local` set to a sparse copy holding `ranges` of the object at their offsets (added
    to `into`, an earlier copy, when given)."""
    path = into or _copy_path(f, remote)
    path.parent.mkdir(parents=True, exist_ok=True)
    store, key = split_url(f.url, remote.storage)
    try:
        with open(path, "r+b" if into else "wb") as fh:
            fh.truncate(f.size)  # a sparse file: only what is written below takes disk
            for a, b in ranges:
                for at in range(max(0, a), min(b, f.size), FETCH_CHUNK):
                    fh.seek(at)
                    fh.write(store.read_range(key, at, min(b, f.size, at + FETCH_CHUNK)))
    except BaseException:  # a read that failed (StorageError naming the URL) or a signal: no partial copy
        path.unlink(missing_ok=True)
        raise
    return replace(f, local=str(path))


@contextlib.contextmanager
def local_part(f: CorpusFile, remote: Remote | None, ranges: list[tuple[int, int]] | None = None):
    """`f` readable locally for the ranges (default: all of it) while the block runs: a local file
    as it is, an S3 object as a sparse copy that is deleted afterwards."""
    if remote is None or not is_remote(f):
        yield f
        return
    part = fetch_ranges(f, remote, ranges if ranges is not None else [(0, f.size)])
    try:
        yield part
    finally:
        Path(part.local).unlink(missing_ok=True)


def disk_bytes(path: Path) -> int:
    """Bytes the files under `path` take on disk (allocated blocks: a sparse copy counts what it
    holds, not its size); for measuring prepare's local working set."""
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, name)).st_blocks * 512
    return total
