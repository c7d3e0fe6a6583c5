"""Byte streams of corpus files: decompression (gzip, zstd, bz2, xz), a byte range of an
uncompressed file, a range of a decompressed stream cut at line starts, and line splitting as the
readers count lines (LF, CRLF and a lone CR each end one). trainer/data/readers.py reads documents
out of them; trainer/data/units.py plans the ranges."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import zlib
from typing import Iterator

from trainer.data.sources import file_kind


class ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a .zst file of one or more frames. zstandard's stream_reader stops
    silently where a truncated file ends (dropping the rest of the corpus without a word); here a
    file that ends inside a frame raises EOFError, and corrupt data raises ValueError."""

    def __init__(self, path):
        import zstandard

        self._f = path if hasattr(path, "read") else open(path, "rb")  # a path or a binary file object
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


class ByteRange(io.RawIOBase):
    """Bytes [start, end) of an uncompressed file."""

    def __init__(self, path: str, start: int, end: int):
        self._f = open(path, "rb")
        self._f.seek(start)
        self._left = end - start

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = self._f.readinto(memoryview(buf)[: max(0, min(len(buf), self._left))])
        self._left -= n
        return n

    def close(self):
        if hasattr(self, "_f"):
            self._f.close()
        super().close()


def line_ends(chunk: bytes, after_cr: bool) -> int:
    """Line ends in `chunk` as lines() counts them (LF, CRLF, a lone CR); after_cr: the byte before
    the chunk was a CR (a CRLF split between chunks is one end)."""
    n = chunk.count(b"\n") + chunk.count(b"\r") - chunk.count(b"\r\n")
    return n - 1 if after_cr and chunk.startswith(b"\n") else n


class StreamCut(io.RawIOBase):
    """The lines of a decompressed stream `fh` that start in [start, end) of its decompressed bytes
    (end None: to the stream's end). The stream is read from its beginning and the bytes before the
    part discarded; the cuts are units.py's for an uncompressed file: the first line start at or
    after each offset. `lines_skipped` counts the lines before the part (error messages). A stream
    that breaks off (corrupt or truncated) before the part makes the part empty, not an error: the
    part whose lines hold the break reads it and reports it, once for the file."""

    def __init__(self, fh, start: int, end: int | None):
        self._fh, self._end, self._pending, self._done = fh, end, b"", False
        self.lines_skipped, self._pos = 0, 0
        try:
            self._skip(fh, start)
        except (EOFError, OSError, ValueError, zlib.error, lzma.LZMAError):
            self._done = True

    def _skip(self, fh, start: int) -> None:
        after_cr, left = False, max(0, start - 1)
        while left:
            chunk = fh.read(min(left, 1 << 20))
            if not chunk:
                self._done = True
                return
            self.lines_skipped += line_ends(chunk, after_cr)
            after_cr, left, self._pos = chunk.endswith(b"\r"), left - len(chunk), self._pos + len(chunk)
        if start > 0:
            rest = fh.readline()  # to the end of the line holding byte start - 1
            self.lines_skipped += line_ends(rest, after_cr)
            self._pos += len(rest)
            self._done = self._end is not None and self._pos >= self._end  # that line crossed the part

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if not self._pending and not self._done:
            if self._end is None or self._pos < self._end - 1:
                want = len(buf) if self._end is None else min(len(buf), self._end - 1 - self._pos)
                self._pending = self._fh.read1(want)  # one raw read: what precedes a break is kept
            else:
                self._pending, self._done = self._fh.readline(), True  # the line holding byte end - 1
            self._pos += len(self._pending)
            self._done = self._done or not self._pending
        n = min(len(buf), len(self._pending))
        buf[:n], self._pending = self._pending[:n], self._pending[n:]
        return n

    def close(self):
        self._fh.close()
        super().close()


def lines_before(path: str, offset: int) -> int:
    """How many lines (as the readers count them: LF, CRLF and a lone CR each end one) the first
    `offset` bytes of an uncompressed file hold. Reads them all: for naming the line of an error."""
    with io.BufferedReader(ByteRange(path, 0, offset), 1 << 20) as fh:
        return sum(1 for _ in lines(fh))


def open_binary(path, compression: str | None = None) -> io.BufferedIOBase:
    """The decompressed bytes of a corpus file, `path` a file name or a binary file object of its
    stored bytes (then `compression` is needed); `compression` as file_kind gives it (default: from
    the name). Closing the result closes a file object passed in (gzip, bz2 and lzma do not: the
    caller closes those)."""
    if hasattr(path, "read"):
        if compression == "gz":
            return gzip.GzipFile(fileobj=path, mode="rb")
        if compression == "zst":
            return io.BufferedReader(ZstdFrames(path), 1 << 20)
        if compression in ("bz2", "xz"):
            return (bz2.open if compression == "bz2" else lzma.open)(path, "rb")
        return path
    if compression is None:
        compression = (file_kind(path) or ("", ""))[1]
    if compression == "gz":
        return gzip.open(path, "rb")
    if compression == "zst":
        return io.BufferedReader(ZstdFrames(path), 1 << 20)
    if compression == "bz2":
        return bz2.open(path, "rb")
    if compression == "xz":
        return lzma.open(path, "rb")
    return open(path, "rb", buffering=1 << 20)


def lines(fh) -> Iterator[bytes]:
    """The lines of a binary stream without their ends: LF, CRLF and a lone CR each end a line.
    (No UTF-8 sequence holds the bytes of CR or LF, so splitting bytes is safe.)"""
    for raw in fh:
        if b"\r" in raw:
            pieces = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
            if not pieces[-1]:
                pieces.pop()
            yield from pieces
        else:
            yield raw[:-1] if raw.endswith(b"\n") else raw
