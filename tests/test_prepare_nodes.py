"""Prepare across nodes and from a bucket (issue 22): every node encodes a static share of the units
and publishes them in the bucket, node 0 assembles the same shards as one node; a bad record on
node 1 is named by node 0; a node killed mid-prepare is rerun with its published units; a corpus in
S3 is prepared with a bounded local working set (trainer/data/prepare_nodes.py, remote.py)."""

import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from test_prepare_parallel import cfg_with, hook_env, jsonl, mixed_corpus

from trainer.data import prepare_nodes, units
from trainer.data.prepare_pool import prepare_into_bucket
from trainer.data.readers import iter_documents
from trainer.data.remote import Remote, disk_bytes, open_object
from trainer.data.sample import read_sample
from trainer.data.shards import prepare_shards
from trainer.data.sources import DataError, local_files, pull, resolve_sources
from trainer.data.tokenizer import train_tokenizer
from trainer.io.storage import LocalStorage

KEY = "data/test"


@pytest.fixture(scope="module")
def tok(tiny_docs):
    return train_tokenizer(tiny_docs, 512, 4, 2)


def on_node(cfg, root: Path, node: int):
    """The config as node `node` sees it: its own local disk."""
    return dataclasses.replace(cfg, storage=dataclasses.replace(cfg.storage, local_dir=str(root / f"node{node}")))


def shards_in(store, index: dict) -> dict:
    return {e["name"]: store.read_bytes(f"{KEY}/{e['name']}") for e in index["train"] + index["val"]}


def test_owners_are_contiguous_and_balanced_by_bytes():
    plan = [units.Unit(i, size=s) for i, s in enumerate([10, 10, 10, 10, 40, 10, 10])]
    assert prepare_nodes.owners(plan, 1) == [0] * 7
    assert prepare_nodes.owners(plan, 2) == [0, 0, 0, 0, 1, 1, 1]  # 40 | 60, the big unit's middle at 60 of 100
    four = prepare_nodes.owners(plan, 4)
    assert four == sorted(four) and set(four) == {0, 1, 2, 3}
    assert prepare_nodes.owners([units.Unit(0), units.Unit(1)], 2) == [0, 1]  # no sizes: by count
    assert prepare_nodes.ranges_text([1, 2, 3, 7, 9, 10]) == "1-3, 7, 9-10"


def test_read_range_and_open_object(store):
    data = bytes(range(256)) * 40
    store.write_bytes("x/obj", data)
    assert store.read_range("x/obj", 5, 20) == data[5:20]
    assert store.read_range("x/obj", len(data) - 3, len(data) + 100) == data[-3:]
    with open_object(store, "x/obj", len(data), 64) as fh:
        fh.seek(1000)
        assert fh.read(300) == data[1000:1300]
        fh.seek(-10, os.SEEK_END)
        assert fh.read() == data[-10:]


