"""Parallel, resumable prepare on one node: the corpus -> packed shards on every core.

The listing is cut into work units (trainer/data/units.py); `data.prepare_workers` worker
processes (multiprocessing, spawn: no state forked from the parent, each loads the tokenizer from
its tokenizer.json string once) take units from a queue, each reading, normalising and tokenizing a
unit alone (one core: TOKENIZERS_PARALLELISM=false, processes rather than Rust threads use the
cores, no GIL is shared; or `data.prepare_threads` Rust encoder threads each, and cores // threads
workers) and publishing its unit file with a done marker under the scratch folder, which is keyed
by the data hash. The parent then assembles the shards in unit order (trainer/data/assemble.py:
global exact dedup, the byte-identical shards of the one-process path, whatever the worker count).

Why processes of our own and not datatrove, Ray Data or a pool: a unit is one function call with
a file path in and a file out, the queue is a few lines, and we need what a generic pool hides:
SIGKILL of the workers when SIGTERM stops the stage (exit 75 within a second, Preempted), workers
that exit when their parent is killed -9 (they poll getppid between units), a worker's death
(the OOM killer) reported as such, and progress from the parent. A rerun reuses every unit with a
done marker, and logs how many.

Several nodes, and a corpus read from S3 in parts: each node runs this pool over its static share
of the units and publishes them in the bucket, where node 0 finds them to assemble
(trainer/data/prepare_nodes.py; the s3:// reads: trainer/data/remote.py). The token stream is the
same as on one node.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import time
from pathlib import Path

from trainer.config import Config
from trainer.data.assemble import assemble_shards
from trainer.data.child_process import picklable
from trainer.data.prepare_nodes import UnitBucket, owners
from trainer.data.readers import no_documents
from trainer.data.remote import Remote, is_remote
from trainer.data.shards import FORMAT_VERSION, check_trainable, document_separator, encoding_backend, token_dtype
from trainer.data.sources import CorpusFile, DataError
from trainer.data.units import encode_unit, plan_fingerprint, plan_units, read_done
from trainer.errors import stop_on_signals
from trainer.io.storage import Storage, join
from trainer.io.upload_stream import open_upload
from trainer.log import logger

PROGRESS_EVERY_S = 10.0  # seconds between progress lines
POLL_S = 0.5  # how often the parent looks at its workers (and reacts to a signal's flag)
AUTO_THREADS = 1  # data.prepare_threads=0: encoder threads per worker (bench/RESULTS.md "Prepare in parallel")


def cores() -> int:
    """The cores this process may run on (sched_getaffinity: a container's cpuset, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS


def worker_count(setting: int) -> int:
    """data.prepare_workers, with 0 meaning every core this process may run on."""
    return setting if setting > 0 else cores()


def worker_layout(data, workers: int | None, n_units: int) -> tuple[int, int]:
    """(worker processes, Rust encoder threads each). data.prepare_threads t > 1 gives each worker
    t threads (encode_batch over RAYON_NUM_THREADS) and cores // t workers unless
    data.prepare_workers says how many; 0 (automatic) is AUTO_THREADS. Never more workers than units."""
    threads = data.prepare_threads or AUTO_THREADS
    setting = workers or data.prepare_workers
    n = setting if setting > 0 else max(1, cores() // threads)
    return max(1, min(n, n_units)), threads


def prepare_corpus(cfg: Config, files: list[CorpusFile], tokenizer, out_dir: Path, scratch: Path,
                   workers: int | None = None, meeting: UnitBucket | None = None, remote: Remote | None = None,
                   shard_hooks: tuple = (None, None)) -> dict | None:
    """Tokenize `files` into shards under out_dir; return the index (also written as
    out_dir/index.json), with skipped_records, workers and units added to prepare_shards' keys.

    `scratch` holds the unit files (delete it once the shards are published); a rerun with the same
    scratch reuses the units already done. workers: default data.prepare_workers. meeting: the
    bucket's unit folder when several nodes prepare (or the corpus is streamed): this node encodes
    its share of the units and publishes each (trainer/data/prepare_nodes.py); node 0 then waits for
    the others' and assembles from the bucket, the other nodes return None. remote: how to read
    s3:// files in parts (trainer/data/remote.py). shard_hooks: (open_shard, on_close) of the ShardWriters.
    Raises DataError (a bad record under data.on_error=fail, naming file and line, on any node; no
    document or no training token left), ConfigError (the tokenizer has no document separator),
    Preempted (SIGTERM or SIGINT: the workers are killed, the units done are kept; exit 75),
    RuntimeError (a worker died) and TimeoutError (node 0 waited data.prepare_wait_seconds)."""
    start = time.time()
    backend = encoding_backend(tokenizer)
    eos_token, eos = document_separator(tokenizer, backend)
    dtype = token_dtype(backend.get_vocab_size())
    units = plan_units(files, remote=remote)
    stats, todo, unit_owners = _todo(scratch, plan_fingerprint(files, units), units, meeting)
    n_workers, threads = worker_layout(cfg.data, workers, max(1, len(todo)))
    where = f"node {meeting.node}/{meeting.nodes}: " if meeting is not None and meeting.nodes > 1 else ""
    logger.info(f"prepare: {where}{len(units)} work unit(s) over {len(files)} file(s); "
                f"{sum(s is not None for s in stats)} done before (reused), {len(todo)} to do on {n_workers} worker "
                f"process(es) x {threads} encoder thread(s)")
    spec = {"data": cfg.data, "files": files, "units": units, "eos": eos, "dtype": dtype, "scratch": scratch,
            "tokenizer": backend.to_str() if hasattr(backend, "to_str") else backend, "remote": remote,
            "threads": threads}
    progress = _Progress(units, todo, where)
    # From here to the shards a signal raises Preempted (exit 75); the pool's finally kills the workers.
    restore = stop_on_signals(lambda signum: f"prepare: received signal {signum}: stopping; {progress.done}/"
                              f"{progress.total} units are done and kept, the rerun continues from them (exit 75)")
    try:
        try:
            for n, s in _run_pool(spec, todo, n_workers, progress) if todo else ():
                stats[n] = s
                if meeting is not None:
                    meeting.publish(scratch, n, s)
        except (DataError, RuntimeError) as e:
            if meeting is not None and meeting.node != 0:
                meeting.fail(e)  # node 0 raises it rather than waiting out its timeout
            raise
        if meeting is not None and meeting.node != 0:
            logger.info(f"prepare: {where}its {len(todo)} unit(s) published in {time.time() - start:.1f} s")
            return None
        if meeting is not None:
            stats = meeting.wait_all(unit_owners, cfg.data.prepare_wait_seconds)
        index = {"format": FORMAT_VERSION, "dtype": dtype.name, "vocab_size": backend.get_vocab_size(),
                 "eos_id": eos, "eos_token": eos_token}
        assembling = time.time()
        index.update(assemble_shards(scratch, stats, out_dir, dtype, cfg.data.shard_tokens, cfg.data.dedup,
                                     meeting.load if meeting is not None else None, shard_hooks))
        logger.info(f"prepare: {len(index['train']) + len(index['val'])} shard(s) assembled from {len(units)} units "
                    f"in {time.time() - assembling:.1f} s (units took {assembling - start:.1f} s)")
    finally:
        restore()
    return _finish(cfg, files, index, out_dir, start, n_workers, len(units), meeting)


def prepare_into_bucket(cfg: Config, files: list[CorpusFile], tokenizer, store: Storage, key: str, extra: dict,
                        node: int = 0, nodes: int = 1) -> dict | None:
    """The prepare stage's work on node `node` of `nodes`: the shards published under `key` in the
    bucket, each as soon as it is written, index.json (with `extra` added) last; returns the index,
    or None on a node other than 0 (its share is in the bucket: wait for index.json).

    With several nodes, or a corpus read from S3 in parts (bounded local disk: the inputs, the
    unit files and the shards leave this machine as soon as they are used), the units meet in the
    bucket under `<key>.prepare/` (prepare_nodes.py), which goes once index.json is there. Unit
    files survive a kill (-9 or SIGTERM: exit 75) and are reused by the rerun."""
    out = Path(cfg.storage.local_dir) / key
    shutil.rmtree(out, ignore_errors=True)
    scratch = Path(cfg.storage.local_dir) / "prepare" / key.rsplit("/", 1)[-1]
    remote = Remote(cfg.storage, scratch / "input") if any(is_remote(f) for f in files) else None
    meeting = UnitBucket(store, f"{key}.prepare", node, nodes) if nodes > 1 or remote else None

    def shard_done(path: Path) -> None:  # each shard goes up as it is complete
        store.upload_file(path, join(key, path.name))
    # Streamed (an S3 corpus): each shard is written straight into the bucket, never to local disk.
    hooks = ((lambda name: open_upload(store, join(key, name))), None) if remote is not None else (None, shard_done)
    index = prepare_corpus(cfg, files, tokenizer, out, scratch, meeting=meeting, remote=remote, shard_hooks=hooks)
    shutil.rmtree(scratch, ignore_errors=True)
    if index is None:
        return None
    index.update(extra)
    (out / "index.json").write_text(json.dumps(index, indent=1))
    store.upload_file(out / "index.json", join(key, "index.json"))  # last: the folder counts from now
    if meeting is not None:
        meeting.clear()
    return index


def _todo(scratch: Path, plan: str, units: list, meeting: UnitBucket | None):
    """(each unit's counts or None, the units this node encodes, each unit's node). With a
    meeting, the units published in the bucket count as done, and units done here but not yet
    published (a kill between the two) are published now."""
    stats = _resume(scratch, plan, len(units))
    if meeting is None:
        return stats, [n for n, s in enumerate(stats) if s is None], [0] * len(units)
    unit_owners = owners(units, meeting.nodes)
    meeting.start(plan)
    published = meeting.published()
    for n, s in enumerate(stats):
        if s is not None and n not in published:
            meeting.publish(scratch, n, s)
    stats = [published.get(n) or (s if unit_owners[n] == meeting.node else None) for n, s in enumerate(stats)]
    return stats, [n for n, s in enumerate(stats) if s is None and unit_owners[n] == meeting.node], unit_owners


def _finish(cfg: Config, files, index: dict, out_dir: Path, start: float, n_workers: int, n_units: int,
            meeting: UnitBucket | None) -> dict:
    if not index["filters"].get("documents_read"):
        raise no_documents(cfg.data, files, index["skipped_records"])
    seconds = time.time() - start
    index.update(seconds=round(seconds, 2), chars_per_second=round(sum(index["chars"].values()) / max(seconds, 1e-9)),
                 workers=n_workers, units=n_units, nodes=meeting.nodes if meeting is not None else 1)
    index["tokens"] = {s: sum(x["tokens"] for x in index[s]) for s in ("train", "val")}
    if index["tokens"]["train"] == 0:
        check_trainable(index, 1, index["skipped_records"])  # the message with the counts
    (out_dir / "index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
    return index


def _resume(scratch: Path, plan: str, n_units: int) -> list[dict | None]:
    """Each unit's counts if a previous run finished it under the same plan, else None. A
    scratch folder of another plan (other files, another UNIT_BYTES) is emptied; temporaries
    left by killed workers are removed."""
    import shutil

    marker = scratch / "plan.txt"
    if scratch.exists() and (not marker.is_file() or marker.read_text() != plan):
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    marker.write_text(plan)
    for tmp in scratch.glob("*.tmp"):
        tmp.unlink(missing_ok=True)
    return [read_done(scratch, n) for n in range(n_units)]


class _Progress:
    """Units done of the total, documents/s, input MB/s and ETA, logged every PROGRESS_EVERY_S."""

    def __init__(self, units, todo, where: str = ""):
        self.where = where  # "node r/N: " when several nodes prepare
        self.total, self.done = len(units), len(units) - len(todo)
        self.bytes_left = sum(units[n].size for n in todo)
        self.docs = self.bytes = 0
        self.start = self.last = time.time()

    def add(self, stats: dict) -> None:
        self.done += 1
        self.docs += stats["filters"].get("documents_read", 0)
        self.bytes += stats["bytes"]
        self.bytes_left -= stats["bytes"]

    def maybe_log(self) -> None:
        now = time.time()
        if now - self.last < PROGRESS_EVERY_S:
            return
        self.last, seconds = now, max(now - self.start, 1e-9)
        rate = self.bytes / seconds
        eta = f"{self.bytes_left / rate / 60:.1f} min" if rate else "unknown"
        logger.info(f"prepare: {self.where}{self.done}/{self.total} units, {self.docs / seconds:,.0f} documents/s, "
                    f"{rate / 1e6:.1f} MB/s, ETA {eta}")


def _run_pool(spec: dict, todo: list[int], n_workers: int, progress: _Progress):
    """Yield (unit, counts) as the workers finish units. Any way out (done, an error, a signal)
    kills the workers that are left; a unit in flight leaves only a temporary file."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    for n in todo:
        tasks.put(n)
    for _ in range(n_workers):
        tasks.put(None)
    procs = [ctx.Process(target=_worker, args=(spec, tasks, results), daemon=True, name=f"prepare-{i}")
             for i in range(n_workers)]
    left = len(todo)
    try:
        for p in procs:
            p.start()
        while left:
            try:
                kind, n, payload = results.get(timeout=POLL_S)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"prepare: worker process {dead[0].name} died (exit code {dead[0].exitcode}; "
                                       f"-9 is SIGKILL, often the OOM killer); rerun to continue") from None
                progress.maybe_log()
                continue
            if kind == "error":
                raise payload
            left -= 1
            progress.add(payload)
            progress.maybe_log()
            yield n, payload
    finally:
        started = [p for p in procs if p.pid is not None]
        for p in started:
            if p.is_alive():
                p.kill()
        for p in started:
            p.join(10)
        for q in (tasks, results):
            q.cancel_join_thread()
            q.close()


def _worker(spec: dict, tasks, results) -> None:
    """A worker process: units from `tasks` until None, or until its parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides: it kills us on a signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # One core each by default; t threads each with data.prepare_threads (read by the Rust side: the
    # thread pool is built at the first parallel call, after this).
    threads = spec["threads"]
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    from trainer.data.shards import packing_tokenizer

    parent = os.getppid()
    tok = spec["tokenizer"]
    backend = packing_tokenizer(tok) if isinstance(tok, str) else tok
    files, units = spec["files"], spec["units"]
    while os.getppid() == parent:  # orphaned (the parent was killed -9): stop
        try:
            n = tasks.get(timeout=1.0)
        except queue.Empty:
            continue
        if n is None:
            return
        try:
            u = units[n]
            stats = encode_unit(spec["data"], files[u.file], u, n, backend, spec["eos"], spec["dtype"], spec["scratch"],
                                spec["remote"])
        except BaseException as e:  # noqa: BLE001 - sent to the parent, which raises it
            results.put(("error", n, picklable(e, "prepare worker")))
            return
        results.put(("done", n, stats))
