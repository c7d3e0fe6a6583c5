"""Corpus files: resolve `data.sources` into a listing, pull it into the local cache, fingerprint it.

A source is a local file, folder or glob, an `s3://` prefix or glob, or a Hugging Face `datasets`
source. Files are recognised by name, any letter case (`file_kind`): .jsonl / .ndjson, .json,
.parquet, .txt, all but parquet optionally compressed as .gz, .zst (.zstd), .bz2 or .xz. A folder
source reads every such file under it except hidden ones (a name part starting with '.', as `datasets`
does) and logs which files it skipped and why. A source path that exists is taken literally even if it
holds glob characters. Reading the documents out of the files: trainer/data/readers.py.

Hugging Face `datasets` sources (trainer/data/hf_datasets.py): a folder written by `save_to_disk`, a local
copy of a Hub dataset repository (a `data/` subfolder or a dataset card declaring configs) and
`hf://datasets/<owner>/<name>[@<revision>][/<config>]`, read as their `train` split, one listing entry each.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from trainer.config import Config
from trainer.data import hf_datasets
from trainer.data.hf_datasets import HUB_PREFIX, DatasetSource, DatasetSourceError
from trainer.io.storage import is_s3, open_storage

logger = logging.getLogger(__name__)

# File name endings, matched case-insensitively: a format (aliases map to one reader), then an
# optional compression. Parquet compresses inside the file, so a compressed .parquet is not read.
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".txt": "txt"}
COMPRESSIONS = {"": "", ".gz": "gz", ".zst": "zst", ".zstd": "zst", ".bz2": "bz2", ".xz": "xz"}
SUPPORTED = ".jsonl, .ndjson, .json, .txt (each optionally .gz, .zst, .zstd, .bz2 or .xz) and .parquet"
SHOW_SKIPPED = 10  # skipped files named in a log line or error; the rest are counted


def file_kind(name: str) -> tuple[str, str] | None:
    """(format, compression) of a corpus file name, e.g. 'part-1.JSONL.zstd' -> ('jsonl', 'zst');
    None when the name is not a corpus file type."""
    low = name.lower()
    for ext, compression in COMPRESSIONS.items():
        if not low.endswith(ext):
            continue
        base = low[: len(low) - len(ext)]
        for fext, fmt in FORMATS.items():
            if base.endswith(fext) and not (fmt == "parquet" and compression):
                return fmt, compression
    return None


def _skip_reason(rel_path: str) -> str | None:
    """Why a file found under a folder source is not read (None: it is read)."""
    parts = rel_path.split("/")
    if any(p.startswith(".") for p in parts):
        return "hidden"
    if file_kind(parts[-1]) is None:
        return "not a corpus file type"
    return None


def _skipped_text(skipped: list[tuple[str, str]]) -> str:
    shown = ", ".join(f"{name} ({why})" for name, why in skipped[:SHOW_SKIPPED])
    return shown + (f" and {len(skipped) - SHOW_SKIPPED} more" if len(skipped) > SHOW_SKIPPED else "")


class DataError(ValueError):
    """Bad corpus input; the message names the source, file and line."""


@dataclass(frozen=True)
class CorpusFile:
    url: str  # where it came from (s3://... or an absolute local path)
    size: int  # bytes
    etag: str  # content fingerprint (S3 ETag, or a hash of a local file's head, tail and size)
    local: str = ""  # path of the readable copy on this machine, once pulled
    dataset: DatasetSource | None = None  # set for a Hugging Face datasets source (read through `datasets`)

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
    """Expand data.sources (files, folders, globs; local or s3://; `datasets` folders and hf://
    datasets ids, one entry each) into a sorted listing.

    A path (or key, or folder prefix) that exists is taken as named, glob characters and all; only
    otherwise is a source with *, ? or [ a glob. Files a folder or glob finds but does not read
    (hidden, or not a corpus file type) are logged as a warning, naming each and why. A source that
    matches no corpus file is a DataError naming it (a typo must not train on nothing), and so is
    an hf:// id that is malformed, unknown to the Hub, or unreachable from this machine.
    """
    files: dict[str, CorpusFile] = {}
    for i, source in enumerate(cfg.data.sources):
        if source.startswith("hf://"):
            found, skipped = [_hub_entry(f"data.sources[{i}]", source)], []
        else:
            found, skipped = _resolve_s3(source, cfg) if is_s3(source) else _resolve_local(source)
        if not found:
            why = f"; skipped {_skipped_text(skipped)}" if skipped else ""
            raise DataError(f"data.sources[{i}]: {source!r} matches no corpus file (supported: {SUPPORTED}){why}")
        if skipped:
            logger.warning("data.sources[%d] %r: read %d file(s), skipped %d: %s", i, source, len(found),
                           len(skipped), _skipped_text(skipped))
        for f in found:
            files.setdefault(f.url, f)
    return sorted(files.values(), key=lambda f: f.url)


def _literal_glob(path: Path) -> str:
    """`path` as a glob whose leading components that exist on disk are escaped: in
    '中文 语料 [清洗后]/*.jsonl' the folder is itself, not a character class."""
    base, parts = Path(), path.parts
    i = 0
    while i < len(parts) and (base / parts[i]).exists():
        base, i = base / parts[i], i + 1
    return os.path.join(glob.escape(str(base)), *parts[i:]) if i else str(path)


def _local_file(p: Path) -> CorpusFile:
    p = p.resolve()
    return CorpusFile(str(p), p.stat().st_size, _local_fingerprint(p), local=str(p))


def _dataset_entry(path: Path, layout: str) -> CorpusFile:
    """One listing entry for a `datasets` folder. Its size is the folder's, its fingerprint covers
    every file in it (relative name, size and each file's head/tail fingerprint; hidden files and
    folders such as .git and .cache left out), so a re-saved or edited dataset is a changed input."""
    path = path.resolve()
    h, size = hashlib.sha256(layout.encode()), 0
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if p.is_file() and not any(part.startswith(".") for part in rel.split("/")):
            size += p.stat().st_size
            h.update(f"{rel}|{p.stat().st_size}|{_dataset_file_fingerprint(p)}\n".encode())
    logger.info("%s: a Hugging Face datasets %s, read as its train split", path,
                "folder (save_to_disk)" if layout == "saved" else "repository copy")
    return CorpusFile(str(path), size, h.hexdigest()[:32], local=str(path),
                      dataset=DatasetSource(str(path), layout, str(path)))


def _dataset_file_fingerprint(path: Path) -> str:
    """_local_fingerprint, except for save_to_disk's state.json: without its `_fingerprint`, which
    `datasets` draws at random for a dataset built in memory, so the same rows saved twice are the
    same input (the rows themselves are in the .arrow files, hashed as they are)."""
    if path.name == "state.json":
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            return _local_fingerprint(path)
        if isinstance(state, dict):
            state.pop("_fingerprint", None)
            return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:32]
    return _local_fingerprint(path)


def _hub_entry(key: str, source: str) -> CorpusFile:
    """One listing entry for an hf://datasets/ id, pinned to the commit the Hub names now; a
    DataError (one line, naming `key` and the source) when that cannot be found out."""
    if not source.startswith(HUB_PREFIX):
        raise DataError(f"{key}: {source!r}: only Hub datasets are sources (hf://datasets/<owner>/<name>[/<config>])")
    try:
        repo_id, revision, config = hf_datasets.parse_hub_id(source)
        sha = hf_datasets.hub_revision(source, repo_id, revision)
    except DatasetSourceError as e:
        raise DataError(f"{key}: {e}") from None
    url = HUB_PREFIX + repo_id + (f"/{config}" if config else "")
    etag = hashlib.sha256(f"{repo_id}|{config}|{sha}".encode()).hexdigest()[:32]
    return CorpusFile(url, 0, etag, dataset=DatasetSource(url, "hub", repo_id, config, sha))


def _resolve_local(source: str) -> tuple[list[CorpusFile], list[tuple[str, str]]]:
    """(files to read, [(path, why skipped)]) for one local source."""
    path = Path(source).expanduser()
    if path.is_dir() and (layout := hf_datasets.folder_layout(path)):
        return [_dataset_entry(path, layout)], []
    if path.is_file():  # named explicitly: read whatever its name, if it is a corpus type
        kind = file_kind(path.name)
        return ([_local_file(path)], []) if kind else ([], [(path.name, "not a corpus file type")])
    if path.is_dir():
        found, skipped = [], []
        for p in sorted(path.rglob("*")):
            if p.is_file():
                rel = p.relative_to(path).as_posix()
                why = _skip_reason(rel)
                if why:
                    skipped.append((rel, why))
                else:
                    found.append(_local_file(p))
        return found, skipped
    if not _has_magic(source):
        return [], []
    found, skipped = [], []
    for name in sorted(glob.glob(_literal_glob(path), recursive=True)):
        p = Path(name)
        if p.is_file():
            if file_kind(p.name):
                found.append(_local_file(p))
            else:
                skipped.append((name, "not a corpus file type"))
    return found, skipped


def _resolve_s3(source: str, cfg: Config) -> tuple[list[CorpusFile], list[tuple[str, str]]]:
    """(files to read, [(key, why skipped)]) for one s3:// source: an object, a folder prefix, or a glob."""
    bucket, _, pattern = source[len("s3://"):].partition("/")
    store = open_storage(f"s3://{bucket}", cfg.storage)
    exact = store.info(pattern) if pattern and not pattern.endswith("/") else None
    if exact:
        objs, root = [exact], None
    else:
        root = pattern.rstrip("/") + "/" if pattern else ""
        objs = store.list(root)
        if not objs and _has_magic(pattern):  # nothing exists under that literal name: a glob
            head = pattern[: min(pattern.index(c) for c in "*?[" if c in pattern)]
            prefix = head.rsplit("/", 1)[0] + "/" if "/" in head else ""
            match = _glob_regex(pattern).match
            objs, root = [o for o in store.list(prefix) if match(o.key)], None
    found, skipped = [], []
    for o in objs:
        if o.key.endswith("/"):  # a folder marker some tools write
            continue
        why = _skip_reason(o.key[len(root):]) if root is not None else (
            None if file_kind(o.key.rsplit("/", 1)[-1]) else "not a corpus file type")
        if why:
            skipped.append((o.key, why))
        else:
            found.append(CorpusFile(f"s3://{bucket}/{o.key}", o.size, o.etag))
    return found, skipped


def pull(cfg: Config, files: list[CorpusFile], progress: bool = True, stream: bool = False) -> list[CorpusFile]:
    """Make every file readable locally: S3 objects are downloaded in parallel into the cache
    (temporary name, size check, rename); cached copies of the same size and ETag are reused.
    stream: S3 objects stay in the bucket (local ""): the tokenizer's sample and prepare read the
    parts they need with ranged reads (trainer/data/remote.py), so local disk never holds the corpus."""
    cache = Path(cfg.storage.local_dir) / "corpus"
    todo, out = [], {}
    for f in files:
        if not is_s3(f.url) or f.local:
            out[f.url] = f
            continue
        if stream:
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
                   disable=None if progress else True)  # None: only on a terminal

        def fetch(f: CorpusFile):
            bucket, _, key = f.url[len("s3://"):].partition("/")
            n = open_storage(f"s3://{bucket}", cfg.storage).download_file(key, f.local)
            bar.update(n)

        with ThreadPoolExecutor(cfg.storage.max_concurrency) as pool:
            list(pool.map(fetch, todo))  # list() re-raises the first failure
        bar.close()
    return [out[f.url] for f in files]


