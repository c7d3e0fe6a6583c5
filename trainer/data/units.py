"""Prepare's work units: the corpus listing cut into parts that worker processes tokenize alone.

A unit is a whole file, a byte range of a large uncompressed .jsonl or .txt file (cut right after a
newline; .txt after a blank line, so no document is split), a run of row groups of a large
parquet file, or a range of a large compressed .jsonl file's decompressed bytes (cut after a newline
the same way). A compressed stream cannot be entered in the middle, so each such unit decompresses
the file from its start and tokenizes only its own range: zstd decompression runs 107 M chars/s on
one core against 1.47 M chars/s of encoding (bench/RESULTS.md, a worker's time by stage), so a file
of n units spends about n/2 / 73 of its encoding time again on decompression (22% at the cap of 32
units) while its units run on up to 32 cores instead of one. From an S3 bucket such a unit streams the object through
ranged GETs (nothing on local disk), reading the object's bytes up to its range's end. Other
compressed files and `datasets` sources are one unit each. The plan
depends on the listing and UNIT_BYTES only, never on the worker count, and
its order (listing order, then position in the file) is the order of the documents in the shards.

A unit file, `unit-<n>.npz` under the prepare scratch folder, holds the unit's documents after the
length filters and before dedup: `tokens` (each document's ids followed by the document separator),
`offsets` (n_docs + 1 token offsets into tokens), `hashes` (uint64 doc_hash), `chars` (characters + 1
per document, as index.json counts them) and `val` (1 = validation document). It is written under a
temporary name and renamed; `unit-<n>.done.json` (the unit's counts) is written after it, the same
way, and marks the unit done: a rerun after a crash reuses every unit that has one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from trainer.config import DataConfig
from trainer.data.readers import DocumentReader
from trainer.data.remote import Remote, fetch_ranges, is_remote, open_bytes, parquet_ranges
from trainer.data.shards import BATCH_DOCS, Normalizer, encode_documents
from trainer.data.sources import CorpusFile, DataError, file_kind
from trainer.data.streams import lines_before

UNIT_BYTES = 64 << 20  # input bytes per unit: ~1-3 s of one core, small enough to balance and to redo after a kill
SPLITTABLE = {("jsonl", ""), ("txt", "")}  # formats cut by byte range
STREAMS = {("jsonl", c) for c in ("gz", "zst", "bz2", "xz")}  # cut in their decompressed bytes
# Decompressed bytes per stored byte assumed when planning a compressed file's units (the plan must
# come from the listing alone, before anything is decompressed): text under gzip/zstd defaults
# shrinks 3-5x (the poetry corpus: 589 MB in 263 MB of zst, 2.2x). Guessing low leaves more in the
# last unit (it runs to the end); guessing high leaves trailing units empty.
STREAM_RATIO = 4
# Each unit of a compressed file decompresses it from its start (on average half the file), so a
# file gets at most this many: decompression then costs up to ~22% of its encoding (module docstring).
MAX_STREAM_UNITS = 32
STREAM_GET_BYTES = 8 << 20  # one ranged GET per 8 MB of a compressed S3 object a stream unit reads


@dataclass(frozen=True)
class Unit:
    file: int  # position of the file in the corpus listing
    kind: str = "file"  # file | bytes (start, end: byte offsets) | row_groups (start, end: row group numbers)
    # | stream (start, end: decompressed byte offsets; end 0: to the stream's end)
    start: int = 0
    end: int = 0
    size: int = 0  # input bytes, for progress and ETA

    def reader_args(self) -> dict:
        if self.kind == "bytes":
            return {"byte_range": (self.start, self.end)}
        if self.kind == "row_groups":
            return {"row_groups": (self.start, self.end)}
        if self.kind == "stream":
            return {"stream_range": (self.start, self.end or None)}
        return {}


def plan_units(files: list[CorpusFile], unit_bytes: int | None = None, remote: Remote | None = None) -> list[Unit]:
    """The units of a pulled listing, in document order: every file readable locally, or (remote
    given) S3 objects left in the bucket, whose cuts are found with ranged reads. Files are cut only
    where they are larger than unit_bytes (default UNIT_BYTES); a parquet file that cannot be
    opened stays one unit, so that the reader reports it. The plan depends on the files' bytes
    only, so every node computes the same one."""
    unit_bytes = unit_bytes or UNIT_BYTES
    units: list[Unit] = []
    for i, f in enumerate(files):
        kind = file_kind(f.name) or file_kind(f.local or f.url)
        if f.dataset is None and kind in SPLITTABLE and f.size > unit_bytes:
            with open_bytes(f, remote, 1 << 12) as fh:  # a small buffer: each cut reads a line or two
                cuts = _byte_cuts(fh, f.size, unit_bytes, blank_line=kind[0] == "txt")
            units += [Unit(i, "bytes", a, b, b - a) for a, b in zip(cuts, cuts[1:])]
        elif f.dataset is None and kind and kind[0] == "parquet" and f.size > unit_bytes:
            units += _row_group_units(i, f, unit_bytes, remote)
        elif f.dataset is None and kind in STREAMS and f.size * STREAM_RATIO > unit_bytes:
            units += _stream_units(i, f.size, unit_bytes)
        else:
            units.append(Unit(i, size=f.size))
    return units


def _byte_cuts(fh, size: int, unit_bytes: int, blank_line: bool) -> list[int]:
    """[0, cut, ..., size] of the file open as `fh`: each cut is the start of a line (blank_line: of
    a line after a line of ASCII whitespace only, which ends a .txt document) at or after a multiple
    of about unit_bytes."""
    cuts = [0]
    while cuts[-1] + unit_bytes < size:
        fh.seek(cuts[-1] + unit_bytes - 1)
        fh.readline()  # to the start of the line at or after the target (the byte before may be \n)
        while blank_line and (line := fh.readline()) and line.strip():
            pass
        if fh.tell() >= size:
            break
        cuts.append(fh.tell())
    return cuts + [size]


def _stream_units(file: int, size: int, unit_bytes: int) -> list[Unit]:
    """Equal ranges of a compressed file's estimated decompressed bytes (size x STREAM_RATIO), about
    unit_bytes each and at most MAX_STREAM_UNITS; the last runs to the stream's end."""
    n = min(MAX_STREAM_UNITS, -(-size * STREAM_RATIO // unit_bytes))
    width = -(-size * STREAM_RATIO // n)
    return [Unit(file, "stream", k * width, (k + 1) * width if k < n - 1 else 0, size // n) for k in range(n)]


def _row_group_units(file: int, f: CorpusFile, unit_bytes: int, remote: Remote | None) -> list[Unit]:
    import pyarrow.parquet as pq

    size = f.size
    try:
        with open_bytes(f, remote) as fh:
            meta = pq.ParquetFile(fh).metadata
    except Exception:  # noqa: BLE001 - a corrupt file: the reader names it when it reads the unit
        return [Unit(file, size=size)]
    units, first, acc = [], 0, 0
    for g in range(meta.num_row_groups):
        acc += meta.row_group(g).total_byte_size
        if acc >= unit_bytes or g == meta.num_row_groups - 1:
            units.append(Unit(file, "row_groups", first, g + 1, acc))
            first, acc = g + 1, 0
    return units or [Unit(file, size=size)]


def plan_fingerprint(files: list[CorpusFile], units: list[Unit]) -> str:
    """Identifies a plan (the listing's content and the cuts), not where the files lie."""
    rows = [[files[u.file].name, files[u.file].etag, u.kind, u.start, u.end] for u in units]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM: since its exec, unlike ru_maxrss, which
    keeps the high-water mark of the process that forked it); 0 where /proc is missing."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    line = next((x for x in status.splitlines() if x.startswith("VmHWM:")), "VmHWM: 0 kB")
    return int(line.split()[1]) * 1024


def unit_path(scratch: Path, n: int) -> Path:
    return Path(scratch) / f"unit-{n:06d}.npz"


def done_path(scratch: Path, n: int) -> Path:
    return Path(scratch) / f"unit-{n:06d}.done.json"


def read_done(scratch: Path, n: int) -> dict | None:
    """The counts of a finished unit, None when it is not done (its marker is missing or torn)."""
    try:
        stats = json.loads(done_path(scratch, n).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return stats if unit_path(scratch, n).is_file() else None


def _publish(path: Path, write) -> None:
    """write(file) to a temporary name beside `path`, flush to disk, rename: `path` is whole or absent."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def unit_ranges(f: CorpusFile, unit: Unit, remote: Remote) -> list[tuple[int, int]]:
    """The bytes of the object `f` that reading `unit` touches (trainer/data/remote.py)."""
    if unit.kind == "bytes":
        return [(unit.start, unit.end)]
    if unit.kind == "row_groups":
        return parquet_ranges(f, remote, (unit.start, unit.end))
    return [(0, f.size)]


def encode_unit(cfg: DataConfig, f: CorpusFile, unit: Unit, n: int, backend, eos: int, dtype: np.dtype,
                scratch: Path, remote: Remote | None = None) -> dict:
    """Read, normalise (no dedup: that is global) and tokenize unit `n`, write its unit file and
    done marker; return the counts (also in the marker). An S3 object (remote) is read from a
    sparse local copy of the unit's bytes, fetched just before and deleted after; a stream unit of
    one reads the object through ranged GETs instead (its end is not known). Raises DataError
    naming the file and line of a bad record under data.on_error=fail (line numbers of the file,
    not of the unit)."""
    in_bucket = remote is not None and is_remote(f)
    streamed = in_bucket and unit.kind == "stream"  # read from the object's start: ranged GETs, not a copy
    part = fetch_ranges(f, remote, unit_ranges(f, unit, remote)) if in_bucket and not streamed else f
    try:
        try:
            with open_bytes(f, remote, STREAM_GET_BYTES) if streamed else nullcontext() as source:
                arrays, stats = _encode(cfg, part, unit, backend, eos, dtype, source=source)
        except DataError:
            if unit.kind != "bytes" or unit.start == 0:
                raise
            # Lines of a byte range count from its start; only on this fatal path is the part of the file
            # before it read, to name the line of the file: the rerun raises the same error, numbered so.
            if part is not f:
                fetch_ranges(f, remote, [(0, unit.start)], into=Path(part.local))
            _encode(cfg, part, unit, backend, eos, dtype, lines_before(part.local or part.url, unit.start))
            raise
    finally:
        if part is not f:
            Path(part.local).unlink(missing_ok=True)
    _publish(unit_path(scratch, n), lambda fh: np.savez(fh, **arrays))
    _publish(done_path(scratch, n), lambda fh: fh.write(json.dumps(stats).encode()))
    return stats


def _encode(cfg: DataConfig, f: CorpusFile, unit: Unit, backend, eos: int, dtype: np.dtype,
            line_base: int = 0, source=None) -> tuple[dict, dict]:
    reader = DocumentReader(cfg)
    norm = Normalizer(dataclasses.replace(cfg, dedup=False))
    docs = reader.iter_file(f, line_base=line_base, source=source, **unit.reader_args())
    parts, lengths, hashes, chars = [], [], [], []
    for texts, batch_hashes in norm.batches(docs, BATCH_DOCS):
        ids = encode_documents(backend, texts)
        n_tokens = sum(map(len, ids)) + len(ids)
        parts.append(np.fromiter(chain.from_iterable(chain(doc, (eos,)) for doc in ids), dtype, n_tokens))
        lengths += [len(doc) + 1 for doc in ids]
        hashes += batch_hashes
        chars += [len(t) + 1 for t in texts]
    h = np.array(hashes, dtype=np.uint64)
    arrays = {"tokens": np.concatenate(parts) if parts else np.zeros(0, dtype),
              "offsets": np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64),
              "hashes": h, "chars": np.array(chars, dtype=np.int64),
              "val": (h % np.uint64(1000) < np.uint64(cfg.val_permille)).astype(np.uint8)}
    filters = Counter(norm.counts)
    filters.pop("documents_kept", None)  # decided after the global dedup
    stats = {"filters": dict(filters), "skipped": dict(reader.skipped), "documents": len(hashes),
             "chars": int(sum(chars)), "bytes": unit.size, "worker_pid": os.getpid(),
             "worker_peak_rss_bytes": peak_rss_bytes()}
    return arrays, stats
