"""One small storage interface over string URLs: a local folder or s3://bucket/prefix.

Keys are '/'-separated paths relative to the storage root. Writes are atomic from a reader's point
of view: a local write goes to a temporary name and is renamed; an S3 object appears whole when its
PUT (or multipart upload) completes. Downloads land under a temporary name, are checked against the
object's size and only then renamed, so a half-downloaded file never looks complete.

The S3 client is created lazily, uses the endpoint from config or AWS_ENDPOINT_URL (MinIO, R2),
botocore's "standard" retry mode with backoff, multipart transfers for large files, and checksums
only when required (MinIO and R2 reject or ignore the newer default CRC trailers on some versions).
Credentials come from boto3's usual chain and are never stored or printed by this module.

A local write that fails (a full disk) removes its temporary file; deleting a folder prefix of a
local bucket also removes temporaries that a killed process left there, and the emptied folders.
Missing or refused credentials and a missing bucket are StorageAccessError: not retried, and a
ConfigError too, so the CLI exits 2 (retrying cannot fix them).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from trainer.config import ConfigError, StorageConfig


class StorageError(RuntimeError):
    """A storage operation failed after all retries; the message names the URL."""


class StorageAccessError(StorageError, ConfigError):
    """The bucket cannot be used as configured: no or partial credentials, keys or a token the
    endpoint refuses, access denied, no such bucket. Never retried; being a ConfigError, the CLI
    exits 2 with its one line (fix the configuration, do not retry)."""


_TEMPORARY = re.compile(r"\..+\.\d+\.\d+\.part")  # .<name>.<pid>.<thread id>.part, as the writes below name them


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.part")


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the storage root
    size: int  # bytes
    etag: str  # S3 ETag or local mtime_ns; changes when the content is replaced


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def join(*parts: str) -> str:
    """Join URL/key parts with single slashes (keeps the s3:// scheme intact)."""
    out = ""
    for p in parts:
        if not p:
            continue
        out = p if not out else out.rstrip("/") + "/" + p.lstrip("/")
    return out


class Storage:
    """Base class: subclasses implement the primitives; `url(key)` names an object for messages."""

    root: str

    def url(self, key: str = "") -> str:
        return join(self.root, key)

    # primitives -----------------------------------------------------------------------------
    def read_bytes(self, key: str) -> bytes: raise NotImplementedError
    def write_bytes(self, key: str, data: bytes) -> None: raise NotImplementedError
    def exists(self, key: str) -> bool: raise NotImplementedError
    def list(self, prefix: str = "") -> list[ObjectInfo]: raise NotImplementedError
    def delete(self, key: str) -> None: raise NotImplementedError
    def upload_file(self, local_path: str | Path, key: str) -> None: raise NotImplementedError
    def _download(self, key: str, tmp: Path) -> int: raise NotImplementedError
    def info(self, key: str) -> ObjectInfo | None: raise NotImplementedError
    def read_range(self, key: str, start: int, end: int) -> bytes: raise NotImplementedError

    # built on the primitives ----------------------------------------------------------------
    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode("utf-8"))

    def read_text_or_none(self, key: str) -> str | None:
        return self.read_text(key) if self.exists(key) else None

    def delete_prefix(self, prefix: str) -> int:
        objs = self.list(prefix)
        for o in objs:
            self.delete(o.key)
        return len(objs)

    def download_file(self, key: str, local_path: str | Path) -> int:
        """Download to a temporary name, verify the size, then rename. Returns bytes written."""
        local_path = Path(local_path)
        local_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary(local_path)
        try:
            expected = self._download(key, tmp)
            got = tmp.stat().st_size
            if got != expected:
                raise StorageError(f"download of {self.url(key)} is {got} bytes, expected {expected}")
            os.replace(tmp, local_path)
            return got
        finally:
            tmp.unlink(missing_ok=True)

    def upload_dir(self, local_dir: str | Path, prefix: str, skip: tuple[str, ...] = ()) -> list[str]:
        """Upload every file under local_dir to prefix/<relative path>; returns the keys."""
        keys = []
        for path in sorted(Path(local_dir).rglob("*")):
            rel = path.relative_to(local_dir).as_posix()
            if path.is_file() and rel not in skip:
                key = join(prefix, rel)
                self.upload_file(path, key)
                keys.append(key)
        return keys

    def download_dir(self, prefix: str, local_dir: str | Path) -> list[Path]:
        """Download every object under prefix/ into local_dir, keeping relative paths."""
        out = []
        prefix = prefix.rstrip("/") + "/"
        for o in self.list(prefix):
            dest = Path(local_dir) / o.key[len(prefix):]
            if not (dest.is_file() and dest.stat().st_size == o.size):
                self.download_file(o.key, dest)
            out.append(dest)
        return out


