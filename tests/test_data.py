"""Corpus files: formats, resolving sources (local and s3://), pull into the cache, bad input."""

import gzip
import json
import threading
import time
from pathlib import Path

import pytest
import zstandard

from trainer.config import ConfigError, load_config
from trainer.data.readers import DocumentReader
from trainer.data.sources import DataError, corpus_fingerprint, local_files, pull, resolve_sources
from trainer.io.storage import S3Storage

DOCS = ["床前明月光，\n疑是地上霜。", "春眠不覺曉，處處聞啼鳥。", "plain ascii, with \"quotes\"", "白日依山盡"]


def jsonl_bytes(docs, field="text") -> bytes:
    return "".join(json.dumps({field: d, "id": i}, ensure_ascii=False) + "\n" for i, d in enumerate(docs)).encode()


def txt_bytes(docs) -> bytes:
    return ("\n\n".join(docs) + "\n").encode()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):  # two frames, as from concatenated or streamed writers
        half = len(data) // 2
        data = zstandard.ZstdCompressor().compress(data[:half]) + zstandard.ZstdCompressor().compress(data[half:])
    path.write_bytes(data)
    return path


def read_all(path: Path, **data_overrides):
    cfg = load_config(None, {f"data.{k}": v for k, v in data_overrides.items()}, env={}).data
    reader = DocumentReader(cfg)
    return list(reader.iter_file(local_files([path])[0])), reader.skipped


@pytest.mark.parametrize("name", ["c.jsonl", "c.jsonl.gz", "c.jsonl.zst", "c.json", "c.json.gz"])
def test_jsonl_formats(tmp_path, name):
    docs, skipped = read_all(write(tmp_path / name, jsonl_bytes(DOCS)))
    assert docs == DOCS and not skipped


@pytest.mark.parametrize("name", ["c.txt", "c.txt.gz", "c.txt.zst"])
def test_txt_documents_are_separated_by_blank_lines(tmp_path, name):
    assert read_all(write(tmp_path / name, txt_bytes(DOCS)))[0] == DOCS


def test_parquet_and_custom_text_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": DOCS, "n": list(range(len(DOCS)))}), tmp_path / "c.parquet", row_group_size=2)
    assert read_all(tmp_path / "c.parquet", text_field="content")[0] == DOCS
    assert read_all(write(tmp_path / "d.jsonl", jsonl_bytes(DOCS, "content")), text_field="content")[0] == DOCS


def corpus_tree(put):
    """The same small tree of corpus files, written with put(key, bytes)."""
    put("corpus/a.jsonl", jsonl_bytes(DOCS[:1]))
    put("corpus/b.jsonl.zst", zstandard.ZstdCompressor().compress(jsonl_bytes(DOCS[1:2])))
    put("corpus/sub/c.txt", txt_bytes(DOCS[2:3]))
    put("corpus/sub/d.jsonl", jsonl_bytes(DOCS[3:]))
    put("corpus/notes.md", b"not a corpus file")


def resolved(cfg_for, store, *sources) -> list[str]:
    files = resolve_sources(cfg_for([store.url(s) for s in sources]))
    root = store.url("")
    return [f.url[len(root):].lstrip("/") for f in files]


def test_resolve_sources_globs_folders_and_files(bucket, store, tmp_path):
    corpus_tree(store.write_bytes)

    def cfg_for(sources):
        return load_config(None, {"data.sources": sources, **bucket.overrides()}, env={})

    # The same glob means the same on a local disk and in a bucket: * stays inside a folder.
    assert resolved(cfg_for, store, "corpus/*.jsonl*") == ["corpus/a.jsonl", "corpus/b.jsonl.zst"]
    assert resolved(cfg_for, store, "corpus/**/*.jsonl") == ["corpus/a.jsonl", "corpus/sub/d.jsonl"]
    assert resolved(cfg_for, store, "corpus/sub/?.txt") == ["corpus/sub/c.txt"]
    # A folder is everything under it in a supported format (not notes.md).
    assert resolved(cfg_for, store, "corpus") == ["corpus/a.jsonl", "corpus/b.jsonl.zst", "corpus/sub/c.txt",
                                                  "corpus/sub/d.jsonl"]
    # Overlapping sources list a file once.
    assert resolved(cfg_for, store, "corpus/sub/c.txt", "corpus/sub") == ["corpus/sub/c.txt", "corpus/sub/d.jsonl"]
    files = resolve_sources(cfg_for([store.url("corpus/a.jsonl")]))
    assert files[0].size == len(jsonl_bytes(DOCS[:1])) and files[0].etag
    with pytest.raises(DataError, match=r"data\.sources\[1\]: '.*corpus/\*\.parquet' matches no corpus file"):
        resolve_sources(cfg_for([store.url("corpus/a.jsonl"), store.url("corpus/*.parquet")]))
    with pytest.raises(DataError, match=r"data\.sources\[0\]: .*nothing-here"):
        resolve_sources(cfg_for([store.url("nothing-here")]))


def test_local_fingerprint_follows_content_not_path(tmp_path):
    a = write(tmp_path / "x" / "c.jsonl", jsonl_bytes(DOCS))
    b = write(tmp_path / "y" / "c.jsonl", jsonl_bytes(DOCS))
    assert corpus_fingerprint(local_files([a])) == corpus_fingerprint(local_files([b]))
    write(b, jsonl_bytes(DOCS[::-1]))
    assert corpus_fingerprint(local_files([a])) != corpus_fingerprint(local_files([b]))


