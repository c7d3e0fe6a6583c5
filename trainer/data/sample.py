"""The tokenizer's sample, read from a bounded, evenly spread part of the corpus.

Reading the whole corpus to keep `tokenizer.sample_bytes` of it costs time in proportion to the
corpus (42 s for 589 MB, hours at 100 GB: issue 22). Here what is read is planned up front from the
listing alone (names, sizes, ETags) and a seed, so every machine and every rerun reads the same:
  * the budget is OVERSAMPLE x sample_bytes, so that held-out documents, the data.* filters and the
    hash sample (tokenizer.sample_documents keeps the smallest hashes of what it is given) still
    fill the sample;
  * a corpus of at most the budget (bytes as stored) is read whole, as before: the same sample and
    the same tokenizer hash (sample_key is "");
  * otherwise the budget is cut into WINDOW_BYTES windows laid at evenly spaced points (systematic
    sampling, seeded start) over the files concatenated in a seeded order: a file gets windows in
    proportion to its stored size, and a corpus of more files than windows is read in a seeded
    subset of them;
  * an uncompressed .jsonl / .txt file is read at its windows: each starts at the first record
    boundary at or after its offset (the start of a line; for .txt the line after a blank one) and
    ends at the first at or after its end, so every document is a whole record and windows that
    meet neither overlap nor leave a gap. A parquet file reads the row groups its windows fall in,
    each for its windows' bytes of text. A compressed file, a .json file and a `datasets` source
    cannot be entered in the middle: each is read from its start for its windows' bytes of text and
    closed there (the stream is not decompressed further).
Stored bytes place the windows, text bytes end the reads that cannot seek: a compressed file gets
windows for its compressed size, so in a corpus that mixes compressed and plain files the
compressed ones weigh less than their text. Validation documents are set aside by the caller
(tokenizer.train_from_corpus), by the same hash rule as before, so they stay out of the sample.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from trainer.config import DataConfig
from trainer.data.readers import DocumentReader, iter_documents, no_documents
from trainer.data.remote import Remote, fetch_ranges, is_remote, local_part, open_bytes, parquet_ranges
from trainer.data.sources import CorpusFile, DataError, file_kind
from trainer.data.streams import lines_before

SAMPLE_VERSION = "spread-v1"  # bump when the plan or how a window is read changes (part of the tokenizer hash)
SAMPLE_SEED = 0  # the job's seed for the plan: a constant, so train.seed sweeps share one tokenizer
OVERSAMPLE = 2  # read this many times tokenizer.sample_bytes
WINDOW_BYTES = 256 << 10  # one read: a few hundred documents of web text, a thousand poems
SEEKABLE = {("jsonl", ""), ("txt", "")}  # read at byte offsets; everything else from its start


@dataclass(frozen=True)
class FileRead:
    """What the sample reads of one file: its windows, as (start, end) byte offsets of the file as
    stored (sorted, merged), and `share`, the bytes the windows add up to (a stream is read for
    that many bytes of text from its start)."""

    file: CorpusFile
    windows: tuple[tuple[int, int], ...]
    share: int

    @property
    def whole(self) -> bool:
        return self.share >= self.file.size > 0


def _rank(seed: int, text: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}|{text}".encode(), digest_size=8).digest(), "little")


def _weight(f: CorpusFile, budget_bytes: int) -> int:
    """Stored bytes; a Hub dataset has no size in the listing and weighs a budget."""
    return f.size or (budget_bytes if f.dataset is not None else 0)


def plan_reads(files: list[CorpusFile], budget_bytes: int, seed: int = SAMPLE_SEED,
               window_bytes: int | None = None) -> list[FileRead] | None:
    """The reads of a sample of about budget_bytes, in reading order; None when the corpus is at
    most the budget and is read whole. Depends on the files' names, sizes and ETags (not paths or
    listing order), the budget, the seed and window_bytes (default WINDOW_BYTES) only."""
    window_bytes = window_bytes or WINDOW_BYTES
    total = sum(_weight(f, budget_bytes) for f in files)
    if total <= budget_bytes:
        return None
    n = -(-budget_bytes // window_bytes)
    start = _rank(seed, "start") % total  # window k begins at (k * total + start) // n
    order = sorted(files, key=lambda f: (_rank(seed, f"{f.name}|{f.size}|{f.etag}"), f.url))
    reads, k, base = [], 0, 0  # base: where the file begins in the concatenation
    for f in order:
        size = _weight(f, budget_bytes)
        offsets = []
        while k < n and (k * total + start) // n < base + size:
            offsets.append((k * total + start) // n - base)
            k += 1
        base += size
        if offsets:
            share = min(size, len(offsets) * window_bytes)
            reads.append(FileRead(f, _merged([(o, min(o + window_bytes, size)) for o in offsets], share, size),
                                  share))
    return reads


def _merged(windows: list[tuple[int, int]], share: int, size: int) -> tuple[tuple[int, int], ...]:
    if share >= size:
        return ((0, size),)
    out: list[list[int]] = []
    for a, b in sorted(windows):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


def sample_key(files: list[CorpusFile], sample_bytes: int, seed: int = SAMPLE_SEED) -> str:
    """What the tokenizer hash adds for how the sample is read: "" for a corpus read whole (the
    hash of every tokenizer trained before the spread read existed), else the plan's version and
    parameters."""
    if plan_reads(files, OVERSAMPLE * sample_bytes, seed) is None:
        return ""
    return f"{SAMPLE_VERSION} seed={seed} oversample={OVERSAMPLE} window={WINDOW_BYTES}"


def record_start(fh, offset: int, size: int, blank_line: bool) -> int:
    """The first record boundary at or after `offset` of an uncompressed file open as `fh`: the
    start of a line (blank_line: of a line after a line of ASCII whitespace only, where a .txt
    document ends); `size` at the end. The rule of trainer/data/units.py's cuts, so both agree."""
    if offset <= 0:
        return 0
    if offset >= size:
        return size
    fh.seek(offset - 1)
    fh.readline()  # to the start of the line at or after offset (the byte before may be \n)
    while blank_line and (line := fh.readline()) and line.strip():
        pass
    return min(fh.tell(), size)


