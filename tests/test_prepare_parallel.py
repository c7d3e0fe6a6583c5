"""The parallel, resumable prepare (trainer/data/prepare_pool.py): the same shards for any worker
count and as the one-process path, dedup across units held by different workers, bad records named
by file line or counted, and a prepare killed (-9, SIGTERM) mid-way that the rerun finishes with
the unit files already done."""

import gzip
import json
import logging
import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from trainer.config import load_config
from trainer.data import prepare_pool, units
from trainer.data.prepare_pool import prepare_corpus
from trainer.data.readers import iter_documents
from trainer.data.shards import prepare_shards
from trainer.data.sources import DataError, local_files
from trainer.data.tokenizer import train_tokenizer

# Loaded by every Python process started with the hook folder on PYTHONPATH (the CLI and its
# spawned workers alike): small units, and a delay per unit so that a test can stop it mid-way.
HOOK = '''
import os
if os.environ.get("TEST_PREPARE_UNIT_BYTES"):
    import time
    import trainer.data.units as _units
    _units.UNIT_BYTES = int(os.environ["TEST_PREPARE_UNIT_BYTES"])
    _delay, _encode = float(os.environ.get("TEST_PREPARE_UNIT_DELAY_S", "0")), _units.encode_unit
    def _slow_encode_unit(*a, **k):
        time.sleep(_delay)
        return _encode(*a, **k)
    _units.encode_unit = _slow_encode_unit
'''


