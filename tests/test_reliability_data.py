"""Bad corpus input: corrupt and truncated .gz/.zst, invalid JSON lines, non-UTF-8 bytes, empty
files, a missing text field, a single 50 MB document, a source glob that matches nothing.

data.on_error=fail: an error naming the file and line, exit 2 from the CLI, and the bucket exactly
as it was. data.on_error=skip: the good records are used and the bad ones counted by reason in
the prepare index (index.json "skipped_records").
"""

from __future__ import annotations

import gzip
import json
import re
import time
from pathlib import Path

import pytest
import zstandard

from faults import cli_args, copy_bucket, make_config, run, template, tiny_settings, write_config  # noqa: F401
from trainer.config import DataConfig
from trainer.data.readers import DocumentReader
from trainer.data.sources import DataError, local_files, resolve_sources
from trainer.io.storage import open_storage


def lines(n: int, start: int = 0) -> bytes:
    return "".join(json.dumps({"text": f"第{i}首：床前明月光，疑是地上霜。" * 3}, ensure_ascii=False) + "\n"
                   for i in range(start, start + n)).encode()


def flipped(data: bytes) -> bytes:
    out = bytearray(data)
    for i in range(len(out) // 2, len(out) // 2 + 8):
        out[i] ^= 0xFF
    return bytes(out)


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


UNREADABLE = r": cannot read after line \d+ .*corrupt or truncated"
# name -> (bytes, reason counted with on_error=skip, what the fail-mode error says after the file name)
BAD = {
    "corrupt.jsonl.gz": (flipped(gzip.compress(lines(400))), "unreadable file", UNREADABLE),
    "truncated.jsonl.gz": (half(gzip.compress(lines(400))), "unreadable file", UNREADABLE),
    "corrupt.jsonl.zst": (flipped(zstandard.ZstdCompressor().compress(lines(400))), "unreadable file",
                          UNREADABLE),
    "truncated.jsonl.zst": (half(zstandard.ZstdCompressor().compress(lines(400))), "unreadable file",
                            UNREADABLE),
    "invalid-json.jsonl": (lines(2) + b'{"text": "unterminated\n' + lines(2, 2), "invalid JSON", r":3: invalid JSON"),
    "truncated-line.jsonl": (lines(3) + lines(1, 3)[:20], "invalid JSON", r":4: invalid JSON"),
    "not-utf8.jsonl": (lines(1) + b'{"text": "caf\xe9 \xff\xfe"}\n' + lines(1, 1), "invalid UTF-8",
                       r":2: invalid UTF-8"),
    "not-utf8.txt": ("春眠不覺曉\n".encode() + b"\xff\xfe broken\n\n" + "處處聞啼鳥\n".encode(), "invalid UTF-8",
                     r":2: invalid UTF-8"),
    "empty.jsonl": (b"", "empty file", r": empty file"),
    "no-text-field.jsonl": (lines(1) + b'{"content": "wrong field"}\n' + lines(1, 1), "missing text field",
                            r":2: record has no 'text' field"),
}


def write_bad(folder: Path, names=BAD) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        (folder / name).write_bytes(BAD[name][0])
        out.append(folder / name)
    return out


@pytest.mark.parametrize("name", sorted(BAD))
def test_fail_names_the_file_and_line(name, tmp_path):
    (path,) = write_bad(tmp_path, [name])
    reader = DocumentReader(DataConfig(on_error="fail"))
    with pytest.raises(DataError, match=re.escape(str(path)) + BAD[name][2] + ".*data.on_error=skip"):
        list(reader.iter_file(local_files([path])[0]))


@pytest.mark.parametrize("name", sorted(BAD))
def test_skip_counts_the_bad_records_and_keeps_the_good_ones(name, tmp_path):
    (path,) = write_bad(tmp_path, [name])
    reader = DocumentReader(DataConfig(on_error="skip"))
    docs = list(reader.iter_file(local_files([path])[0]))
    assert dict(reader.skipped) == {BAD[name][1]: 1}
    if BAD[name][1] != "unreadable file" and name != "empty.jsonl":
        assert len(docs) >= 2  # the records around the bad one
    assert all("\ufffd" not in d for d in docs)


def test_a_glob_that_matches_nothing_is_an_error_naming_the_source(tmp_path):
    settings = tiny_settings(str(tmp_path / "corpus" / "*.jsonl"), str(tmp_path / "b"), str(tmp_path / "w"))
    with pytest.raises(DataError, match=r"data.sources\[0\]: .*corpus/\*\.jsonl' matches no corpus file"):
        resolve_sources(make_config(settings))


def fifty_mb_document(path: Path) -> int:
    poem = "床前明月光，疑是地上霜。舉頭望明月，低頭思故鄉。\n"
    text = poem * (50_000_000 // len(poem.encode()))
    path.write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    return len(text)


def test_a_single_50mb_document_is_read_whole(tmp_path):
    n = fifty_mb_document(tmp_path / "big.jsonl")
    assert (tmp_path / "big.jsonl").stat().st_size > 50_000_000
    start = time.time()
    (doc,) = DocumentReader(DataConfig()).iter_file(local_files([tmp_path / "big.jsonl"])[0])
    assert len(doc) == n and time.time() - start < 30


def snapshot(store) -> dict:
    return {o.key: (o.size, o.etag) for o in store.list("")}


def test_prepare_through_the_cli_fail_then_skip(template, tmp_path):
    bucket = copy_bucket(template, tmp_path / "bucket")
    store = open_storage(str(bucket))
    before = snapshot(store)
    bad = write_bad(tmp_path / "bad")
    fifty_mb_document(tmp_path / "bad" / "big.jsonl")
    settings = tiny_settings(template["corpus"], str(bucket), str(tmp_path / "work"), **{
        "data.sources": [template["corpus"], str(tmp_path / "bad" / "*")], "data.max_chars": 100_000})
    config = write_config(tmp_path / "c.yaml", settings)

    failed = run(cli_args("prepare", f"--config={config}"))
    assert failed.returncode == 2, failed.stdout[-3000:]
    first_bad = sorted(bad)[0]  # files are read in sorted order
    said = re.search(r"error: " + re.escape(str(first_bad)) + BAD[first_bad.name][2], failed.stdout)
    assert said, failed.stdout[-3000:]
    after = snapshot(store)
    assert {k: after.get(k) for k in before} == before  # nothing already uploaded is lost or changed
    # The tokenizer's sample reads a spread part of the corpus and may miss the bad files: a new
    # tokenizer may be published whole (with its manifest); no data shard is, not even in part.
    added = {k.rsplit("/", 1)[0] + "/" for k in set(after) - set(before)}
    assert all(p.startswith("tokenizers/") and p + "MANIFEST.json" in after for p in added), sorted(added)

    skipped = run(cli_args("prepare", f"--config={config}", "--data.on_error=skip"))
    assert skipped.returncode == 0, skipped.stdout[-3000:]
    data_key = skipped.stdout.strip().splitlines()[-1][len(str(bucket)) + 1:]
    index = json.loads(store.read_text(f"{data_key}/index.json"))
    want = {}
    for _, reason, _ in BAD.values():
        want[reason] = want.get(reason, 0) + 1
    assert index["skipped_records"] == want
    assert index["filters"]["truncated_too_long"] == 1  # the 50 MB document, cut to data.max_chars
    assert before.items() <= snapshot(store).items()