class LocalStorage(Storage):
    def __init__(self, root: str | Path):
        self.root = str(root)
        self._root = Path(root)

    def _path(self, key: str) -> Path:
        return self._root / key if key else self._root

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"not found: {self.url(key)}") from None

    def _write_via_temporary(self, key: str, write) -> None:
        """write(tmp) fills a temporary next to the destination, which is then renamed over it. On
        any failure (a full disk, a signal) the temporary is removed; an OSError on the bucket's
        side (not, say, a missing source file) becomes a StorageError naming the URL."""
        path = self._path(key)
        tmp = _temporary(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
            os.replace(tmp, path)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError) and (e.filename is None or Path(os.fsdecode(e.filename)) in (tmp, path,
                                                                                                    path.parent)):
                raise StorageError(f"write {self.url(key)} failed: {type(e).__name__}: {e}") from e
            raise

    def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the object (fewer at its end)."""
        try:
            with open(self._path(key), "rb") as fh:
                fh.seek(start)
                return fh.read(max(0, end - start))
        except FileNotFoundError:
            raise StorageError(f"not found: {self.url(key)}") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        def write(tmp: Path):
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        self._write_via_temporary(key, write)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def info(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        if not path.is_file():
            return None
        st = path.stat()
        return ObjectInfo(key, st.st_size, str(st.st_mtime_ns))

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        # A prefix is a string prefix, as in S3: "runs/a" matches "runs/a/x" and "runs/ab".
        base = self._path(prefix.rsplit("/", 1)[0] if "/" in prefix else "")
        if not base.is_dir():
            return []
        out = []
        for path in base.rglob("*"):
            if not path.is_file() or path.name.startswith(".") and path.name.endswith(".part"):
                continue
            key = path.relative_to(self._root).as_posix()
            if key.startswith(prefix):
                st = path.stat()
                out.append(ObjectInfo(key, st.st_size, str(st.st_mtime_ns)))
        return sorted(out, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under prefix; for a folder prefix ("runs/x/step-8/") also the write
        temporaries left in it by a killed process and the folders emptied, the folder included.
        Returns the number of objects deleted."""
        n = super().delete_prefix(prefix)
        folder = self._path(prefix.rstrip("/"))
        if prefix.endswith("/") and folder.is_dir():
            for path in sorted(folder.rglob("*"), reverse=True):  # a folder's contents before the folder
                if path.is_dir():
                    with contextlib.suppress(OSError):  # not empty: something else lives there
                        path.rmdir()
                elif _TEMPORARY.fullmatch(path.name):
                    path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                folder.rmdir()
        return n

    def upload_file(self, local_path: str | Path, key: str) -> None:
        self._write_via_temporary(key, lambda tmp: shutil.copyfile(local_path, tmp))

    def _download(self, key: str, tmp: Path) -> int:
        src = self._path(key)
        if not src.is_file():
            raise StorageError(f"not found: {self.url(key)}")
        shutil.copyfile(src, tmp)
        return src.stat().st_size


_SIGNED = re.compile(r"(X-Amz-(?:Credential|Signature|Security-Token)=|Credential=|Signature=)[^&\s,\"'<]+")


def redact(text: str) -> str:
    """`text` without AWS credentials: the values of the credential variables boto3 reads, and the
    credential and signature parts of signed URLs and Authorization headers, become ***. Storage
    error messages pass through this, since botocore and endpoints may echo a request back."""
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"):
        secret = os.environ.get(name, "")
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return _SIGNED.sub(r"\1***", text)