def test_two_nodes_same_shards_as_one_and_dedup_across_nodes(tmp_path, tiny_docs, tok, monkeypatch):
    """Node 1 first (it publishes its share and returns), then node 0 (its share, then assembles):
    the shards are byte for byte those of one node and of the one-process path. The parquet file,
    last in the listing and so node 1's, repeats the first 20 documents of a.jsonl (node 0's)."""
    monkeypatch.setattr(units, "UNIT_BYTES", 2048)
    files = local_files(mixed_corpus(tmp_path / "corpus", tiny_docs))
    plan = units.plan_units(files)
    owner = prepare_nodes.owners(plan, 2)
    assert owner[0] == 0 and owner[-1] == 1 and files[plan[-1].file].name == "d.parquet"
    cfg = cfg_with(prepare_workers=1)
    ref = prepare_shards(cfg, iter_documents(cfg.data, files), tok, tmp_path / "ref", progress=False)
    assert ref["filters"]["removed_duplicate"] >= 20

    one = LocalStorage(tmp_path / "one")
    single = prepare_into_bucket(on_node(cfg, tmp_path / "1n", 0), files, tok, one, KEY, {})
    two = LocalStorage(tmp_path / "two")
    assert prepare_into_bucket(on_node(cfg, tmp_path, 1), files, tok, two, KEY, {}, node=1, nodes=2) is None
    published = [o.key for o in two.list(f"{KEY}.prepare/") if o.key.endswith(".done.json")]
    assert len(published) == owner.count(1)  # node 1 did its share, only that
    index = prepare_into_bucket(on_node(cfg, tmp_path, 0), files, tok, two, KEY, {}, node=0, nodes=2)
    assert index["nodes"] == 2 and index["units"] == len(plan)
    for key in ("train", "val", "tokens", "chars", "documents", "filters"):
        assert index[key] == ref[key] == single[key], key
    assert index["skipped_records"] == single["skipped_records"]
    ref_bytes = {e["name"]: (tmp_path / "ref" / e["name"]).read_bytes() for e in ref["train"] + ref["val"]}
    assert shards_in(two, index) == shards_in(one, single) == ref_bytes
    assert json.loads(two.read_text(f"{KEY}/index.json"))["train"] == ref["train"]
    assert not two.list(f"{KEY}.prepare/")  # the meeting folder goes once index.json is there


def test_bad_record_on_node_1_named_by_node_0_and_counted_under_skip(tmp_path, tiny_docs, tok, monkeypatch):
    monkeypatch.setattr(units, "UNIT_BYTES", 2048)
    monkeypatch.setattr(prepare_nodes, "POLL_S", 0.05)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    jsonl(corpus / "a.jsonl", tiny_docs[:150])
    jsonl(corpus / "b.jsonl", tiny_docs[150:], bad_at=100)  # past b's first unit: line 101 of the file
    files = local_files(sorted(corpus.glob("*.jsonl")))
    plan = units.plan_units(files)
    owner = prepare_nodes.owners(plan, 2)
    bad_unit = next(n for n, u in enumerate(plan) if files[u.file].name == "b.jsonl" and u.start > 0
                    and u.start <= (corpus / "b.jsonl").read_bytes().index(b"an unterminated") < u.end)
    assert owner[bad_unit] == 1
    where = f"{corpus / 'b.jsonl'}:101"
    cfg = cfg_with(prepare_workers=1, on_error="fail")
    store = LocalStorage(tmp_path / "bucket")
    with pytest.raises(DataError, match=where):
        prepare_into_bucket(on_node(cfg, tmp_path, 1), files, tok, store, KEY, {}, node=1, nodes=2)
    with pytest.raises(DataError, match=f"node 1: .*{where}"):
        prepare_into_bucket(on_node(cfg, tmp_path, 0), files, tok, store, KEY, {}, node=0, nodes=2)
    assert not store.exists(f"{KEY}/index.json")

    skip = cfg_with(prepare_workers=1, on_error="skip")
    store = LocalStorage(tmp_path / "bucket-skip")
    prepare_into_bucket(on_node(skip, tmp_path / "s", 1), files, tok, store, KEY, {}, node=1, nodes=2)
    index = prepare_into_bucket(on_node(skip, tmp_path / "s", 0), files, tok, store, KEY, {}, node=0, nodes=2)
    assert index["skipped_records"] == {"invalid JSON": 1}


def test_node_0_times_out_naming_missing_units_and_nodes(tmp_path, tiny_docs, tok, monkeypatch):
    monkeypatch.setattr(units, "UNIT_BYTES", 2048)
    monkeypatch.setattr(prepare_nodes, "POLL_S", 0.05)
    files = local_files([jsonl(tmp_path / "a.jsonl", tiny_docs)])
    owner = prepare_nodes.owners(units.plan_units(files), 2)
    first, last = owner.index(1), len(owner) - 1
    cfg = cfg_with(prepare_workers=1, prepare_wait_seconds=1)
    with pytest.raises(TimeoutError, match=f"node 1: units {first}-{last}"):
        prepare_into_bucket(on_node(cfg, tmp_path, 0), files, tok, LocalStorage(tmp_path / "b"), KEY, {}, nodes=2)