def record_ranges(read: FileRead, blank_line: bool, remote: Remote | None = None) -> list[tuple[int, int]]:
    """read.windows moved to record boundaries (record_start), empty ones dropped."""
    f = read.file
    with open_bytes(f, remote, 1 << 12) as fh:  # a small buffer: a scan reads a line or two
        ranges = [(record_start(fh, a, f.size, blank_line), record_start(fh, b, f.size, blank_line))
                  for a, b in read.windows]
    return [(a, b) for a, b in ranges if a < b]


def first_record(read: FileRead, blank_line: bool, remote: Remote | None = None) -> list[tuple[int, int]]:
    """The byte range of the file's first record, for a read whose every window lies inside one
    record longer than itself (a file of one 50 MB line): the file gives a document, not none."""
    f = read.file
    with open_bytes(f, remote, 1 << 12) as fh:
        end = record_start(fh, 1, f.size, blank_line)
    return [(0, end)] if end > 0 else []


def _head(docs: Iterator[str], limit: int) -> Iterator[str]:
    """`docs` until they add up to `limit` bytes of UTF-8 (the one that reaches it included); the
    rest is never read (the generator, and the file under it, is closed)."""
    n = 0
    for text in docs:
        yield text
        n += len(text.encode("utf-8"))
        if n >= limit:
            break
    close = getattr(docs, "close", None)
    if close:
        close()