def hook_env(tmp_path: Path, unit_bytes: int, delay_s: float) -> dict:
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOOK)
    path = [str(hook)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {"PYTHONPATH": os.pathsep.join(path), "TEST_PREPARE_UNIT_BYTES": str(unit_bytes),
            "TEST_PREPARE_UNIT_DELAY_S": str(delay_s)}


def cfg_with(**data):
    values = {"val_permille": 100, "shard_tokens": 2048, **data}
    return load_config(None, {f"data.{k}": v for k, v in values.items()}, env={})


def jsonl(path: Path, docs, bad_at: int | None = None) -> Path:
    lines = [json.dumps({"text": t}, ensure_ascii=False) for t in docs]
    if bad_at is not None:
        lines.insert(bad_at, '{"text": "an unterminated record')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def mixed_corpus(root: Path, docs: list[str]) -> list[Path]:
    """Every kind of unit: byte ranges of a .jsonl and a .txt, a .jsonl.gz whole, parquet row groups;
    some documents in two files (dedup across units)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    a = jsonl(root / "a.jsonl", docs[:120])
    (root / "b.txt").write_text("\n\n".join(d.replace("\n\n", "\n") for d in docs[120:200]) + "\n", encoding="utf-8")
    (root / "c.jsonl.gz").write_bytes(gzip.compress((root / "a.jsonl").read_bytes()[:3000].rsplit(b"\n", 1)[0]))
    pq.write_table(pa.table({"text": docs[200:] + docs[:20]}), root / "d.parquet", row_group_size=10)
    return [a, root / "b.txt", root / "c.jsonl.gz", root / "d.parquet"]


def shard_bytes(out: Path, index: dict) -> dict:
    return {e["name"]: (out / e["name"]).read_bytes() for e in index["train"] + index["val"]}


@pytest.fixture(scope="module")
def tok(tiny_docs):
    return train_tokenizer(tiny_docs, 512, 4, 2)


def test_same_shards_for_1_2_4_workers_and_one_process(tmp_path, tiny_docs, tok, monkeypatch):
    monkeypatch.setattr(units, "UNIT_BYTES", 2048)
    files = local_files(mixed_corpus(tmp_path / "corpus", tiny_docs))
    plan = units.plan_units(files)
    assert {u.kind for u in plan} == {"bytes", "stream", "row_groups"} and len(plan) > 12
    cfg = cfg_with()
    ref = prepare_shards(cfg, iter_documents(cfg.data, files), tok, tmp_path / "one", progress=False)
    assert ref["filters"]["removed_duplicate"] > 20 and len(ref["train"]) > 3
    for workers in (1, 2, 4):
        out = tmp_path / f"w{workers}"
        index = prepare_corpus(cfg, files, tok, out, tmp_path / f"scratch{workers}", workers=workers)
        assert index["workers"] == workers and index["units"] == len(plan)
        for key in ("train", "val", "tokens", "chars", "documents", "filters", "dtype", "eos_id"):
            assert index[key] == ref[key], key
        assert shard_bytes(out, index) == shard_bytes(tmp_path / "one", ref)
        assert json.loads((out / "index.json").read_text()) == index


def test_dedup_across_units_held_by_different_workers(tmp_path, tiny_docs, tok, monkeypatch, caplog):
    """Every unit starts with the same poem: only the first unit keeps it, whichever worker
    finished first; the others hold it at their position 0 and drop it. Progress is logged."""
    for k, v in hook_env(tmp_path, 0, 0.3).items():  # a delay per unit in the workers: both get units
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(units, "UNIT_BYTES", 1 << 30)
    monkeypatch.setattr(prepare_pool, "PROGRESS_EVERY_S", 0.2)
    caplog.set_level(logging.INFO, logger="trainer")
    shared = tiny_docs[0]
    paths = [jsonl(tmp_path / f"part-{i}.jsonl", [shared] + tiny_docs[1 + 20 * i: 21 + 20 * i]) for i in range(8)]
    files = local_files(paths)
    cfg = cfg_with(val_permille=0)
    index = prepare_corpus(cfg, files, tok, tmp_path / "out", tmp_path / "scratch", workers=2)
    pids = {json.loads(p.read_text())["worker_pid"] for p in (tmp_path / "scratch").glob("*.done.json")}
    assert len(pids) == 2  # the units were shared out
    progress = [r.getMessage() for r in caplog.records if re.match(r"prepare: \d/8 units, ", r.getMessage())]
    assert progress and re.search(r"[\d,]+ documents/s, [\d.]+ MB/s, ETA ([\d.]+ min|unknown)$", progress[-1])
    assert index["filters"]["removed_duplicate"] == 7 and index["documents"]["train"] == 1 + 8 * 20
    tokens = np.concatenate([np.fromfile(tmp_path / "out" / e["name"], dtype=index["dtype"]) for e in index["train"]])
    eos = index["eos_id"]
    first = tokens[: int(np.argmax(tokens == eos))].tolist()
    assert tok.decode(first) == shared
    ref = prepare_shards(cfg, iter_documents(cfg.data, files), tok, tmp_path / "one", progress=False)
    assert index["train"] == ref["train"]


def test_bad_record_fail_names_file_line_and_skip_counts(tmp_path, tiny_docs, tok, monkeypatch):
    monkeypatch.setattr(units, "UNIT_BYTES", 1024)
    big = jsonl(tmp_path / "big.jsonl", tiny_docs[:200], bad_at=150)  # line 151, deep in a later byte range
    other = jsonl(tmp_path / "other.jsonl", tiny_docs[200:230])
    files = local_files([big, other])
    plan = units.plan_units(files)
    line_start = sum(len(line) + 1 for line in big.read_bytes().split(b"\n")[:150])
    assert any(u.kind == "bytes" and 0 < u.start <= line_start < u.end for u in plan)
    with pytest.raises(DataError, match=rf"^{big}:151: invalid JSON"):
        prepare_corpus(cfg_with(), files, tok, tmp_path / "f", tmp_path / "sf", workers=2)
    cfg = cfg_with(on_error="skip")
    index = prepare_corpus(cfg, files, tok, tmp_path / "s", tmp_path / "ss", workers=2)
    assert index["skipped_records"] == {"invalid JSON": 1}
    assert index["filters"]["documents_read"] == 230
    ref = prepare_shards(cfg, iter_documents(cfg.data, files), tok, tmp_path / "one", progress=False)
    assert index["train"] == ref["train"] and index["val"] == ref["val"]


def test_byte_range_cuts_keep_txt_documents_whole(tmp_path, tiny_docs):
    text = "\n\n".join(d.replace("\n\n", "\n") for d in tiny_docs[:100]) + "\n"
    path = tmp_path / "poems.txt"
    path.write_text(text, encoding="utf-8")
    (f,) = local_files([path])
    plan = units.plan_units([f], 700)
    assert len(plan) > 10 and plan[0].start == 0 and plan[-1].end == f.size
    assert all(a.end == b.start for a, b in zip(plan, plan[1:]))
    from trainer.data.readers import DocumentReader

    cfg = cfg_with().data
    parts = [d for u in plan for d in DocumentReader(cfg).iter_file(f, **u.reader_args())]
    assert parts == list(DocumentReader(cfg).iter_file(f))


# A prepare stopped mid-way, through the CLI --------------------------------------------------

def start_prepare(cli, tiny_config, tmp_path, delay_s: float, log: Path):
    cfg = tiny_config(tmp_path)
    config = cli.write_config(cfg, tmp_path / "c.yaml")
    env = cli.env(**hook_env(tmp_path, 2048, delay_s))
    return cfg, config, env, cli.start("prepare", config, log=log, env=env)


def wait_for_units(proc, scratch_root: Path, n: int, log: Path) -> None:
    deadline = time.time() + 240
    while len(list(scratch_root.glob("*/unit-*.done.json"))) < n:
        assert proc.poll() is None, f"exited {proc.returncode} early:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def finish_and_compare(cli, cfg, config, env, tmp_path: Path) -> str:
    """Rerun prepare to the end; its shards equal the one-process path's; returns the rerun's log."""
    from trainer.data.sources import resolve_sources
    from trainer.data.tokenizer import load_tokenizer
    from trainer.io.artifacts import bucket, fetch_folder

    done = cli.run("prepare", config, env=env)
    assert done.returncode == 0, done.stdout[-3000:]
    store = bucket(cfg)
    data_key = done.stdout.strip().splitlines()[-1][len(store.url()) + 1:]
    index = json.loads(store.read_text(f"{data_key}/index.json"))
    tok_dir = fetch_folder(store, index["tokenizer_key"], tmp_path / "fetched")
    ref = prepare_shards(cfg, iter_documents(cfg.data, resolve_sources(cfg)), load_tokenizer(tok_dir),
                         tmp_path / "one", progress=False)
    assert index["train"] == ref["train"] and index["val"] == ref["val"] and index["filters"] == ref["filters"]
    assert not (Path(cfg.storage.local_dir) / "prepare").exists() or \
        not any((Path(cfg.storage.local_dir) / "prepare").iterdir())  # the unit files are gone once published
    return done.stdout


def reused(log: str) -> int:
    line = next(line for line in log.splitlines() if "done before (reused)" in line)
    return int(line.split("; ")[1].split(" done before")[0])


def test_kill_9_mid_prepare_then_rerun(cli, tiny_config, tmp_path):
    log = tmp_path / "killed.log"
    cfg, config, env, proc = start_prepare(cli, tiny_config, tmp_path, 0.3, log)
    scratch = Path(cfg.storage.local_dir) / "prepare"
    try:
        wait_for_units(proc, scratch, 4, log)
        workers = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGKILL)  # the parent alone: its workers notice and stop
        proc.wait(10)
        gone, alive = psutil.wait_procs(workers, timeout=20)
        assert not alive, f"orphaned workers still running: {alive}"
    finally:
        cli.kill(proc)
    assert not list(Path(cfg.storage.bucket).glob("data/*/index.json"))
    rerun = finish_and_compare(cli, cfg, config, env, tmp_path)
    assert reused(rerun) >= 4, rerun[-2000:]


def test_sigterm_mid_prepare_exits_75_then_rerun(cli, tiny_config, tmp_path):
    log = tmp_path / "stopped.log"
    cfg, config, env, proc = start_prepare(cli, tiny_config, tmp_path, 0.3, log)
    scratch = Path(cfg.storage.local_dir) / "prepare"
    try:
        wait_for_units(proc, scratch, 4, log)
        workers = psutil.Process(proc.pid).children(recursive=True)
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 75, log.read_text()[-3000:]
        assert time.time() - sent < 5
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive
    finally:
        cli.kill(proc)
    assert "units are done and kept" in log.read_text()
    assert not list(Path(cfg.storage.bucket).glob("data/*/index.json"))
    rerun = finish_and_compare(cli, cfg, config, env, tmp_path)
    assert reused(rerun) >= 4, rerun[-2000:]