def test_node_killed_mid_prepare_rerun_reuses_its_published_units(cli, tiny_config, tmp_path):
    """Node 1 of 2 (the CLI, NODE_RANK=1 NNODES=2) is killed -9 once it has published 3 units; then
    both nodes run to the end: node 1's rerun reuses those units, and the shards equal one node's."""
    cfg = tiny_config(tmp_path)
    config = cli.write_config(cfg, tmp_path / "c.yaml")
    hook = hook_env(tmp_path, 2048, 0.3)
    assert cli.run("tokenizer", config, env=cli.env(**hook)).returncode == 0
    env = {r: cli.env(**hook, NODE_RANK=str(r), NNODES="2") for r in (0, 1)}
    bucket = Path(cfg.storage.bucket)
    log = tmp_path / "node1-killed.log"
    proc = cli.start("prepare", config, {"storage.local_dir": str(tmp_path / "work1")}, log=log, env=env[1])
    try:
        deadline = time.time() + 240
        while len(list(bucket.glob("data/*.prepare/*/unit-*.done.json"))) < 3:
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        cli.kill(proc)
    logs = {r: tmp_path / f"node{r}.log" for r in (0, 1)}
    procs = {r: cli.start("prepare", config, {"storage.local_dir": str(tmp_path / f"work{r}")}, log=logs[r],
                          env=env[r]) for r in (1, 0)}
    try:
        for r, p in procs.items():
            assert p.wait(300) == 0, logs[r].read_text()[-3000:]
    finally:
        for p in procs.values():
            cli.kill(p)
    node1 = logs[1].read_text()
    line = next(x for x in node1.splitlines() if "done before (reused)" in x)
    assert "node 1/2" in line and int(line.split("; ")[1].split(" done before")[0]) >= 3, node1[-2000:]
    index = json.loads(next(bucket.glob("data/*/index.json")).read_text())
    assert index["nodes"] == 2 and not list(bucket.glob("data/*.prepare/*/*"))
    one = cli.run("prepare", config, {"storage.bucket": str(tmp_path / "one"), "storage.local_dir":
                                      str(tmp_path / "work-one")}, env=cli.env(**hook))
    assert one.returncode == 0, one.stdout[-3000:]
    ref = json.loads(next((tmp_path / "one").glob("data/*/index.json")).read_text())
    assert index["train"] == ref["train"] and index["val"] == ref["val"] and index["filters"] == ref["filters"]


def test_prepare_from_s3_keeps_local_disk_bounded(tmp_path, tiny_docs, tok, new_s3_bucket, monkeypatch):
    """A corpus of 8 files in a moto bucket, streamed: the inputs, the unit files and the shards
    leave local disk as they are used, so the most it holds at once (sampled every few ms) stays
    under half of corpus + shards (a pull would hold all of the corpus). The shards equal those
    prepared from local copies, and so does the tokenizer sample read by range."""
    monkeypatch.setattr(units, "UNIT_BYTES", 8192)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):
        jsonl(corpus / f"part-{i}.jsonl", [f"{i}: {t}" for t in tiny_docs])
    src = new_s3_bucket()
    store = src.open()
    for p in sorted(corpus.iterdir()):
        store.upload_file(p, f"corpus/{p.name}")
    out = new_s3_bucket()
    cfg = load_cfg(src, out, tmp_path / "work")
    files = pull(cfg, resolve_sources(cfg), stream=True)
    assert all(f.local == "" for f in files) and len(files) == 8
    local = local_files(sorted(corpus.iterdir()))
    remote = Remote(cfg.storage, tmp_path / "sample")
    copies = [dataclasses.replace(f, local=str(corpus / f.name)) for f in files]  # same plan (ETags), read locally
    sample = list(read_sample(cfg.data, files, 20_000, remote=remote))
    assert sample == list(read_sample(cfg.data, copies, 20_000)) and 0 < len(sample) < 8 * len(tiny_docs)
    assert not list((tmp_path / "sample").iterdir())  # each partial copy went once read

    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], disk_bytes(tmp_path / "work"))
            time.sleep(0.002)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        index = prepare_into_bucket(cfg, files, tok, out.open(), KEY, {})
    finally:
        stop.set()
        sampler.join()
    ref = prepare_shards(cfg, iter_documents(cfg.data, local), tok, tmp_path / "ref", progress=False)
    assert index["train"] == ref["train"] and index["val"] == ref["val"]
    corpus_bytes = sum(p.stat().st_size for p in corpus.iterdir())
    shard_bytes = sum((tmp_path / "ref" / e["name"]).stat().st_size for e in ref["train"] + ref["val"])
    assert 0 < peak[0] <= 0.5 * (corpus_bytes + shard_bytes), (peak[0], corpus_bytes, shard_bytes)
    assert not list((tmp_path / "work").rglob("*.bin"))  # every shard uploaded and gone


