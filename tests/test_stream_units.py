"""A large compressed .jsonl file is cut into ranges of its decompressed bytes (trainer/data/units.py
"stream" units), each read by decompressing from the start and keeping the lines that begin in its
range (trainer/data/streams.py StreamCut): the parts hold every document exactly once, in order, with
the file's own line numbers, and prepare gives the same shards for any worker count."""

from __future__ import annotations

import bz2
import gzip
import json
import random

import numpy as np
import pytest
import zstandard

from trainer.config import load_config
from trainer.data import units
from trainer.data.prepare_pool import prepare_corpus
from trainer.data.readers import DocumentReader, iter_documents
from trainer.data.shards import prepare_shards
from trainer.data.sources import DataError, local_files
from trainer.data.streams import StreamCut, open_binary
from trainer.data.tokenizer import train_tokenizer

COMPRESS = {"zst": zstandard.ZstdCompressor().compress, "gz": gzip.compress, "bz2": bz2.compress}


def data_cfg(**data):
    values = {"val_permille": 100, "shard_tokens": 2048, **data}
    return load_config(None, {f"data.{k}": v for k, v in values.items()}, env={})


def records(n: int, seed: int = 0) -> list[str]:
    """Documents of very different lengths (a few characters to a few kilobytes)."""
    rng = random.Random(seed)
    chars = "春眠不覺曉處處聞啼鳥夜來風雨聲花落知多少ab\n"
    return [f"{i} " + "".join(rng.choice(chars) for _ in range(rng.choice([3, 40, 900]))) for i in range(n)]


def write(path, docs, ext: str, bad_at: int | None = None, crlf: bool = False):
    lines = [json.dumps({"text": t}, ensure_ascii=False) for t in docs]
    if bad_at is not None:
        lines.insert(bad_at, '{"text": "an unterminated record')
    raw = ("\r\n" if crlf else "\n").join(lines).encode() + b"\n"
    path.write_bytes(COMPRESS[ext](raw))
    return path


@pytest.mark.parametrize("ext", sorted(COMPRESS))
@pytest.mark.parametrize("ratio", [1, 4, 50])  # the size guess low (a long last unit), as planned, high (empty units)
def test_the_units_of_a_compressed_file_hold_each_document_once_in_order(tmp_path, ext, ratio, monkeypatch):
    monkeypatch.setattr(units, "STREAM_RATIO", ratio)
    docs = records(300)
    files = local_files([write(tmp_path / f"big.jsonl.{ext}", docs, ext)])
    plan = units.plan_units(files, unit_bytes=4096)
    assert len(plan) > 3 and {u.kind for u in plan} == {"stream"} and len(plan) <= units.MAX_STREAM_UNITS
    assert plan[-1].end == 0 and all(a.end == b.start for a, b in zip(plan, plan[1:]))
    cfg = data_cfg().data
    parts = [list(DocumentReader(cfg).iter_file(files[0], **u.reader_args())) for u in plan]
    assert [d for part in parts for d in part] == docs
    if ratio == 50:
        assert [] in parts  # ranges past the stream's end read nothing
    else:
        assert sum(1 for p in parts if p) > 2  # the documents are spread over the units


@pytest.mark.parametrize("crlf", [False, True])
def test_a_cut_at_every_offset_keeps_each_line_once(tmp_path, crlf):
    """Lines that start in [start, end): for cuts at every byte of a small stream, including cuts
    on a line end, inside a CRLF and past the end, the parts join to the whole stream."""
    docs = records(12, seed=3)
    path = write(tmp_path / "s.jsonl.zst", docs, "zst", crlf=crlf)
    with open_binary(str(path)) as fh:
        whole = fh.read()
    for width in (1, 7, 64, 1000):
        offsets = list(range(0, len(whole) + 2 * width, width))
        joined = b""
        for a, b in zip(offsets, offsets[1:] + [None]):
            with StreamCut(open_binary(str(path)), a, b) as cut:
                part = cut.read()
            assert not part or whole.startswith(part, len(joined))  # in order, from where the last stopped
            joined += part
        assert joined == whole, width


def test_a_bad_record_in_a_later_unit_is_named_by_its_file_line(tmp_path):
    path = write(tmp_path / "big.jsonl.zst", records(300), "zst", bad_at=250)  # line 251
    files = local_files([path])
    plan = units.plan_units(files, unit_bytes=4096)
    cfg = data_cfg().data
    with pytest.raises(DataError, match=rf"^{path}:251: invalid JSON"):
        for u in plan[1:]:
            list(DocumentReader(cfg).iter_file(files[0], **u.reader_args()))
    skip = DocumentReader(data_cfg(on_error="skip").data)
    for u in plan:
        list(skip.iter_file(files[0], **u.reader_args()))
    assert skip.skipped == {"invalid JSON": 1}