# Error codes that say the configuration, not the moment, is wrong: credentials, permissions, bucket.
_ACCESS_CODES = {"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                 "InvalidToken", "TokenRefreshRequired", "NoSuchBucket", "InvalidBucketName", "AccountProblem",
                 "AuthorizationHeaderMalformed"}


def _access_problem(exc: BaseException) -> str | None:
    """What to fix when `exc` is a credentials, permission or bucket error (None otherwise)."""
    from boto3.exceptions import S3TransferFailedError, S3UploadFailedError
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    if isinstance(exc, (S3UploadFailedError, S3TransferFailedError)) and exc.__context__ is not None:
        exc = exc.__context__  # boto3's transfers wrap the ClientError they got
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return ("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or give the "
                "machine a role)")
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket" or code == "InvalidBucketName":
            return "no such bucket (storage.bucket)"
        if code in _ACCESS_CODES or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 403:
            return ("access refused: check the credentials and their permissions, storage.endpoint_url and "
                    "storage.region")
    return None


class _BrokenStream(Exception):
    """A response body that broke or stalled while it was read: botocore retries a request, not the
    reading of its body afterwards, so this is the one error our own layer (S3Storage._retry) retries."""


def _stream_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError
    from urllib3.exceptions import HTTPError as Urllib3Error

    return (IncompleteReadError, ResponseStreamingError, ReadTimeoutError, BotoConnectionError, Urllib3Error,
            ConnectionError, TimeoutError)


def _read_body(response) -> bytes:
    try:
        return response["Body"].read()
    except _stream_errors() as e:
        raise _BrokenStream(f"{type(e).__name__}: {e}") from e


def _attempts_made(exc: BaseException, retries: int, ours: int) -> int:
    """Attempts behind a final error, by its type: botocore's for what its standard mode retries
    (ClientError says how many in RetryAttempts; connection errors and timeouts used them all)."""
    from botocore.exceptions import ClientError, ReadTimeoutError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, ClientError):
        return exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) + 1
    if isinstance(exc, (BotoConnectionError, ReadTimeoutError)):
        return retries
    return ours


