"""A bucket object written as a stream, so that a large file never has to sit on local disk whole.

prepare from an S3 corpus writes each shard (up to data.shard_tokens x 2-4 bytes, 100-200 MB) through
this: an S3 multipart upload that sends a part each time PART_BYTES are written and completes on
close (the object appears whole then, as a PUT's does), or is aborted when the writing fails or a
signal stops it; in a local-folder bucket, a temporary file renamed on close. Memory: one part.
A kill -9 mid-shard leaves an incomplete multipart upload, invisible as an object (an
AbortIncompleteMultipartUpload lifecycle rule on the bucket removes such leftovers).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from trainer.io.storage import LocalStorage, S3Storage, Storage, StorageError

PART_BYTES = 16 << 20  # S3 needs >= 5 MiB per part but the last; 10,000 parts: objects up to 160 GB


class _S3Stream(io.RawIOBase):
    def __init__(self, store: S3Storage, key: str):
        self._store, self._key, self._buf, self._parts = store, key, bytearray(), []
        self._full = store._key(key)
        self._id = store._retry("upload to", key, lambda: store.client.create_multipart_upload(
            Bucket=store.bucket, Key=self._full))["UploadId"]

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._buf += data
        if len(self._buf) >= PART_BYTES:
            self._send()
        return len(data)

    def _send(self) -> None:
        body, n = bytes(self._buf), len(self._parts) + 1
        r = self._store._retry("upload to", self._key, lambda: self._store.client.upload_part(
            Bucket=self._store.bucket, Key=self._full, UploadId=self._id, PartNumber=n, Body=body))
        self._parts.append({"PartNumber": n, "ETag": r["ETag"]})
        self._buf = bytearray()

    def close(self) -> None:
        if self.closed:
            return
        if self._buf or not self._parts:
            self._send()
        self._store._retry("upload to", self._key, lambda: self._store.client.complete_multipart_upload(
            Bucket=self._store.bucket, Key=self._full, UploadId=self._id, MultipartUpload={"Parts": self._parts}))
        super().close()

    def abort(self) -> None:
        if not self.closed:
            super().close()
            self._store._retry("abort upload to", self._key, lambda: self._store.client.abort_multipart_upload(
                Bucket=self._store.bucket, Key=self._full, UploadId=self._id))


class _LocalStream(io.FileIO):
    def __init__(self, store: LocalStorage, key: str):
        self._path = Path(store._path(key))
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self._path.with_name(f".{self._path.name}.{os.getpid()}.0.part")  # storage's temporary pattern
        super().__init__(self._tmp, "wb")

    def close(self) -> None:
        if not self.closed:
            super().close()
            os.replace(self._tmp, self._path)

    def abort(self) -> None:
        if not self.closed:
            super().close()
        self._tmp.unlink(missing_ok=True)


def open_upload(store: Storage, key: str):
    """A binary file whose bytes become the object `key` when it is closed; abort() drops them."""
    if isinstance(store, S3Storage):
        return _S3Stream(store, key)
    if isinstance(store, LocalStorage):
        return _LocalStream(store, key)
    raise StorageError(f"{store.url(key)}: no streamed upload for {type(store).__name__}")