def load_cfg(src, out, work: Path):
    from trainer.config import load_config

    values = {"data.val_permille": 100, "data.shard_tokens": 2048, "data.prepare_workers": 2,
              "data.sources": [f"{src.url}/corpus/*.jsonl"], "storage.local_dir": str(work), **out.overrides()}
    return load_config(None, values, env={})


def test_every_kind_of_unit_read_by_range_from_s3(tmp_path, tiny_docs, tok, new_s3_bucket, monkeypatch):
    """Byte ranges of a .jsonl and a .txt, decompressed ranges of a .jsonl.gz (streamed by ranged
    GETs) and parquet row groups (its footer and column chunks fetched by range), from a moto bucket:
    the plan and the shards of the local files, and no partial copy left behind."""
    monkeypatch.setattr(units, "UNIT_BYTES", 2048)
    paths = mixed_corpus(tmp_path / "corpus", tiny_docs)
    src = new_s3_bucket()
    for p in paths:
        src.open().upload_file(p, f"corpus/{p.name}")
    out = new_s3_bucket()
    cfg = load_cfg(src, out, tmp_path / "work")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=(f"{src.url}/corpus/",)))
    files = pull(cfg, resolve_sources(cfg), stream=True)
    remote = Remote(cfg.storage, tmp_path / "parts")
    assert {u.kind for u in units.plan_units(files, remote=remote)} == {"bytes", "stream", "row_groups"}
    assert units.plan_units(files, remote=remote) == units.plan_units(local_files(paths))
    index = prepare_into_bucket(cfg, files, tok, out.open(), KEY, {})
    ref = prepare_shards(cfg, iter_documents(cfg.data, local_files(paths)), tok, tmp_path / "ref", progress=False)
    for key in ("train", "val", "filters", "chars"):
        assert index[key] == ref[key], key
    assert not [p for p in (tmp_path / "work").rglob("*") if p.is_file() and p.name != "index.json"]


def test_streamed_upload_appears_on_close_and_abort_leaves_nothing(store, monkeypatch):
    from trainer.io import upload_stream

    monkeypatch.setattr(upload_stream, "PART_BYTES", 5 << 20)  # S3's smallest part: 3 parts below
    data = os.urandom(11 << 20)
    f = upload_stream.open_upload(store, "s/shard.bin")
    for i in range(0, len(data), 1 << 20):
        f.write(data[i:i + (1 << 20)])
    assert not store.exists("s/shard.bin")  # not before close
    f.close()
    assert store.read_bytes("s/shard.bin") == data
    g = upload_stream.open_upload(store, "s/other.bin")
    g.write(data[:100])
    g.abort()
    assert not store.exists("s/other.bin") and [o.key for o in store.list("s/")] == ["s/shard.bin"]
