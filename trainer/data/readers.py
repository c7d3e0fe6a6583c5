"""Reading documents out of corpus files (resolved by trainer/data/sources.py).

Formats (by file name, any letter case): .jsonl / .ndjson (one JSON object per line, text in
`data.text_field`), .json (one JSON array of such objects, read a record at a time, or JSON Lines),
.parquet (column `data.text_field`), .txt (documents separated by blank lines); all but parquet
optionally compressed as .gz, .zst (.zstd), .bz2 or .xz.

Every reader strips a UTF-8 byte-order mark and turns CRLF and CR line ends into LF, inside JSON and
parquet text too. Prepare reads a large file in parts (trainer/data/units.py): a byte range of an
uncompressed .jsonl or .txt, a run of row groups of a parquet file, a range of a compressed .jsonl's
decompressed bytes (the byte streams: trainer/data/streams.py); the documents of the parts, in
order, are those of the whole file. Errors name the file and line (or array index, or parquet row); with
`data.on_error: skip` the bad record (or the unreadable rest of a corrupt file) is skipped and counted
instead. Text that is not valid Unicode (bytes that are not UTF-8, an unpaired surrogate escape such
as "\\ud83d" in JSON) is a bad record like any other. Hugging Face `datasets` sources are read row by
row through trainer/data/hf_datasets.py, a bad row named by the source and its index in the split.
"""

from __future__ import annotations

import io
import json
import lzma
import os
import re
import zlib
from collections import Counter
from typing import Iterator

from trainer.config import DataConfig
from trainer.data.hf_datasets import DatasetSourceError, MissingColumn, iter_column
from trainer.data.sources import SUPPORTED, CorpusFile, DataError, file_kind
from trainer.data.streams import ByteRange, StreamCut, lines, open_binary


def clean_text(text: str) -> str:
    """A document without a leading byte-order mark, with CRLF and CR line ends made LF."""
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_NON_SPACE = re.compile(r"[^ \t\n\r]")


def lone_surrogate(record) -> str | None:
    """'U+D83D' for the first unpaired surrogate in any string of a parsed JSON record, else None.
    json.loads joins an escaped pair into one character but keeps a lone "\\ud83d" as is, and such a
    string cannot be encoded as UTF-8 (the tokenizer would raise UnicodeEncodeError)."""
    m = _SURROGATE.search(json.dumps(record, ensure_ascii=False))
    return f"U+{ord(m.group()):04X}" if m else None


class JSONArrayError(ValueError):
    """Where a stream stops being one JSON array; `line` is 1-based."""

    def __init__(self, line: int, msg: str):
        super().__init__(f"line {line}: {msg}")
        self.line, self.msg = line, msg


def iter_json_array(text: io.TextIOBase, head: str = "", chunk_chars: int = 1 << 20
                    ) -> Iterator[tuple[int, int, object, str]]:
    """(line, index, value, source text) of each element of the one JSON array that `head` + the
    rest of `text` hold, decoded an element at a time with json.JSONDecoder.raw_decode: memory is
    about twice the largest element plus a read buffer, whatever the file size. Raises
    JSONArrayError naming the line where the text stops being a JSON array (nothing after that
    point can be found reliably). `datasets` reads such a file with one json.load; this streams."""
    decoder = json.JSONDecoder()
    buf, pos, line, eof = head, 0, 1, False

    def more() -> bool:
        nonlocal buf, pos, eof
        chunk = text.read(max(chunk_chars, len(buf) - pos))  # doubles while one element is pending
        buf, pos, eof = buf[pos:] + chunk, 0, not chunk
        return bool(chunk)

    def next_char() -> str:  # the next non-space character ("" at the end), at buf[pos]
        nonlocal pos, line
        while True:
            m = _NON_SPACE.search(buf, pos)
            if m:
                line += buf.count("\n", pos, m.start())
                pos = m.start()
                return buf[pos]
            line += buf.count("\n", pos)
            pos = len(buf)
            if not more():
                return ""

    def incomplete(e: json.JSONDecodeError) -> bool:  # the error may be where the buffer ends
        return e.pos >= len(buf) - 6 or e.msg.startswith("Unterminated string")

    if next_char() != "[":
        raise JSONArrayError(line, "not a JSON array")
    pos += 1
    index, c = 0, next_char()
    while c != "]":
        if index and c != ",":
            raise JSONArrayError(line, f"expected ',' or ']' after array index {index - 1}")
        if index:
            pos += 1
            next_char()
        while True:  # decode the element at pos, reading more while it may continue past the buffer
            try:
                value, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if eof or not incomplete(e):
                    raise JSONArrayError(line + buf.count("\n", pos, e.pos), e.msg) from None
            else:
                if end < len(buf) or eof:
                    break
            more()
        yield line, index, value, buf[pos:end]
        line += buf.count("\n", pos, end)
        pos, index = end, index + 1
        c = next_char()
        if not c:
            raise JSONArrayError(line, "the file ends inside the array")
    pos += 1
    if next_char():
        raise JSONArrayError(line, "more data after the array")