def _row_groups(read: FileRead, remote: Remote | None = None) -> dict[int, int] | None:
    """Row group -> bytes of text to read from it (its windows'), or None when the file cannot be opened."""
    import pyarrow.parquet as pq

    f = read.file
    try:
        with open_bytes(f, remote) as fh:
            groups = pq.ParquetFile(fh).metadata.num_row_groups
    except Exception:  # noqa: BLE001 - a corrupt file: the reader names it
        return None
    out: dict[int, int] = {}
    for a, b in read.windows:
        for at in range(a, b, WINDOW_BYTES):
            g = min(groups - 1, at * groups // f.size)
            out[g] = out.get(g, 0) + min(WINDOW_BYTES, b - at)
    return dict(sorted(out.items()))


def iter_read(reader: DocumentReader, read: FileRead, remote: Remote | None = None) -> Iterator[str]:
    """The documents one FileRead takes, through `reader` (data.on_error, skip counts). An S3
    object (remote) is read from a sparse local copy of the bytes it needs (trainer/data/remote.py:
    the windows' records, the row groups' column chunks; a stream is fetched whole), deleted after."""
    f = read.file
    kind = file_kind(f.name) or file_kind(f.local or f.url)
    if read.whole and f.dataset is None:
        with local_part(f, remote) as part:
            yield from reader.iter_file(part)
    elif f.dataset is None and kind in SEEKABLE:
        blank = kind[0] == "txt"
        ranges = record_ranges(read, blank, remote) or first_record(read, blank, remote)
        with local_part(f, remote, ranges) as part:
            yield from _ranges(reader, part, ranges, remote if is_remote(f) else None, f)
    elif f.dataset is None and kind is not None and kind[0] == "parquet":
        groups = _row_groups(read, remote)
        if groups is None:
            with local_part(f, remote) as part:
                yield from reader.iter_file(part)
            return
        for g, limit in groups.items():
            with local_part(f, remote, parquet_ranges(f, remote, (g, g + 1)) if is_remote(f) else None) as part:
                yield from _head(reader.iter_file(part, row_groups=(g, g + 1)), limit)
    else:
        with local_part(f, remote) as part:
            yield from _head(reader.iter_file(part), read.share)


def _ranges(reader: DocumentReader, part: CorpusFile, ranges, remote: Remote | None, f: CorpusFile) -> Iterator[str]:
    for a, b in ranges:
        try:
            yield from reader.iter_file(part, byte_range=(a, b))
        except DataError:
            if a == 0:
                raise
            # A range counts lines from its start; only on this fatal path are the lines before
            # it counted, so that the error names the line of the file (the rerun raises it).
            if remote is not None:
                fetch_ranges(f, remote, [(0, a)], into=Path(part.local))
            list(reader.iter_file(part, byte_range=(a, b), line_base=lines_before(part.local or part.url, a)))
            raise


def read_sample(cfg: DataConfig, files: list[CorpusFile], sample_bytes: int, reader: DocumentReader | None = None,
                seed: int = SAMPLE_SEED, remote: Remote | None = None) -> Iterator[str]:
    """The documents to draw a tokenizer sample of sample_bytes from: the whole corpus when it is at
    most OVERSAMPLE x sample_bytes (iter_documents), else the spread read of plan_reads. S3 objects
    left in the bucket (remote) are read in parts. Raises DataError, with the counts of what was
    skipped, when what it reads holds no document."""
    reader = reader or DocumentReader(cfg)
    plan = plan_reads(files, OVERSAMPLE * sample_bytes, seed)
    if plan is None and remote is None:
        yield from iter_documents(cfg, files, reader)
        return
    n = 0
    if plan is None:  # read whole, from the bucket: one object's copy at a time
        for f in files:
            with local_part(f, remote) as part:
                for text in reader.iter_file(part):
                    n += 1
                    yield text
    else:
        for read in plan:
            for text in iter_read(reader, read, remote):
                n += 1
                yield text
    if not n:
        raise no_documents(cfg, [r.file for r in plan] if plan else files, reader.skipped)


def describe_read(files: list[CorpusFile], sample_bytes: int, seed: int = SAMPLE_SEED) -> dict:
    """For the tokenizer's report: how the sample was read."""
    budget = OVERSAMPLE * sample_bytes
    plan = plan_reads(files, budget, seed)
    if plan is None:
        return {"mode": "whole corpus", "files": len(files), "files_read": len(files)}
    return {"mode": "spread", "version": SAMPLE_VERSION, "seed": seed, "budget_bytes": budget,
            "window_bytes": WINDOW_BYTES, "files": len(files), "files_read": len(plan),
            "windows": sum(len(r.windows) for r in plan), "planned_bytes": sum(r.share for r in plan)}