def test_prepare_gives_the_same_shards_for_1_and_3_workers_and_one_process(tmp_path, tiny_docs, monkeypatch):
    monkeypatch.setattr(units, "UNIT_BYTES", 4096)
    docs = tiny_docs + records(200, seed=5)
    files = local_files([write(tmp_path / "a.jsonl.zst", docs[:300], "zst"),
                         write(tmp_path / "b.jsonl.gz", docs[250:], "gz")])  # 50 documents in both: dedup
    assert sum(u.kind == "stream" for u in units.plan_units(files)) > 6
    tok = train_tokenizer(tiny_docs, 512, 4, 2)
    cfg = data_cfg()
    ref = prepare_shards(cfg, iter_documents(cfg.data, files), tok, tmp_path / "one", progress=False)
    assert ref["filters"]["removed_duplicate"] >= 50
    for workers in (1, 3):
        out = tmp_path / f"w{workers}"
        index = prepare_corpus(cfg, files, tok, out, tmp_path / f"scratch{workers}", workers=workers)
        for key in ("train", "val", "tokens", "chars", "documents", "filters"):
            assert index[key] == ref[key], key
        for e in index["train"] + index["val"]:
            assert (out / e["name"]).read_bytes() == (tmp_path / "one" / e["name"]).read_bytes()


def test_small_compressed_files_stay_one_unit(tmp_path):
    small = local_files([write(tmp_path / "small.jsonl.zst", records(3), "zst")])
    assert [u.kind for u in units.plan_units(small, unit_bytes=1 << 20)] == ["file"]


def test_stream_units_of_an_s3_object_stream_it_and_copy_nothing(tmp_path, tiny_docs, new_s3_bucket, monkeypatch):
    """The object is decompressed through ranged GETs (STREAM_GET_BYTES each), never copied to local
    disk: the plan and the shards of the local file, a later unit reading more of the object."""
    from trainer.data.prepare_pool import prepare_into_bucket
    from trainer.data.remote import Remote
    from trainer.data.sources import pull, resolve_sources
    from trainer.io import storage

    monkeypatch.setattr(units, "UNIT_BYTES", 4096)
    monkeypatch.setattr(units, "STREAM_GET_BYTES", 4096)
    path = write(tmp_path / "big.jsonl.zst", tiny_docs + records(100, seed=7), "zst")
    src, out = new_s3_bucket(), new_s3_bucket()
    src.open().upload_file(path, f"corpus/{path.name}")
    cfg = load_config(None, {"data.val_permille": 100, "data.shard_tokens": 2048, "data.prepare_workers": 1,
                             "data.sources": [f"{src.url}/corpus/"], "storage.local_dir": str(tmp_path / "work"),
                             **out.overrides()}, env={})
    files = pull(cfg, resolve_sources(cfg), stream=True)
    plan = units.plan_units(files, remote=Remote(cfg.storage, tmp_path / "parts"))
    assert plan == units.plan_units(local_files([path])) and len(plan) > 3
    tok = train_tokenizer(tiny_docs, 512, 4, 2)
    index = prepare_into_bucket(cfg, files, tok, out.open(), "data/test", {})  # the workers: spawned processes
    ref = prepare_shards(cfg, iter_documents(cfg.data, local_files([path])), tok, tmp_path / "ref", progress=False)
    for key in ("train", "val", "filters", "chars"):
        assert index[key] == ref[key], key
    assert not [p for p in (tmp_path / "work").rglob("*") if p.is_file() and p.name != "index.json"]

    # One unit at a time in this process, to see its reads: ranged GETs from the object's start, each
    # of the read-ahead (STREAM_GET_BYTES) or of one read of the decompressor if larger; no partial copy.
    reads = []
    real = storage.S3Storage.read_range
    monkeypatch.setattr(storage.S3Storage, "read_range",
                        lambda self, key, start, end: reads.append((start, end)) or real(self, key, start, end))
    monkeypatch.setattr(units, "fetch_ranges", lambda *a, **k: pytest.fail("a stream unit was copied"))
    remote, furthest = Remote(cfg.storage, tmp_path / "parts"), []
    (tmp_path / "scratch").mkdir()
    for n, u in enumerate(plan):
        reads.clear()
        units.encode_unit(cfg.data, files[0], u, n, tok, 0, np.dtype("uint16"), tmp_path / "scratch", remote)
        assert reads[0][0] == 0 and max(e - s for s, e in reads) <= 1 << 16  # the zstd reader's chunk
        furthest.append(max(e for _, e in reads))
    assert furthest == sorted(furthest) and furthest[-1] == path.stat().st_size and furthest[0] < furthest[-1]


@pytest.mark.parametrize("ext", ["zst", "gz"])
def test_a_truncated_file_is_reported_once_by_the_unit_that_reads_the_break(tmp_path, ext):
    """Units after the break decompress into it while skipping: they read nothing and say nothing;
    the documents and the skip count over all units are those of reading the file whole."""
    path = write(tmp_path / f"cut.jsonl.{ext}", records(300), ext)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    files = local_files([path])
    plan = units.plan_units(files, unit_bytes=4096)
    whole = DocumentReader(data_cfg(on_error="skip").data)
    want = list(whole.iter_file(files[0]))
    assert whole.skipped == {"unreadable file": 1} and 50 < len(want) < 300
    per_unit = [DocumentReader(data_cfg(on_error="skip").data) for _ in plan]
    got = [d for r, u in zip(per_unit, plan) for d in r.iter_file(files[0], **u.reader_args())]
    assert got == want and sum(sum(r.skipped.values()) for r in per_unit) == 1
    failing = []
    for u in plan:
        try:
            list(DocumentReader(data_cfg().data).iter_file(files[0], **u.reader_args()))
        except DataError as e:
            failing.append(str(e))
    assert len(failing) == 1 and failing[0].startswith(f"{path}: cannot read after line ")