def test_pull_downloads_in_parallel_and_reuses_the_cache(new_s3_bucket, tmp_path, monkeypatch):
    bucket = new_s3_bucket()
    store = bucket.open()
    for i in range(4):
        store.write_bytes(f"c/part-{i}.jsonl", jsonl_bytes(DOCS[i:i + 1]))
    local = write(tmp_path / "local.jsonl", jsonl_bytes(DOCS))
    cfg = load_config(None, {"data.sources": [store.url("c/*.jsonl"), str(local)], "storage.max_concurrency": 4,
                             "storage.local_dir": str(tmp_path / "work"), **bucket.overrides()}, env={})
    calls, active, peak = [], [0], [0]
    lock = threading.Lock()
    real = S3Storage.download_file

    def counting(self, key, dest):
        with lock:
            calls.append(key)
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.2)  # long enough for the other downloads to start meanwhile
            return real(self, key, dest)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(S3Storage, "download_file", counting)
    files = pull(cfg, resolve_sources(cfg), progress=False)
    assert len(calls) == 4 and peak[0] > 1  # parallel
    s3_files = [f for f in files if f.url.startswith("s3://")]
    assert [f.name for f in s3_files] == [f"part-{i}.jsonl" for i in range(4)]
    for i, f in enumerate(s3_files):
        assert Path(f.local).is_relative_to(tmp_path / "work" / "corpus")
        assert Path(f.local).read_bytes() == jsonl_bytes(DOCS[i:i + 1])
    local_entry = [f for f in files if not f.url.startswith("s3://")][0]
    assert local_entry.local == str(local)  # local files are read in place, not copied
    mtimes = [Path(f.local).stat().st_mtime_ns for f in s3_files]

    calls.clear()
    again = pull(cfg, resolve_sources(cfg), progress=False)
    assert calls == [] and [f.local for f in again] == [f.local for f in files]
    assert [Path(f.local).stat().st_mtime_ns for f in s3_files] == mtimes

    store.write_bytes("c/part-2.jsonl", jsonl_bytes(["changed"]))  # a new version is fetched again
    third = pull(cfg, resolve_sources(cfg), progress=False)
    assert len(calls) == 1 and calls[0].endswith("/c/part-2.jsonl")
    changed = next(f for f in third if f.name == "part-2.jsonl")
    assert Path(changed.local).read_bytes() == jsonl_bytes(["changed"])


# Bad input -------------------------------------------------------------------------------------

def good_zst(path: Path, n: int = 300) -> Path:
    docs = [f"第{i}首，" + "明月" * (i % 50) + "光。" for i in range(n)]
    path.write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(docs)))
    return path


def test_corrupt_zst_names_the_file(tmp_path):
    path = good_zst(tmp_path / "bad.jsonl.zst")
    path.write_bytes(b"XXXX" + path.read_bytes()[4:])  # not a zstd frame
    with pytest.raises(DataError, match=r"bad\.jsonl\.zst: cannot read .*corrupt or truncated"):
        read_all(path)


def test_truncated_zst_is_an_error_not_a_short_corpus(tmp_path):
    path = good_zst(tmp_path / "cut.jsonl.zst")
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DataError, match=r"cut\.jsonl\.zst: cannot read .*truncated"):
        read_all(path)
    docs, skipped = read_all(path, on_error="skip")
    assert skipped == {"unreadable file": 1} and len(docs) < 300


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"\n{"text": "c"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"c\.jsonl:3: invalid JSON"):
        read_all(path)


def test_missing_text_field_names_file_line_and_key(tmp_path):
    path = write(tmp_path / "c.jsonl.gz", b'{"text": "a"}\n{"content": "b"}\n')
    with pytest.raises(DataError, match=r"c\.jsonl\.gz:2: record has no 'text' field \(data\.text_field\)"):
        read_all(path)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"c\.parquet: no column 'text' \(data\.text_field\)"):
        read_all(tmp_path / "c.parquet")


def test_empty_file_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.jsonl: empty file"):
        read_all(tmp_path / "empty.jsonl")


def test_skip_counts_each_kind_of_bad_record(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"text": "good 1"}\n'
                     b'not json\n'
                     b'{"body": "no text field"}\n'
                     b'{"text": 5}\n'
                     b'{"text": "\xff\xfe"}\n'
                     b'["a list"]\n'
                     b'{"text": "good 2"}\n')
    docs, skipped = read_all(path, on_error="skip")
    assert docs == ["good 1", "good 2"]
    assert skipped == {"invalid JSON": 1, "missing text field": 2, "non-string text": 1, "invalid UTF-8": 1}


def test_empty_source_list_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data\.sources"):
        load_config(None, {"data.sources": "[]"}, env={})


def test_cli_exits_2_naming_the_file_and_line(tmp_path, capsys):
    import entrypoint

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "typo"}\n', encoding="utf-8")
    args = [f"--storage.bucket={tmp_path / 'b'}", f"--storage.local_dir={tmp_path / 'w'}",
            "--tokenizer.vocab_size=300", "--tokenizer.sample_bytes=1000"]
    with pytest.raises(SystemExit) as e:
        entrypoint.main(["tokenizer", f"--data.sources={bad}"] + args)
    assert e.value.code == 2
    assert f"error: {bad}:2: record has no 'text' field" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        entrypoint.main(["pull", f"--data.sources={tmp_path}/*.parquet"] + args)
    assert e.value.code == 2 and "matches no corpus file" in capsys.readouterr().err