class DocumentReader:
    """Iterates documents of corpus files, applying data.on_error; `skipped` counts what was dropped."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.skipped: Counter = Counter()  # reason -> records skipped
        self.line_base = 0  # lines before the part being read (error messages name file lines)
        self._byte_range: tuple[int, int] | None = None
        self._row_groups: tuple[int, int] | None = None
        self._stream_range: tuple[int, int | None] | None = None
        self._source = None

    def _bad(self, where: str, reason: str, detail: str, fix: str = "set data.on_error=skip to skip such records"):
        if self.cfg.on_error == "fail":
            raise DataError(f"{where}: {detail} ({fix})")
        self.skipped[reason] += 1

    def iter_file(self, f: CorpusFile, byte_range: tuple[int, int] | None = None,
                  row_groups: tuple[int, int] | None = None, line_base: int = 0,
                  stream_range: tuple[int, int | None] | None = None, source=None) -> Iterator[str]:
        """The documents of `f`, or of one part of it: `byte_range` (start, end) of an uncompressed
        .jsonl or .txt file, cut where a line (.txt: a blank line) ends, the parquet `row_groups`
        [first, last), or `stream_range` (start, end or None) of a compressed .jsonl file's
        decompressed bytes, cut the same way (the lines before it are counted: line numbers stay the
        file's). `line_base`: lines before byte_range's start, for the line numbers of error
        messages (0 counts them from the range's start). `source`: with stream_range, a binary
        file object of the stored bytes (an S3 object read by range) instead of the local file."""
        self._byte_range, self._row_groups, self.line_base = byte_range, row_groups, line_base
        self._stream_range, self._source = stream_range, source if stream_range is not None else None
        if f.dataset is not None:
            yield from self._dataset(f)
            return
        path = f.local or f.url
        kind = file_kind(f.name) or file_kind(path)
        if kind is None:
            self._bad(f.url, "unsupported file type", f"not a corpus file type (supported: {SUPPORTED})")
            return
        fmt, compression = kind
        if f.size == 0 or (self._source is None and os.path.getsize(path) == 0):
            self._bad(f.url, "empty file", "empty file")
            return
        self._lines_read = line_base  # where a corrupt stream broke off, for the message
        try:
            if fmt == "parquet":
                yield from self._parquet(f, path)
            elif fmt == "txt":
                yield from self._txt(f, path, compression)
            elif fmt == "json":
                yield from self._json(f, path, compression)
            else:
                yield from self._jsonl(f, path, compression)
        except DataError:
            raise
        except (EOFError, OSError, ValueError, zlib.error, lzma.LZMAError) as e:  # corrupt or truncated stream
            after = f" after line {self._lines_read}" if fmt != "parquet" else ""
            self._bad(f.url, "unreadable file", f"cannot read{after} ({type(e).__name__}: {e}); the file is corrupt "
                                                f"or truncated")

    field_key, missing_reason = "data.text_field", "missing text field"  # what _dataset names a missing column

    def _dataset(self, f: CorpusFile) -> Iterator:
        """The rows of a `datasets` source, each checked as a parsed record (`_checked`). A source
        that `datasets` cannot open, or without a train split, is a DataError whatever data.on_error
        says (like a source that matches no file); a missing column, no rows or a corrupt local file
        is a bad source. Errors while streaming from the Hub propagate (exit 1: retrying may help)."""
        field, index = self.cfg.text_field, -1
        try:
            for index, value in iter_column(f.dataset, field):
                yield from self._checked(f"{f.url} (train split, index {index})", {field: value})
        except MissingColumn as e:
            self._bad(f.url, self.missing_reason, f"no column '{field}' ({self.field_key}); columns: {e.columns}")
            return
        except DatasetSourceError as e:
            raise DataError(str(e)) from None
        except DataError:
            raise
        except (OSError, ValueError) as e:  # a corrupt local file; from the Hub (network) retrying may help
            if f.dataset.layout == "hub":
                raise
            self._bad(f.url, "unreadable file", f"cannot read after index {index} ({type(e).__name__}: "
                                                f"{' '.join(str(e).split())[:300]}); a file of it is corrupt")
            return
        if index < 0:
            self._bad(f.url, "empty dataset", "the train split has no rows")

    def _open(self, path: str, compression: str) -> io.BufferedIOBase:
        if self._stream_range is not None:
            cut = StreamCut(open_binary(self._source or path, compression), *self._stream_range)
            self.line_base = self._lines_read = cut.lines_skipped
            return io.BufferedReader(cut, 1 << 20)
        if self._byte_range is None:
            return open_binary(path, compression)
        return io.BufferedReader(ByteRange(path, *self._byte_range), 1 << 20)

    def _decoded_lines(self, f: CorpusFile, fh) -> Iterator[tuple[int, str]]:
        """(line number, text) of each line that is valid UTF-8, without its line end or a BOM."""
        # a BOM only begins a file
        at_start = all(r is None or r[0] == 0 for r in (self._byte_range, self._stream_range))
        for line_no, raw in enumerate(lines(fh), self.line_base + 1):
            self._lines_read = line_no
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                self._bad(f"{f.url}:{line_no}", "invalid UTF-8", f"invalid UTF-8 ({e.reason} at byte {e.start})")
                continue
            yield line_no, line[1:] if at_start and line_no == 1 and line.startswith("\ufeff") else line

    def _jsonl(self, f: CorpusFile, path: str, compression: str | None = None, hint: str = "") -> Iterator:
        with self._open(path, compression) as fh:
            for line_no, line in self._decoded_lines(f, fh):
                if not line.strip():
                    continue
                where = f"{f.url}:{line_no}"
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    self._bad(where, "invalid JSON", f"invalid JSON: {e}" + (hint if line_no == 1 else ""))
                    continue
                if "\\u" in line and _SURROGATE_ESCAPE.search(line) and (bad := lone_surrogate(rec)):
                    self._bad(where, "invalid Unicode", f"invalid Unicode: an unpaired surrogate escape ({bad}) "
                                                        f"cannot be encoded as UTF-8")
                    continue
                yield from self._checked(where, rec)

    def _json(self, f: CorpusFile, path: str, compression: str) -> Iterator:
        """A .json file: one array of records if it starts with '[' (compact or pretty-printed),
        else JSON Lines, as `datasets` reads it."""
        # Undecodable bytes become lone surrogates (U+DC80-U+DCFF): they make their record bad, not the file.
        with io.TextIOWrapper(open_binary(path, compression), encoding="utf-8-sig", errors="surrogateescape",
                              newline="") as text:
            head = text.read(1 << 16)
            is_array = head.lstrip(" \t\r\n").startswith("[")
            if is_array:
                yield from self._json_array(f, text, head)
        if not is_array:
            yield from self._jsonl(f, path, compression,
                                   hint=" (a .json file holds JSON Lines or one JSON array of records)")

    def _json_array(self, f: CorpusFile, text: io.TextIOBase, head: str) -> Iterator:
        try:
            for line, index, rec, source in iter_json_array(text, head):
                self._lines_read = line
                where = f"{f.url}:{line} (array index {index})"
                if _SURROGATE.search(source):
                    self._bad(where, "invalid UTF-8", "invalid UTF-8 (bytes that are not UTF-8 in the record)")
                    continue
                if "\\u" in source and _SURROGATE_ESCAPE.search(source) and (bad := lone_surrogate(rec)):
                    self._bad(where, "invalid Unicode", f"invalid Unicode: an unpaired surrogate escape ({bad}) "
                                                        f"cannot be encoded as UTF-8")
                    continue
                yield from self._checked(where, rec)
        except JSONArrayError as e:
            self._bad(f"{f.url}:{e.line}", "invalid JSON", f"invalid JSON array: {e.msg}; the rest of the file "
                                                            f"is not read")

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
        yield clean_text(text)

    def _txt(self, f: CorpusFile, path: str, compression: str | None = None) -> Iterator[str]:
        with self._open(path, compression) as fh:
            lines: list[str] = []
            for _, line in self._decoded_lines(f, fh):
                if line.strip():
                    lines.append(line)
                elif lines:
                    yield "\n".join(lines)
                    lines = []
            if lines:
                yield "\n".join(lines)

    def _parquet(self, f: CorpusFile, path: str) -> Iterator[str]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        first, last = self._row_groups or (0, pf.metadata.num_row_groups)
        if self.cfg.text_field not in pf.schema_arrow.names:
            if first:  # the file's first part reports it, once
                return
            self._bad(f.url, "missing text field", f"no column '{self.cfg.text_field}' (data.text_field); columns: "
                      f"{pf.schema_arrow.names}", fix="set data.text_field to the column that holds the text")
            return
        row = sum(pf.metadata.row_group(i).num_rows for i in range(first))
        for batch in pf.iter_batches(columns=[self.cfg.text_field], batch_size=4096,
                                     row_groups=None if self._row_groups is None else list(range(first, last))):
            column = batch.column(0)
            try:
                texts = column.to_pylist()
            except UnicodeDecodeError:  # a string cell holding bytes that are not UTF-8: find it
                texts = [b.decode("utf-8", "surrogateescape") if isinstance(b, bytes) else b
                         for b in column.cast(pa.binary()).to_pylist()]
            for text in texts:
                row += 1
                if not isinstance(text, str):
                    self._bad(f"{f.url}:row {row}", "non-string text", f"'{self.cfg.text_field}' is not a string")
                    continue
                if _SURROGATE.search(text):
                    self._bad(f"{f.url}:row {row}", "invalid UTF-8", f"'{self.cfg.text_field}' holds bytes that "
                                                                     f"are not UTF-8")
                    continue
                yield clean_text(text)


def iter_documents(cfg: DataConfig, files: list[CorpusFile], reader: DocumentReader | None = None) -> Iterator[str]:
    """Every document of `files`, in order. Raises DataError, with the counts of what was skipped,
    when the files hold no document at all (every record bad under data.on_error=skip)."""
    reader = reader or DocumentReader(cfg)
    n = 0
    for f in files:
        for text in reader.iter_file(f):
            n += 1
            yield text
    if not n:
        raise no_documents(cfg, files, reader.skipped)


def no_documents(cfg: DataConfig, files: list[CorpusFile], skipped: dict) -> DataError:
    """The DataError for files that hold no document at all, with the counts of what was skipped."""
    why = ", ".join(f"{reason}: {k}" for reason, k in sorted(skipped.items())) or "nothing"
    shown = ", ".join(f.name for f in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    return DataError(f"data.sources: no document in {len(files)} corpus file(s) ({shown}); skipped {why} "
                     f"(data.on_error={cfg.on_error})")