class S3Storage(Storage):
    def __init__(self, url: str, cfg: StorageConfig | None = None):
        cfg = cfg or StorageConfig()
        self.root = url.rstrip("/")
        self.bucket, _, self.prefix = url[len("s3://"):].partition("/")
        self.prefix = self.prefix.strip("/")
        self._cfg = cfg
        self._client = None
        self._lock = threading.Lock()

    @property
    def client(self):
        """The boto3 client, created on first use (tests register fault hooks on its events)."""
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config as BotoConfig

                endpoint = self._cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") \
                    or os.environ.get("AWS_ENDPOINT_URL") or None
                region = self._cfg.region or os.environ.get("AWS_REGION") \
                    or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
                self._client = boto3.session.Session().client(
                    "s3", endpoint_url=endpoint, region_name=region,
                    config=BotoConfig(
                        # total_max_attempts counts the first request; botocore's max_attempts counts retries only
                        retries={"total_max_attempts": self._cfg.retries, "mode": "standard"},
                        connect_timeout=self._cfg.timeout_seconds, read_timeout=self._cfg.timeout_seconds,
                        max_pool_connections=max(10, 2 * self._cfg.max_concurrency),
                        request_checksum_calculation="when_required",
                        response_checksum_validation="when_required",
                        s3={"addressing_style": "path" if endpoint else "auto"},
                    ),
                )
            return self._client

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}".lstrip("/") if self.prefix else key

    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        # num_download_attempts: s3transfer's own retry of a download whose stream breaks (botocore retries
        # each request); storage.retries bounds it as it bounds every other layer.
        return TransferConfig(multipart_threshold=64 * 2**20, multipart_chunksize=64 * 2**20,
                              max_concurrency=self._cfg.max_concurrency, use_threads=True,
                              num_download_attempts=self._cfg.retries)

    def _retry(self, what: str, key: str, fn):
        """Run fn; raise StorageError naming the URL when it fails. One retry layer per kind of error:
        botocore's standard mode retries each request (5xx, throttling, connection errors, timeouts) up
        to storage.retries attempts in all; this loop retries only a body that broke while being read
        (_BrokenStream), with exponential backoff and jitter, up to storage.retries reads. Errors are
        classified by type, never by message text."""
        attempts = self._cfg.retries
        for attempt in range(attempts):
            try:
                return fn()
            except FileNotFoundError:
                raise
            except Exception as e:  # noqa: BLE001 - classified below
                problem = _access_problem(e)
                if problem:
                    raise StorageAccessError(redact(f"{what} {self.url(key)}: {problem} ({type(e).__name__}: "
                                                    f"{e})")) from None
                if not isinstance(e, _BrokenStream) or attempt == attempts - 1:
                    n = _attempts_made(e, attempts, attempt + 1)
                    raise StorageError(redact(f"{what} {self.url(key)} failed after {n} attempt(s) "
                                              f"(storage.retries={attempts}): {type(e).__name__}: {e}")) from None
                time.sleep(min(20.0, 0.2 * 2**attempt) * (0.5 + random.random()))

    def read_bytes(self, key: str) -> bytes:
        def go():
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            except self.client.exceptions.NoSuchKey:
                raise FileNotFoundError(self.url(key)) from None
            return _read_body(response)
        try:
            return self._retry("read", key, go)
        except FileNotFoundError:
            raise StorageError(f"not found: {self.url(key)}") from None

    def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the object (fewer at its end): one GET with a Range header, retried
        as read_bytes is. Lets prepare and the tokenizer's sample read a part of a large corpus file."""
        if end <= start:
            return b""

        def go():
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self._key(key),
                                                  Range=f"bytes={start}-{end - 1}")
            except self.client.exceptions.NoSuchKey:
                raise FileNotFoundError(self.url(key)) from None
            except self.client.exceptions.ClientError as e:
                if e.response.get("Error", {}).get("Code") == "InvalidRange":  # start at or past the end
                    return b""
                raise
            return _read_body(response)
        try:
            return self._retry("read", key, go)
        except FileNotFoundError:
            raise StorageError(f"not found: {self.url(key)}") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        self._retry("write", key, lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data))

    def info(self, key: str) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        def go():
            try:
                r = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
                return ObjectInfo(key, r["ContentLength"], r.get("ETag", "").strip('"'))
            except ClientError as e:
                if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                    return None
                raise
        return self._retry("stat", key, go)

    def exists(self, key: str) -> bool:
        return self.info(key) is not None

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        def go():
            out = []
            strip = len(self.prefix) + 1 if self.prefix else 0
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                              Prefix=self._key(prefix)):
                for o in page.get("Contents", []):
                    out.append(ObjectInfo(o["Key"][strip:], o["Size"], o.get("ETag", "").strip('"')))
            return sorted(out, key=lambda o: o.key)
        return self._retry("list", prefix, go)

    def delete(self, key: str) -> None:
        self._retry("delete", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key)))

    def upload_file(self, local_path: str | Path, key: str) -> None:
        self._retry("upload to", key, lambda: self.client.upload_file(
            str(local_path), self.bucket, self._key(key), Config=self._transfer_config()))

    def _download(self, key: str, tmp: Path) -> int:
        info = self.info(key)
        if info is None:
            raise StorageError(f"not found: {self.url(key)}")
        self._retry("download", key, lambda: self.client.download_file(
            self.bucket, self._key(key), str(tmp), Config=self._transfer_config()))
        return info.size


def open_storage(url: str, cfg: StorageConfig | None = None) -> Storage:
    """A Storage rooted at url: s3://bucket/prefix or a local folder."""
    if is_s3(url):
        if not url[len("s3://"):].split("/")[0]:
            raise StorageError(f"{url}: an s3:// URL needs a bucket name")
        return S3Storage(url, cfg)
    return LocalStorage(Path(url).expanduser().resolve())


def split_url(url: str, cfg: StorageConfig | None = None) -> tuple[Storage, str]:
    """(storage rooted at the bucket or filesystem root, key) for any single-object URL."""
    if is_s3(url):
        bucket, _, key = url[len("s3://"):].partition("/")
        return open_storage(f"s3://{bucket}", cfg), key
    path = Path(url).expanduser().resolve()
    return LocalStorage(path.anchor), path.relative_to(path.anchor).as_posix()