class PulledOnDemand(Sequence):
    """`files` as a sequence whose item i is pull()ed (an S3 object downloaded into the cache) only
    when it is first read, so that a reader that stops early (the report's held-out documents, a
    few hundred thousand characters) copies a few files, not the corpus. Slices give the listing's
    entries unpulled (names and sizes, for messages)."""

    def __init__(self, cfg: Config, files: list[CorpusFile]):
        self._cfg, self._files, self._pulled = cfg, list(files), {}

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self._files[i]
        i = range(len(self._files))[i]  # IndexError past the end ends iteration
        if i not in self._pulled:
            self._pulled[i] = pull(self._cfg, [self._files[i]], progress=False)[0]
        return self._pulled[i]


def corpus_fingerprint(files: list[CorpusFile]) -> str:
    """Identifies a corpus listing: names, sizes and content fingerprints (not machine paths)."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: (f.name, f.etag)):
        h.update(f"{f.name}|{f.size}|{f.etag}\n".encode())
    return h.hexdigest()


def local_files(paths: list[str | Path]) -> list[CorpusFile]:
    """CorpusFile entries for local paths (tests and tools)."""
    out = []
    for p in paths:
        p = Path(p).resolve()
        out.append(CorpusFile(str(p), p.stat().st_size, _local_fingerprint(p), local=str(p)))
    return out

